"""The attack as one service: an attack stage reads each upload and each checkpoint once, whichever
attackers and restarts then work on it, and the target it builds says what the attacker models."""

import shutil
from collections import Counter
from pathlib import Path

import torch

import pipeline.files
from pipeline.attack.service import attack_uploads, attackers
from pipeline.attack.target import Target, Victim
from pipeline.uploads import CLASSIC, upload_name
from stages._common import Stage, _NoTracking
from tests.conftest import make_params
from tests.helpers import attack_params, make_upload

SETTING = "async-bn"  # two participants, each normalising its own shard: both attackers run


def _project(root: Path) -> list[Path]:
    """uploads/async-bn/ with two trials at epoch 0, their checkpoints in checkpoints/."""
    made = []
    for trial in range(2):
        gen = torch.Generator().manual_seed(trial)
        images, labels = torch.randn(4, 1, 32, 32, generator=gen), torch.tensor([0, 1, 2, 3])
        (root / "checkpoints").mkdir(parents=True, exist_ok=True)
        path = make_upload(root / "checkpoints", images, labels, participants=2, bn="async", name=f"t{trial}")
        target = root / "uploads" / SETTING / upload_name("epoch-000", trial)
        target.parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".safetensors", ".json"):
            shutil.move(path.with_suffix(suffix), target.with_suffix(suffix))
        made.append(target)
    return made


def test_an_attack_stage_reads_each_upload_and_each_checkpoint_once(tmp_path, monkeypatch):
    import stages.attack

    uploads = _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    reads: Counter[str] = Counter()
    verified = pipeline.files.load_meta

    def counted(path, *args, **kwargs):
        reads[f"{Path(path).parent.name}/{Path(path).name}"] += 1
        return verified(path, *args, **kwargs)

    monkeypatch.setattr(pipeline.files, "load_meta", counted)
    params = make_params(
        attack__iterations=3,
        attack__restarts=2,
        attack__processes=1,
        attack__threads=1,
        attack__classic=True,
        attack__client_model="exact",
        attack__hyperparameters="fixed",
    )
    stages.attack.main(Stage("attack", params, tmp_path, params.setting(SETTING)[0], SETTING, _NoTracking()))
    done = sorted(p.name for p in (tmp_path / "attacks" / SETTING).rglob("*.safetensors"))
    assert done == sorted([u.name for u in uploads] * 2)  # the adaptive and the classic attacker, each upload
    assert len(list((tmp_path / "attacks" / SETTING / CLASSIC).glob("*.safetensors"))) == len(uploads)
    # 2 attackers x 2 restarts on each upload, and one read of each upload and of its checkpoint
    files = [f"{SETTING}/{u.name}" for u in uploads] + ["t0/epoch-000.safetensors", "t1/epoch-000.safetensors"]
    assert {name: reads[name] for name in files} == dict.fromkeys(files, 1)


def test_the_adaptive_target_models_the_shards_and_the_classic_one_does_not(tmp_path):
    (path,) = _project(tmp_path)[:1]
    victim = Victim.load(path)
    adaptive = attack_params(attack__client_model="exact", attack__classic=True)
    runs = attackers(adaptive, [victim])
    assert [sub for sub, _, _ in runs] == ["", CLASSIC]
    assert Target.of(victim, runs[0][1]).shards == 2 and Target.of(victim, runs[1][1]).shards == 1
    assert torch.equal(Target.of(victim, runs[0][1]).labels, torch.tensor([0, 1, 2, 3]))  # revealed: known


def test_attacking_twice_from_the_same_victims_gives_the_same_bytes(tmp_path):
    victims = [Victim.load(p) for p in _project(tmp_path)]
    a = attack_params(attack__iterations=5, attack__combine="mlco")
    first = attack_uploads(victims, a, 0, tmp_path / "one")
    second = attack_uploads(victims, a, 0, tmp_path / "two")
    for x, y in zip(first, second):
        assert torch.equal(x.reconstruction.images, y.reconstruction.images)
        assert x.reconstruction.sources == y.reconstruction.sources and len(x.restarts) == 2
