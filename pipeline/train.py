"""Training under a defense scheme with Lightning, a weights-only checkpoint every epoch and
after each of `train.checkpoint_steps` optimizer steps.

The same code runs on one CPU process, several gloo processes, or GPUs over several nodes;
only `train.devices`, `train.num_nodes` and `train.accelerator` change. What a scheme
changes:

* norm: BatchNorm synchronised over all processes (`batch-sync`), each process with its own
  statistics and buffers (`batch-async`, DDP's buffer broadcast off), or GroupNorm (`group`);
* batch_multiplier: the scheme's global batch is `train.batch_size` times it (`gh`: 3);
* maxpool_kernel: ResNet-18's stem maxpool (`ra`), "auto" for the smallest with RA-i > 0;
* dp: per-sample DP-SGD (Poisson batches, clipping, noise, epsilon per epoch), or the
  original's batch clipping plus noise (no guarantee);
* defense: a client's post-processing (pruning, clipping, sign; pipeline.defenses) applied to
  every step's gradient after it is averaged over the processes, before momentum and weight decay;
* bottleneck: PRECODE's variational block before the classifier, its KL term in the loss;
* lr: the scheme's own SGD step size in place of `train.lr`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from pipeline.bn import CrossProcessSyncBatchNorm
from pipeline.checkpoints import (
    checkpoint_name,
    epoch_checkpoint,
    save_checkpoint,
    step_checkpoint,
    written_checkpoints,
)
from pipeline.config import Params
from pipeline.data import normalise
from pipeline.defenses import defended
from pipeline.dp import PoissonBatches, batch_clip_noise_gradient, dp_gradient, epsilons, per_sample_method, tightest
from pipeline.errors import PipelineError
from pipeline.images import ImageIndex, Images, Split, StreamedImages
from pipeline.nets import bottlenecks, build_model, take_penalty
from pipeline.parallel import resolve_accelerator, threads_per_process
from pipeline.sections import SchemeParams, TrainParams
from pipeline.seeds import Draw, generator

RESUME = "resume.ckpt"  # the full training state, beside the checkpoints until training ends


class Classifier(L.LightningModule):
    def __init__(
        self,
        model: torch.nn.Module,
        train: TensorDataset | StreamedImages,
        test: TensorDataset | StreamedImages,
        num_classes: int,
        params: Params,
        scheme: SchemeParams,
    ):
        super().__init__()
        self.model = model
        self.hp, self.scheme, self.seed = params.train, scheme, params.seed
        dp = scheme.dp  # per_sample is set exactly for per-sample DP (pipeline.config)
        self.per_sample = (
            per_sample_method(dp.per_sample, params.model.arch) if dp is not None and dp.per_sample else None
        )
        self.train_set, self.test_set = train, test
        # tensors in memory need no workers; a streamed folder's images are decoded in them
        self.workers = params.train.loader_workers if isinstance(train, StreamedImages) else 0
        self.global_batch = params.train.batch_size * scheme.batch_multiplier
        self.test_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.last_test_accuracy = float("nan")
        self.loss_sum = torch.zeros(2)  # (summed loss, samples) of the epoch: logged once, not every step

    @property
    def per_sample_dp(self) -> bool:  # DP-SGD: clipping sample by sample
        return self.scheme.dp is not None and self.scheme.dp.kind == "per-sample"

    @property
    def sample_rate(self) -> float:
        return self.global_batch / len(self.train_set)

    def steps_per_epoch(self, processes: int) -> int:
        """Optimizer steps in one epoch: round(1/q) Poisson batches, or the sampler's share of each
        process cut into batches (the last one short)."""
        if self.per_sample_dp:
            return max(1, round(1 / self.sample_rate))
        share = math.ceil(len(self.train_set) / processes)
        return math.ceil(share / (self.global_batch // processes))

    def test_accuracy_now(self) -> float:
        """The test accuracy of the weights as they are, between two training steps: the model in
        eval mode over every process's share of the test set, counts summed over processes. No
        random draw and no buffer update, so training goes on with the same bytes."""
        was_training = self.model.training
        self.model.eval()
        counts = torch.zeros(2, device=self.device)
        with torch.no_grad():
            for images, labels in self.val_dataloader():
                images, labels = images.to(self.device), labels.to(self.device)
                counts += torch.stack(
                    [(self.model(images).argmax(1) == labels).sum().float(), counts.new_tensor(len(labels))]
                )
        self.model.train(was_training)
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        return float(counts[0] / counts[1])

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1 and not torch.cuda.is_available():
            # processes share the cores: one thread each on two cores, not two each
            torch.set_num_threads(threads_per_process(self.hp.devices))

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if self.per_sample_dp:  # the accountant's guarantee assumes Poisson sampling
            batches = PoissonBatches(len(self.train_set), self.sample_rate, self.seed, rank, world)
            return DataLoader(self.train_set, batch_sampler=batches, **self.loading)
        # The order of epoch e is a function of (seed, e) alone, so a resumed run sees the same batches.
        sampler: DistributedSampler[int] = DistributedSampler(
            self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.seed
        )
        return DataLoader(self.train_set, batch_size=self.global_batch // world, sampler=sampler, **self.loading)

    def val_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = list(range(rank, len(self.test_set), world))
        return DataLoader(self.test_set, batch_size=256, sampler=sampler, **self.loading)

    @property
    def loading(self) -> dict[str, Any]:
        if not self.workers:
            return {}
        return {"num_workers": self.workers, "persistent_workers": True, "pin_memory": torch.cuda.is_available()}

    def training_step(self, batch, _index):
        images, labels = batch
        if not self.per_sample_dp:
            # PRECODE's noise a function of (seed, step, rank): a resumed run draws alike
            step_noise = (Draw.TRAINING_BOTTLENECK, self.seed, self.global_step, self.trainer.global_rank)
            for block in bottlenecks(self.model):
                block.generator = generator(*step_noise)
            loss = F.cross_entropy(self.model(images), labels) + take_penalty(self.model)  # PRECODE's KL term
            self._count_loss(loss.detach(), len(labels))
            return loss
        dp, world = self.scheme.dp, self.trainer.world_size
        noise = generator(Draw.TRAINING_DP_NOISE, self.seed, self.global_step, self.trainer.global_rank)
        grads = dp_gradient(
            self.model,
            images,
            labels,
            dp.clip,
            dp.sigma,
            self.global_batch / world,
            noise,
            self.per_sample,
            noise_share=1 / world,
        )
        if len(labels):
            with torch.no_grad():
                self._count_loss(F.cross_entropy(self.model(images), labels), len(labels))
        # A loss whose gradient is exactly the DP gradient: DDP then averages it over processes
        # like any other, and the optimiser, schedule and checkpointing stay Lightning's.
        return sum((p * grads[n]).sum() for n, p in self.model.named_parameters() if p.requires_grad)

    def _count_loss(self, loss: torch.Tensor, samples: int) -> None:
        self.loss_sum = self.loss_sum.to(loss.device)  # on the training device: reduced there (NCCL on GPUs)
        self.loss_sum += torch.stack([loss.float() * samples, loss.new_tensor(float(samples))])

    def on_train_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self.loss_sum.clone(), reduce_op="sum")  # over processes
        self.log("train_loss", float(total[0] / total[1].clamp_min(1)), prog_bar=True)
        self.loss_sum.zero_()

    def on_before_optimizer_step(self, optimizer) -> None:
        dp, defense = self.scheme.dp, self.scheme.defense
        if defense is not None:  # as a client would defend its update: on the averaged gradient
            grads = {n: p.grad for n, p in self.model.named_parameters() if p.grad is not None}
            for name, g in defended(grads, defense).items():
                grads[name].copy_(g)
            return
        if dp is None or dp.kind != "batch":
            return
        # The original's clip-noise, after the gradient is averaged over processes, with the same
        # noise on every process (the original drew it per process, and its replicas drifted apart).
        grads = {n: p.grad for n, p in self.model.named_parameters() if p.grad is not None}
        noisy = batch_clip_noise_gradient(
            grads, dp.clip, dp.sigma, generator(Draw.TRAINING_CLIP_NOISE, self.seed, self.global_step)
        )
        for name, g in grads.items():
            g.copy_(noisy[name])

    def validation_step(self, batch, _index):
        images, labels = batch
        self.test_accuracy.update(self.model(images).argmax(1), labels)

    def on_validation_epoch_end(self):
        accuracy = self.test_accuracy.compute()  # synchronised over processes
        self.test_accuracy.reset()
        self.last_test_accuracy = float(accuracy)
        self.log("test_accuracy", accuracy, prog_bar=True)
        if self.per_sample_dp and self.trainer.state.fn == "fit":
            self.log("epsilon", self.privacy(self.trainer.global_step)["epsilon"])

    def privacy(self, steps: int) -> dict[str, Any]:
        """What the scheme guarantees after `steps` optimizer steps, for the checkpoint's metadata."""
        dp = self.scheme.dp
        if dp is None:
            return {}
        if dp.kind == "batch":
            return {"guarantee": "none (batch clipping, not DP-SGD)", "clip": dp.clip, "sigma": dp.sigma}
        assert dp.delta is not None  # per-sample DP has one (pipeline.config)
        found = epsilons(dp.sigma, self.sample_rate, steps, dp.delta)
        guarantee, accountant = tightest(found)
        return {
            "guarantee": "(epsilon, delta)-DP",
            "epsilon": round(guarantee, 6),
            "accountant": accountant,  # whose epsilon it is; both stated beside it
            **{f"epsilon_{name}": round(value, 6) for name, value in found.items()},
            "delta": dp.delta,
            "sigma": dp.sigma,
            "clip": dp.clip,
            "sample_rate": round(self.sample_rate, 8),
            "steps": steps,
        }

    def configure_optimizers(self):
        opt = torch.optim.SGD(
            self.model.parameters(),
            lr=self.scheme.lr or self.hp.lr,
            momentum=self.hp.momentum,
            weight_decay=self.hp.weight_decay,
        )
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=self.hp.lr_milestones, gamma=self.hp.lr_gamma)
        return [opt], [sched]


