"""The tools the README's findings cite, each on a small project made here: what it reads from
the working directory (params.yaml, uploads/ and truth/, a run's per-image table), what it
prints, and that a bad argument or a missing input is refused in one line (exit status 2)."""

import copy
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy import stats

from pipeline.checkpoints import epoch_checkpoint
from pipeline.data import to_unit_range
from pipeline.uploads import save_truth, upload_name
from tests.conftest import RAW_PARAMS
from tests.helpers import MEAN, STD, assert_one_line_failure, make_upload, noncentral_t_power

# tools.budget and tools.labels are imported in their tests: they drive the attack, and an
# attack that fails to import fails those tests, not the collection of the paired and power ones

EPOCHS, TRIALS, BATCH = (0, 3), 2, 4


def run_main(main, args: list[str], capsys) -> subprocess.CompletedProcess:
    """A tool's main(args) in this process, as a finished command line: exit status, stdout, stderr."""
    try:
        main(args)
        code = 0
    except SystemExit as exited:
        code = exited.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def write_params(root, **sections) -> None:
    """params.yaml with `sections`' keys changed, the attack small: 20 iterations, one restart, in this process."""
    raw = copy.deepcopy(RAW_PARAMS)
    raw["attack"].update(iterations=20, restarts=1, processes=1, threads=1)
    for section, changes in sections.items():
        raw[section].update(changes)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def made(tmp_path_factory, fashion_images):
    """uploads/pure and truth/pure as extract@pure leaves them: at each of two checkpoint epochs
    (the untrained ConvNet's), two plain client batches of four images of four distinct classes;
    the checkpoints in checkpoints/; and at the first epoch the same batches uploaded after two
    local steps (uploads/local-steps, truth/local-steps). Made once: the tools only read it."""
    root = tmp_path_factory.mktemp("project")
    images, labels, _, _ = fashion_images
    first = {c: int(torch.nonzero(labels == c)[0, 0]) for c in range(TRIALS * BATCH)}  # one image of each class
    uploads, truth = root / "uploads" / "pure", root / "truth" / "pure"
    for folder in (root / "checkpoints", uploads, truth):
        folder.mkdir(parents=True)
    for epoch in EPOCHS:
        for trial in range(TRIALS):
            chosen = torch.tensor([first[c] for c in range(trial * BATCH, (trial + 1) * BATCH)])
            name = upload_name(epoch_checkpoint(epoch), trial)
            stem = name.removesuffix(".safetensors")
            upload = make_upload(root / "checkpoints", images[chosen], labels[chosen], name=stem, epoch=epoch)
            for path in (upload, upload.with_suffix(".json")):
                path.rename(uploads / path.name)
            pixels = (to_unit_range(images[chosen], MEAN, STD) * 255).round().to(torch.uint8)
            save_truth(truth / name, pixels, labels[chosen], {"trial": trial, "setting": "pure"})
            if epoch == EPOCHS[0]:
                steps_uploads, steps_truth = root / "uploads" / "local-steps", root / "truth" / "local-steps"
                steps_uploads.mkdir(parents=True, exist_ok=True)
                steps_truth.mkdir(parents=True, exist_ok=True)
                batch = (images[chosen], labels[chosen])
                stepped = make_upload(root / "checkpoints", *batch, name=f"steps-{stem}", epoch=epoch, local_steps=2)
                stepped.rename(steps_uploads / name)
                stepped.with_suffix(".json").rename((steps_uploads / name).with_suffix(".json"))
                save_truth(steps_truth / name, pixels, labels[chosen], {"trial": trial, "setting": "local-steps"})
    write_params(root)
    return root


@pytest.fixture
def project(made, monkeypatch):
    """The made project as the working directory."""
    monkeypatch.chdir(made)
    # the attack's jobs, run in this process, set its torch threads and deterministic mode
    threads, mode = torch.get_num_threads(), torch.get_deterministic_debug_mode()
    yield made
    torch.set_num_threads(threads)
    torch.set_deterministic_debug_mode(mode)


def _table(stdout: str, skip: int) -> list[list[str]]:
    """The cells of a markdown table's rows, after `skip` lines (the title, the header, the rule)."""
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in stdout.splitlines()[skip:]]


# ---- tools.labels -------------------------------------------------------------------------------


