"""Training under a defense scheme with Lightning, a weights-only checkpoint every epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from pipeline.checkpoints import checkpoint_name, save_checkpoint
from pipeline.config import Params
from pipeline.data import Split, normalise
from pipeline.files import atomic_file, read_json
from pipeline.nets import build_model


class Classifier(L.LightningModule):
    def __init__(self, model: torch.nn.Module, num_classes: int, params: Params):
        super().__init__()
        self.model = model
        self.hp = params.train
        self.test_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.last_test_accuracy = float("nan")

    def training_step(self, batch, _index):
        images, labels = batch
        loss = F.cross_entropy(self.model(images), labels)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch, _index):
        images, labels = batch
        self.test_accuracy.update(self.model(images).argmax(1), labels)

    def on_validation_epoch_end(self):
        accuracy = self.test_accuracy.compute()  # synchronised over processes
        self.test_accuracy.reset()
        self.last_test_accuracy = float(accuracy)
        self.log("test_accuracy", accuracy, prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.SGD(
            self.model.parameters(), lr=self.hp.lr, momentum=self.hp.momentum, weight_decay=self.hp.weight_decay
        )
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=self.hp.lr_milestones, gamma=self.hp.lr_gamma)
        return [opt], [sched]


RESUME = "resume.ckpt"  # the full training state, beside the checkpoints until training ends


class EpochCheckpoints(Callback):
    """Write the weights before training (epoch 0) and after every epoch's evaluation.

    After each epoch the whole training state (optimizer momentum, schedule, loop counters)
    is saved too, so a killed run resumes where it stopped and ends with the same weights.
    """

    def __init__(self, folder: Path, meta: dict[str, Any]):
        self.folder, self.meta = folder, meta

    def on_validation_end(self, trainer: L.Trainer, module: Classifier) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch + 1 if trainer.state.fn == "fit" else 0
        meta = {**self.meta, "epoch": epoch, "test_accuracy": round(module.last_test_accuracy, 6)}
        save_checkpoint(self.folder / checkpoint_name(epoch), module.model, meta)
        if trainer.state.fn == "fit":
            with atomic_file(self.folder / RESUME) as tmp:
                trainer.save_checkpoint(tmp)


def _loader(split: Split, mean: list[float], std: list[float], batch_size: int, seed: int | None) -> DataLoader:
    dataset = TensorDataset(normalise(split.images, mean, std), split.labels)
    if seed is None:
        return DataLoader(dataset, batch_size=batch_size)
    # The order of epoch e is a function of (seed, e) alone, so a resumed run sees the same batches.
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


def train(
    train_split: Split,
    test_split: Split,
    data_meta: dict[str, Any],
    params: Params,
    out_dir: Path,
    logger: Any = False,
) -> list[dict[str, Any]]:
    """Train `params.model.arch` on the split; checkpoints go to `out_dir`. Returns their metadata.

    If `out_dir` holds the training state of an interrupted run, training resumes from it.
    """
    L.seed_everything(params.seed, workers=True, verbose=False)
    num_classes = len(data_meta["classes"])
    arch = {
        "arch": params.model.arch,
        "in_channels": data_meta["channels"],
        "num_classes": num_classes,
        "image_size": data_meta["image_size"],
    }
    model = build_model(**arch)
    meta = {**arch, "scheme": params.train.scheme, "mean": data_meta["mean"], "std": data_meta["std"]}
    checkpoints = EpochCheckpoints(out_dir, meta)
    trainer = L.Trainer(
        accelerator=params.train.accelerator,
        devices=params.train.devices,
        max_epochs=params.train.epochs,
        deterministic=True,
        logger=logger,
        callbacks=[checkpoints],
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=out_dir,
    )
    module = Classifier(model, num_classes, params)
    mean, std = data_meta["mean"], data_meta["std"]
    test_loader = _loader(test_split, mean, std, 256, seed=None)
    resume = out_dir / RESUME
    if resume.is_file():
        print(f"train: resuming after epoch {len(list(out_dir.glob('epoch-*.json'))) - 1} of an interrupted run")
    else:
        trainer.validate(module, test_loader, verbose=False)
    if params.train.epochs:
        train_loader = _loader(train_split, mean, std, params.train.batch_size, params.seed)
        trainer.fit(module, train_loader, test_loader, ckpt_path=resume if resume.is_file() else None, weights_only=True)
    resume.unlink(missing_ok=True)
    return [read_json(p) for p in sorted(out_dir.glob("epoch-*.json"))]