class Checkpoints(Callback):
    """Write the weights before training (epoch 0), after every epoch's evaluation, and after
    each of `steps` optimizer steps (with the test accuracy there).

    After each epoch the whole training state (optimizer momentum, schedule, loop counters)
    is saved too, so a killed run resumes from its last finished epoch; the step checkpoints
    of the epoch it redoes are written again with the same bytes (a run is deterministic).
    Only the first process writes; with asynchronous BatchNorm its running statistics are
    the ones saved (`bn_state_rank` in the metadata).
    """

    def __init__(self, folder: Path, meta: dict[str, Any], steps: list[int]):
        self.folder, self.meta, self.steps = folder, meta, set(steps)

    def write(self, trainer: L.Trainer, module: Classifier, checkpoint: str, epoch: int | None, accuracy: float):
        meta = {
            **self.meta,
            "checkpoint": checkpoint,
            "epoch": epoch,
            "step": trainer.global_step,
            "test_accuracy": round(accuracy, 6),
            **module.privacy(trainer.global_step),
        }
        save_checkpoint(self.folder / checkpoint_name(checkpoint), module.model, meta)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *_: Any) -> None:
        assert isinstance(module, Classifier)
        if trainer.global_step in self.steps:
            accuracy = module.test_accuracy_now()  # every process takes part
            if trainer.is_global_zero:
                self.write(trainer, module, step_checkpoint(trainer.global_step), None, accuracy)

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        assert isinstance(module, Classifier)
        if trainer.sanity_checking:
            return
        fitting = trainer.state.fn == "fit"
        epoch = trainer.current_epoch + 1 if fitting else 0
        if trainer.is_global_zero:
            self.write(trainer, module, epoch_checkpoint(epoch), epoch, module.last_test_accuracy)
        if fitting:  # every process takes part in saving the training state; the first one writes it
            partial = self.folder / f".{RESUME}.partial"
            trainer.save_checkpoint(partial, weights_only=False)  # the whole state: resume needs it
            if trainer.is_global_zero:
                os.replace(partial, self.folder / RESUME)