def test_llg_recovers_every_label_of_a_plain_clients_batch_of_distinct_classes(project, capsys):
    """LLG reads one label off each negative row of the classifier's weight gradient: exact
    when no class repeats, at every checkpoint; the tool scores it against the truth."""
    from tools.labels import label_rows, main

    rows = label_rows("pure", ["llg", "counts"])
    assert [(r["method"], r["checkpoint"], r["uploads"]) for r in rows] == [
        (method, epoch_checkpoint(epoch), TRIALS) for method in ("llg", "counts") for epoch in EPOCHS
    ]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert [(r["accuracy"], r["exact"]) for r in rows if r["method"] == "llg"] == [(1.0, TRIALS)] * len(EPOCHS)
    done = run_main(main, ["pure", "--methods", "llg"], capsys)
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.splitlines()[0]
        == "pure: label accuracy by recovery method, mean over the uploads of each checkpoint"
    )
    assert _table(done.stdout, 3) == [
        ["llg", epoch_checkpoint(e), str(TRIALS), "1.000", f"{TRIALS}/{TRIALS}"] for e in EPOCHS
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["pure", "--methods", "llg,known"], "labels: error: --methods: unknown method 'known'; choose of llg, "),
        (["ra"], "labels: error: uploads/ra: no uploads (run `dvc repro extract@ra` first)"),
        (["sync"], "labels: error: unknown setting 'sync'; params.yaml defines pure, ra, "),
    ],
)
def test_labels_refuses_in_one_line(project, capsys, args, message):
    from tools.labels import main

    assert_one_line_failure(run_main(main, args, capsys), message)


# ---- tools.budget -------------------------------------------------------------------------------


def test_budget_prints_one_row_per_budget_and_epoch_over_every_image(project, capsys):
    from tools.budget import main

    done = run_main(main, ["pure", "--iterations", "5,10"], capsys)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pure: PSNR (dB) by attack budget, mean [t interval over the batches] of n images\n")
    rows = _table(done.stdout, 3)
    # iterations, restarts, combine, epoch, n (every image of the epoch's uploads), no difference without a second rule
    assert [r[:5] + r[6:8] for r in rows] == [
        [str(i), "1", "best", epoch_checkpoint(e), str(TRIALS * BATCH), "–", "–"] for i in (5, 10) for e in EPOCHS
    ]
    for r in rows:
        mean, low, high = (float(x) for x in r[5].replace("[", "").replace("]", "").replace(",", "").split())
        assert low <= mean <= high
        assert r[8].endswith(f"/{TRIALS}")  # unconverged of the batches


def test_budget_pairs_each_further_rule_with_the_first_batch_by_batch(project):
    from tools.budget import budget_rows

    best, mlco = budget_rows("pure", [10], [3], restarts=2, combines=("best", "mlco"))
    assert [(r["checkpoint"], r["combine"], r["restarts"], r["n"], r["batches"]) for r in (best, mlco)] == [
        ("epoch-003", "best", 2, TRIALS * BATCH, TRIALS),
        ("epoch-003", "mlco", 2, TRIALS * BATCH, TRIALS),
    ]
    assert "diff" not in best
    # batches of equal size: the mean of the per-batch differences is the difference of the means
    assert mlco["diff"] == pytest.approx(mlco["psnr"] - best["psnr"], abs=1e-9)
    assert mlco["diff_low"] <= mlco["diff"] <= mlco["diff_high"] and 0.0 <= mlco["p_value"] <= 1.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["pure", "--iterations", "0"], "budget: error: --iterations and --epochs take comma-separated positive"),
        (["pure", "--restarts", "2,3"], "budget: error: --iterations and --epochs take comma-separated positive"),
        (["pure", "--epochs", "x"], "budget: error: --iterations and --epochs take comma-separated positive"),
        (["pure", "--combine", "best,best"], "budget: error: --combine takes distinct rules of best, mlco"),
        (["pure", "--combine", "mean"], "budget: error: --combine takes distinct rules of best, mlco (got 'mean')"),
        (["ra"], "budget: error: uploads/ra: no uploads to attack (run `dvc repro extract@ra` first)"),
        (["pure", "--epochs", "1"], "budget: error: uploads/pure: no uploads to attack"),
    ],
)
def test_budget_refuses_in_one_line(project, capsys, args, message):
    from tools.budget import main

    assert_one_line_failure(run_main(main, args, capsys), message)


# ---- tools.defense_probe --------------------------------------------------------------------------


