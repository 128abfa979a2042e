"""Thin command-line stages, one per DVC stage: `python -m stages.<name>`.

Before torch loads, pin the CPU kernels to one instruction set: PyTorch's own (ATen), oneDNN's
and MKL's dispatchers otherwise pick AVX-512 where the CPU has it, whose float sums round
differently, and a stage's bytes would then depend on the machine, not only on the seed.
AVX2 is what every x86-64 server of the last decade has; a variable already set is kept.

Third-party notices that every stage would print on every run, none of them about something
to change here, are dropped by their text, so that any other warning still shows.
"""

import logging
import os
import warnings

for _name, _value in (("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2"), ("MKL_CBWR", "AVX2")):
    os.environ.setdefault(_name, _value)

for _message in (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # inside Lightning 2.6.6 on torch 2.14
    # asynchronous BatchNorm needs broadcast_buffers=False, which the notice itself says to keep
    r"`broadcast_buffers` is deprecated",
    # the loss and accuracy are reduced over processes before they are logged (pipeline.train)
    r"It is recommended to use `self\.log\('(train_loss|test_accuracy|epsilon)', \.\.\., sync_dist=True\)`",
    r"The number of training batches \(\d+\) is smaller than the logging interval",  # logged per epoch
):
    warnings.filterwarnings("ignore", message=_message)


class _DropAdvertisement(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")  # Lightning's suggestion to install its cloud logger


for _logger in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_logger).addFilter(_DropAdvertisement())