def strategy_options(train: TrainParams, scheme: SchemeParams) -> dict[str, Any]:
    """Trainer arguments for the scheme's BatchNorm across processes."""
    accelerator = resolve_accelerator(train.accelerator, "train.accelerator", train.devices)
    options: dict[str, Any] = {
        "accelerator": accelerator,
        "devices": train.devices,
        "num_nodes": train.num_nodes,
        "precision": train.precision,
    }
    if train.devices * train.num_nodes == 1:
        return options
    on_gpu = accelerator == "gpu"
    # async: each process keeps its own BatchNorm buffers (DDP broadcasts rank 0's by default)
    options["strategy"] = DDPStrategy(broadcast_buffers=scheme.norm != "batch-async")
    if scheme.norm == "batch-sync":
        if on_gpu:
            options["sync_batchnorm"] = True  # torch's SyncBatchNorm
        else:
            options["plugins"] = [CrossProcessSyncBatchNorm()]  # torch's refuses CPU tensors
    return options


def dataset_of(split: Images, mean: list[float], std: list[float], augment: bool) -> TensorDataset | StreamedImages:
    """Images in memory, normalised once; or a streamed index, decoded (and, `augment`, cropped at
    random) as batches are drawn."""
    if isinstance(split, Split):
        return TensorDataset(normalise(split.images, mean, std), split.labels)
    assert isinstance(split, ImageIndex)
    return StreamedImages(split, mean, std, augment)