def test_defense_probe_attacks_each_defense_twice_and_pairs_by_batch(project, capsys):
    """Four defenses (pruning under both models), two attackers, two batches: one row a defense,
    every cell an interval, the undefended attack read from reports/per_image.csv (here made up:
    20 dB an image)."""
    from tools.defense_probe import main

    (project / "reports").mkdir(exist_ok=True)
    rows = [(t, i) for t in range(TRIALS) for i in range(BATCH)]
    pd.DataFrame(
        {
            "setting": "pure",
            "checkpoint": "epoch-000",
            "attacker": "adaptive",
            "trial": [t for t, _ in rows],
            "psnr": 20.0,
        }
    ).to_csv(project / "reports" / "per_image.csv", index=False)
    done = run_main(main, ["--trials", "2"], capsys)  # params.yaml's 20 iterations, as the undefended's
    assert done.returncode == 0, done.stderr
    table = _table(done.stdout, 3)
    assert [row[0] for row in table] == ["prune, magnitude", "prune, mask", "clip", "sign", "soteria"]
    assert all(row[1] == "2" and ", p " in row[4] and ", p " in row[5] for row in table)
    other_budget = run_main(main, ["--trials", "2", "--iterations", "5"], capsys)
    assert "no comparison with the undefended uploads" in other_budget.stdout
    assert "undefended" not in other_budget.stdout.splitlines()[1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--trials", "1"], "defense_probe: error: --trials takes at least 2"),
        (["--prune", "1.5"], "defense_probe: error: 1 validation error for PruningParams ratio Input should be less"),
        (["--trials", "3"], "defense_probe: error: uploads/pure/epoch-000-trial-02.safetensors: no such upload"),
    ],
)
def test_defense_probe_refuses_in_one_line(project, capsys, args, message):
    from tools.defense_probe import main

    assert_one_line_failure(run_main(main, args, capsys), message)


# ---- tools.local_steps_probe -----------------------------------------------------------------------


def test_local_steps_probe_attacks_with_each_model_and_pairs_by_batch(project, capsys):
    from tools.local_steps_probe import main

    done = run_main(main, ["--trials", "2"], capsys)
    assert done.returncode == 0, done.stderr
    table = _table(done.stdout, 3)
    assert [row[0] for row in table] == ["classic", "unrolled", "sme"]
    assert all(row[1] == "2" and float(row[3]) > 0 for row in table)
    assert ", p " in table[0][4] and table[1][4] == "" and ", p " in table[2][4]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--trials", "1"], "local_steps_probe: error: --trials takes at least 2"),
        (["--setting", "pure", "--trials", "2"], "local_steps_probe: error: pure: its client takes one local step"),
        (["--setting", "none"], "local_steps_probe: error: setting 'none' is not in params.yaml"),
        (["--trials", "3"], "local_steps_probe: error: uploads/local-steps/epoch-000-trial-02.safetensors: no such"),
    ],
)
def test_local_steps_probe_refuses_in_one_line(project, capsys, args, message):
    from tools.local_steps_probe import main

    assert_one_line_failure(run_main(main, args, capsys), message)


# ---- a run's per-image table: tools.paired and tools.power ----------------------------------------


def per_image(seed: int = 0, settings=("pure", "ra"), epochs=(0, 3), trials=6, images=4) -> pd.DataFrame:
    """A per_image.csv's columns: both attackers' scores of each image, the same victims in every
    setting's trial; each batch shares a draw (one attack of one upload)."""
    rng = np.random.default_rng(seed)
    rows = []
    for setting in settings:
        for epoch in epochs:
            batch = rng.normal(20, 3, trials)
            for attacker in ("adaptive", "classic"):
                for trial in range(trials):
                    for image in range(images):
                        rows.append(
                            {
                                "setting": setting,
                                "upload": upload_name(epoch_checkpoint(epoch), trial).removesuffix(".safetensors"),
                                "checkpoint": epoch_checkpoint(epoch),
                                "step": 157 * epoch,
                                "trial": trial,
                                "image": image,
                                "victim": 10 * trial + image,
                                "attacker": attacker,
                                "psnr": batch[trial] + rng.normal(0, 1),
                                "ssim": 0.5,
                                "mse": 0.01,
                                "lpips": np.nan,
                            }
                        )
    return pd.DataFrame(rows)


def _batch_means(frame: pd.DataFrame, setting: str, epoch: int, attacker: str = "adaptive") -> pd.Series:
    cell = frame[
        (frame.setting == setting) & (frame.checkpoint == epoch_checkpoint(epoch)) & (frame.attacker == attacker)
    ]
    return cell.groupby("trial").psnr.mean()


