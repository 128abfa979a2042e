"""BatchNorm across two real processes (gloo): sync equals one process on the whole batch,
async equals each shard normalised on its own."""

import copy

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from pipeline.bn import CrossProcessSyncBatchNorm
from pipeline.nets import batchnorm_to_groupnorm, build_model

WORLD = 2


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 1, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)


def _model():
    torch.manual_seed(0)
    return build_model("convnet", 1, 10, 16)


def _worker(rank: int, bn: str, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    torch.use_deterministic_algorithms(True)
    model = _model()
    if bn == "sync":
        model = CrossProcessSyncBatchNorm().apply(model)
    ddp = DistributedDataParallel(model, broadcast_buffers=(bn == "sync"))
    images, labels = _batch()
    mine = slice(rank * 4, (rank + 1) * 4)  # contiguous shards, as the client splits its batch
    logits = ddp(images[mine])
    F.cross_entropy(logits, labels[mine]).backward()  # DDP averages the gradients over processes
    gathered = [torch.zeros_like(logits) for _ in range(WORLD)]
    dist.all_gather(gathered, logits.detach())
    if rank == 0:
        grads = {n: p.grad for n, p in model.named_parameters()}
        buffers = {n: b for n, b in model.named_buffers()}
        torch.save({"logits": torch.cat(gathered), "grads": grads, "buffers": buffers}, out)
    dist.destroy_process_group()


def _two_processes(bn: str, tmp_path) -> dict:
    out = tmp_path / f"{bn}.pt"
    mp.spawn(_worker, args=(bn, str(tmp_path / f"{bn}.store"), str(out)), nprocs=WORLD, join=True)
    return torch.load(out, weights_only=True)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_sync_batchnorm_over_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    got = _two_processes("sync", tmp_path)
    model = _model().train()
    images, labels = _batch()
    logits = model(images)
    F.cross_entropy(logits, labels).backward()
    torch.testing.assert_close(got["logits"], logits.detach(), rtol=1e-5, atol=1e-5)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for name, buf in model.named_buffers():  # running statistics of the global batch
        torch.testing.assert_close(got["buffers"][name].to(buf.dtype), buf, rtol=1e-5, atol=1e-6, msg=name)


def test_async_batchnorm_differs_and_equals_each_shard_on_its_own(tmp_path):
    got = _two_processes("async", tmp_path)
    images, labels = _batch()
    whole = _model().train()
    whole_logits = whole(images)
    assert (got["logits"] - whole_logits.detach()).abs().max() > 1e-2  # not the global batch's statistics

    shards = _model().train()
    per_shard = [shards(images[i * 4 : (i + 1) * 4]) for i in range(WORLD)]
    losses = [F.cross_entropy(out, labels[i * 4 : (i + 1) * 4]) for i, out in enumerate(per_shard)]
    (sum(losses) / WORLD).backward()  # what DDP's gradient averaging computes
    torch.testing.assert_close(got["logits"], torch.cat(per_shard).detach(), rtol=1e-5, atol=1e-5)
    for name, grad in _grads(shards).items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_one_process_cross_process_batchnorm_is_plain_batchnorm():
    images, labels = _batch()
    plain, synced = _model().train(), CrossProcessSyncBatchNorm().apply(_model()).train()
    torch.testing.assert_close(synced(images), plain(images))
    reverted = CrossProcessSyncBatchNorm().revert(copy.deepcopy(synced))
    assert type(reverted.features[1]) is torch.nn.BatchNorm2d
    assert set(reverted.state_dict()) == set(plain.state_dict())


def test_groupnorm_replaces_every_batchnorm():
    model = batchnorm_to_groupnorm(build_model("resnet18", 1, 10, 32))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) == 20
    # no batch coupling: a sample's output is the same alone or in the batch (so per-sample clipping is defined)
    images, _ = _batch()
    m = batchnorm_to_groupnorm(_model()).train()
    torch.testing.assert_close(m(images)[:1], m(images[:1]), rtol=1e-5, atol=1e-5)