def architecture(
    params: Params, scheme: SchemeParams, data_meta: dict[str, Any], maxpool_kernel: int | None
) -> dict[str, Any]:
    """The arguments of `build_model` for this scheme, as checkpoints record them."""
    return {
        "arch": params.model.arch,
        "in_channels": data_meta["channels"],
        "num_classes": len(data_meta["classes"]),
        "image_size": data_meta["image_size"],
        "norm": "group" if scheme.norm == "group" else "batch",
        "maxpool_kernel": maxpool_kernel,
        **({"bottleneck": scheme.bottleneck.model_dump()} if scheme.bottleneck is not None else {}),
    }


def train(
    train_split: Images,
    test_split: Images,
    data_meta: dict[str, Any],
    params: Params,
    scheme_name: str,
    out_dir: Path,
    maxpool_kernel: int | None = None,
    logger: Any = False,
) -> list[dict[str, Any]]:
    """Train under scheme `scheme_name`; checkpoints go to `out_dir`. Returns their metadata.

    If `out_dir` holds the training state of an interrupted run, training resumes from it.
    """
    scheme = params.scheme(scheme_name)
    options = strategy_options(params.train, scheme)  # first: a gpu asked for and absent is refused before any work
    L.seed_everything(params.seed, workers=True, verbose=False)
    arch = architecture(params, scheme, data_meta, maxpool_kernel)
    model = build_model(**arch)
    processes = params.train.devices * params.train.num_nodes
    meta = {
        **arch,
        "scheme": scheme_name,
        "mean": data_meta["mean"],
        "std": data_meta["std"],
        "bn": {"batch-sync": "sync", "batch-async": "async", "group": "none"}[scheme.norm],
        "processes": processes,
        "global_batch": params.train.batch_size * scheme.batch_multiplier,
        **({"bn_state_rank": 0} if scheme.norm == "batch-async" and processes > 1 else {}),
        **({"defense": scheme.defense.model_dump()} if scheme.defense is not None else {}),
        **({"lr": scheme.lr} if scheme.lr is not None else {}),
    }
    mean, std = data_meta["mean"], data_meta["std"]
    train_set, test_set = (
        dataset_of(s, mean, std, augment) for s, augment in ((train_split, True), (test_split, False))
    )
    module = Classifier(model, train_set, test_set, len(data_meta["classes"]), params, scheme)
    last = params.train.epochs * module.steps_per_epoch(processes)
    beyond = [s for s in params.train.checkpoint_steps if s > last]
    if beyond:
        raise PipelineError(
            f"train.checkpoint_steps: step {beyond[0]} is past the last of {scheme_name}'s run "
            f"({params.train.epochs} epochs of {module.steps_per_epoch(processes)} steps: {last})"
        )
    trainer = L.Trainer(
        **options,
        max_epochs=params.train.epochs,
        deterministic=True,
        logger=logger,
        callbacks=[Checkpoints(out_dir, meta, params.train.checkpoint_steps)],
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the module builds its own per-process samplers
        default_root_dir=out_dir,
    )
    resume = out_dir / RESUME
    if resume.is_file():
        print(f"train: resuming after epoch {len(list(out_dir.glob('epoch-*.json'))) - 1} of an interrupted run")
    else:
        trainer.validate(module, verbose=False)
    if params.train.epochs:
        trainer.fit(module, ckpt_path=resume if resume.is_file() else None, weights_only=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # the resume file goes only when every process is done with it
    if trainer.is_global_zero:
        resume.unlink(missing_ok=True)
    return written_checkpoints(out_dir)
