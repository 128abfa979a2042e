"""Thin command-line stages, one per DVC stage: `python -m stages.<name>`.

Before torch loads, pin the CPU kernels to one instruction set: PyTorch's own (ATen), oneDNN's
and MKL's dispatchers otherwise pick AVX-512 where the CPU has it, whose float sums round
differently, and a stage's bytes would then depend on the machine, not only on the seed.
AVX2 is what every x86-64 server of the last decade has; a variable already set is kept.
"""

import os

for _name, _value in (("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2"), ("MKL_CBWR", "AVX2")):
    os.environ.setdefault(_name, _value)
