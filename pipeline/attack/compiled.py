"""The attack step as one torch.compile'd function, held once against the eager step."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import torch
from torch.nn import functional as F

from pipeline.attack.objective import Objective, total_variation
from pipeline.errors import PipelineError


def compiled_step(objective: Objective) -> Callable[[torch.Tensor], tuple[torch.Tensor, float]]:
    """x -> (the objective's gradient with respect to x, the gradient term), as one compiled
    function: torch.func's grad of (the gradient term of torch.func's grad of the batch loss +
    TV), handed to torch.compile, which fuses the double backward's elementwise work (on the
    ConvNet most of a step: the BatchNorm double backward alone is a third). The first compile
    of a model takes tens of seconds, later ones read inductor's cache. It takes neither the
    prior, nor a split batch, nor unrolled steps (Target.check refuses them).

    Train-mode BatchNorm normalises with batch statistics only: its running statistics are
    dropped from a copy of the model, as torch.func cannot update them inside a transform. The
    first call is checked against the objective's eager step (see check_compiled)."""
    from torch.func import functional_call, grad, replace_all_batch_norm_modules_

    model, match, labels = copy.deepcopy(objective.model), objective.match, objective.labels
    shards, tv_weight, eager = objective.target.shards, objective.a.tv_weight, objective.image_gradient
    if model.training:
        replace_all_batch_norm_modules_(model)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    fixed = {**{n: p for n, p in model.named_parameters() if not p.requires_grad}, **dict(model.named_buffers())}

    def batch_loss(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        state = {**params, **fixed}
        logits = torch.cat([functional_call(model, state, (part,)) for part in x.chunk(shards)])
        return F.cross_entropy(logits, labels)

    def total(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grads = grad(batch_loss)(params, x)
        term = match.differentiable([grads[n] for n in names])
        return term + tv_weight * total_variation(x), term

    _per_isa_inductor_cache()
    torch.compiler.reset()  # a fresh trace for this model: dynamo would otherwise pile up guards per job
    step = torch.compile(grad(total, has_aux=True))
    checked = False

    def image_gradient(x: torch.Tensor) -> tuple[torch.Tensor, float]:
        nonlocal checked
        gradient, term = step(x.detach())
        if not checked:  # the compiler's kernels are new code: held once against the eager step
            check_compiled(gradient, eager(x)[0])
            checked = True
        return gradient, float(term)

    return image_gradient


_USER_INDUCTOR_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # before inductor writes its default there


def _per_isa_inductor_cache() -> None:
    """Point inductor at a cache folder of its own for the vector instruction set it compiles
    for. Its cache does not tell kernels built for AVX2 from AVX-512 ones apart (torch 2.14), and
    the stages pin ATEN_CPU_CAPABILITY=avx2 where a plain Python process does not: kernels
    reused across the two gave NaN and segmentation faults here."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    base = _USER_INDUCTOR_CACHE or default_cache_dir()
    isa = str(pick_vec_isa()).replace(" ", "+") or "none"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, f"isa-{isa}")


def check_compiled(compiled: torch.Tensor, eager: torch.Tensor, rtol: float = 1e-3) -> None:
    """Refuse a compiled image gradient that is not the eager one (seen before each instruction
    set had its own cache folder: NaN from kernels inductor reused across AVX2 and AVX-512)."""
    scale = float(eager.abs().max())
    difference = float((compiled - eager).abs().max()) if torch.isfinite(compiled).all() else float("inf")
    if not difference <= rtol * scale:
        raise PipelineError(
            f"attack.compile: the compiled step's image gradient is not the eager one (largest "
            f"difference {difference:.3g}, scale {scale:.3g}) for this model on this machine; "
            "run without attack.compile"
        )
