"""Uploads that are one measurement under two names are found by content and attacked once."""

import shutil

from pipeline.copies import find_copies
from pipeline.files import read_json, write_json

ATTACK = {"iterations": 500, "lr": 0.1}


def _as(path, folder, setting, scheme):
    """The same upload filed under another setting and scheme: other names, the same bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / "epoch-000-trial-00.safetensors"
    shutil.copy2(path, dst)
    meta = read_json(path.with_suffix(".json"))
    write_json(
        dst.with_suffix(".json"),
        {**meta, "setting": setting, "scheme": scheme, "checkpoint": f"models/{scheme}/epoch-000.safetensors"},
    )
    return dst


def test_an_identical_upload_under_another_name_is_a_copy_of_the_first(upload_file, tmp_path):
    a = _as(upload_file, tmp_path / "async-bn", "async-bn", "pure")
    b = _as(upload_file, tmp_path / "gh", "gh", "gh")
    found = find_copies({"async-bn": [a], "gh": [b]}, {"async-bn": ATTACK, "gh": ATTACK})
    assert found["async-bn"] == {}
    assert found["gh"] == {
        "epoch-000-trial-00": {
            "setting": "async-bn",
            "upload": "epoch-000-trial-00",
            "checkpoint": "epoch-000",
            "trial": 0,
        }
    }


def test_another_attack_client_or_a_tuned_attack_makes_no_copy(upload_file, tmp_path):
    a = _as(upload_file, tmp_path / "pure", "pure", "pure")
    b = _as(upload_file, tmp_path / "pure-2x", "pure-2x", "pure")
    assert (
        find_copies({"pure": [a], "pure-2x": [b]}, {"pure": ATTACK, "pure-2x": {**ATTACK, "iterations": 1000}})[
            "pure-2x"
        ]
        == {}
    )
    assert find_copies({"pure": [a], "pure-2x": [b]}, {"pure": ATTACK, "pure-2x": None})["pure-2x"] == {}
    meta = read_json(b.with_suffix(".json"))
    write_json(b.with_suffix(".json"), {**meta, "local_steps": 2})  # the same tensors from another client
    assert find_copies({"pure": [a], "pure-2x": [b]}, {"pure": ATTACK, "pure-2x": ATTACK})["pure-2x"] == {}