def test_paired_gives_scipys_paired_t_test_of_the_batch_means(tmp_path, monkeypatch, capsys):
    from tools.paired import main

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, report={"confidence": 0.9})
    base = per_image(0)
    shift = np.random.default_rng(1).normal(1.0, 1.0, len(base) // 4)  # one shift a batch: other's attack is better
    other = base.assign(psnr=base.psnr + np.repeat(shift, 4) + np.random.default_rng(2).normal(0, 0.5, len(base)))
    base.to_csv("base.csv", index=False)
    other.to_csv("other.csv", index=False)
    done = run_main(main, ["base.csv", "other.csv", "--settings", "ra"], capsys)
    assert done.returncode == 0, done.stderr
    assert "mean [90% t interval over batches]" in done.stdout.splitlines()[0]
    lines = done.stdout.splitlines()[3:]
    assert len(lines) == 2  # ra's two epochs, the adaptive attacker's images
    for line, epoch in zip(lines, (0, 3)):
        d = _batch_means(other, "ra", epoch) - _batch_means(base, "ra", epoch)
        test = stats.ttest_1samp(d, 0.0)
        ci = test.confidence_interval(0.9)
        assert line.startswith(f"| ra | {epoch_checkpoint(epoch)} | 6 | 24 | ")
        assert line.endswith(f"| {d.mean():+.2f} [{ci.low:+.2f}, {ci.high:+.2f}] | {test.pvalue:.2g} |")
    classic = run_main(main, ["base.csv", "other.csv", "--settings", "ra", "--attacker", "classic"], capsys)
    d = _batch_means(other, "ra", 0, "classic") - _batch_means(base, "ra", 0, "classic")
    assert f"| {stats.ttest_1samp(d, 0.0).pvalue:.2g} |" in classic.stdout.splitlines()[3]


def test_paired_refuses_runs_of_other_images_in_one_line(tmp_path, monkeypatch, capsys):
    from tools.paired import main

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path)
    per_image(0).to_csv("base.csv", index=False)
    per_image(1).iloc[1:].to_csv("short.csv", index=False)
    per_image(1).drop(columns="psnr").to_csv("scoreless.csv", index=False)
    assert_one_line_failure(
        run_main(main, ["base.csv", "short.csv"], capsys),
        "paired: error: the two runs hold other images (96 and 95 rows, 95 in common): they must share seed",
    )
    assert_one_line_failure(
        run_main(main, ["base.csv", "scoreless.csv"], capsys),
        "paired: error: scoreless.csv: not a per_image.csv (no column 'psnr')",
    )
    assert_one_line_failure(
        run_main(main, ["base.csv", "absent.csv"], capsys), "paired: error: absent.csv: not a readable per-image table"
    )
    assert_one_line_failure(
        run_main(main, ["base.csv", "base.csv", "--settings", "gh"], capsys),
        "paired: error: no cell of settings ['gh'] in both runs",
    )


def test_power_sizes_the_trials_by_the_spread_of_the_batch_mean_differences(tmp_path, monkeypatch, capsys):
    from tools.power import main

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path)
    frame = per_image(3, epochs=(0,), trials=8)
    (tmp_path / "reports").mkdir()
    frame.to_csv("reports/per_image.csv", index=False)
    assert_one_line_failure(
        run_main(main, [], capsys),
        "power: error: reports/results.csv: not found; the null cells are read from it (or pass --cells all)",
    )
    assert_one_line_failure(
        run_main(main, ["--cells", "all", "--family", "0"], capsys),
        "power: error: --family 0: a family holds at least one test",
    )
    done = run_main(main, ["--cells", "all", "--family", "4"], capsys)
    assert done.returncode == 0, done.stderr
    header, *rows = (r for i, r in enumerate(_table(done.stdout, 1)) if i != 1)  # less the rule
    rows = [dict(zip(header, r)) for r in rows]
    assert [r["cells"] for r in rows] == ["epoch 0", "all"] and rows[0]["batches"] == "8"
    # one paired cell (ra - pure), batches of equal size: the SD of one batch's mean difference,
    # from the variance components, is the SD of the batch means' differences
    d = _batch_means(frame, "ra", 0) - _batch_means(frame, "pure", 0)
    sd = float(d.std(ddof=1))
    assert float(rows[0]["batch SD"]) == pytest.approx(sd, rel=5e-3)
    for effect in (1, 2, 3):
        for column, alpha in ((f"{effect} dB", 0.05), (f"{effect} dB, alpha/4", 0.05 / 4)):
            n = int(rows[0][column])  # the fewest batches with the power asked for
            assert noncentral_t_power(effect / sd, n, alpha) >= 0.8 - 1e-3, column
            if n > 2:
                assert noncentral_t_power(effect / sd, n - 1, alpha) < 0.8, column


def test_from_mlflow_without_stage_runs_exits_2_with_one_error_line(tmp_path, monkeypatch, capsys):
    """The table rebuilt from MLflow: a store with no finished stage runs is an input error (exit 2),
    not a difference from the table (exit 1)."""
    from tools import from_mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: an earlier test's store would be read
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit) as stopped:
        from_mlflow.main(["--check"])
    assert stopped.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("from_mlflow:")]
    assert errors == [
        f"from_mlflow: error: sqlite:///{tmp_path}/mlflow.db: no finished stage runs in experiment "
        "'gradient-heterogeneity'"
    ]
