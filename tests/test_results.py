"""The results' statistics: scipy's numbers, the pairing, the verdict rule, stable bytes."""

import io

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pipeline.errors import PipelineError
from pipeline.results import (
    SHARED,
    Evidence,
    add_classic,
    add_differences,
    hyperparameters_of,
    mean_interval,
    paired,
    results_table,
    shown_summary,
    summary_of,
    table_differences,
    verdict_at,
    wilcoxon_p,
)

EVIDENCE = Evidence(confidence=0.95, resamples=2000, alpha=0.05, seed=7)


def test_the_interval_is_scipys_bootstrap_and_near_the_normal_one_on_a_large_sample():
    x = np.random.default_rng(0).normal(20, 4, size=400)
    ours = mean_interval(x, EVIDENCE)
    theirs = stats.bootstrap(
        (x,), np.mean, confidence_level=0.95, n_resamples=2000, method="BCa", rng=np.random.default_rng(7)
    ).confidence_interval
    assert ours == (theirs.low, theirs.high)
    half = 1.959964 * x.std(ddof=1) / np.sqrt(len(x))  # the reference: mean +- z * s / sqrt(n)
    assert ours[0] == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert ours[1] == pytest.approx(x.mean() + half, abs=0.1 * half)
    assert mean_interval(x, EVIDENCE) == ours  # seeded
    assert mean_interval([3.0, 3.0, 3.0], EVIDENCE) == (3.0, 3.0) and np.isnan(mean_interval([1.0], EVIDENCE)[0])


def test_the_paired_test_is_scipys_wilcoxon():
    d = np.array([-3.1, -0.4, -2.2, 0.7, -5.0, -1.3, -2.8, -0.9, 0.2, -4.4, -1.7, -2.5])
    assert wilcoxon_p(d) == stats.wilcoxon(d).pvalue
    assert wilcoxon_p(d) < 0.01  # 10 of 12 negative, the positive ones small
    assert wilcoxon_p(np.zeros(5)) == 1.0


def _per_image(shift: dict[str, float], victims_of=lambda setting, trial, image: 10 * trial + image) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for epoch in (0, 3):
        base = rng.normal(25 if epoch == 0 else 12, 4, size=(4, 4))
        for setting, delta in shift.items():
            noise = rng.normal(0, 0.5, size=(4, 4))
            for t in range(4):
                for i in range(4):
                    rows.append(
                        {
                            "setting": setting,
                            "upload": f"epoch-{epoch:03d}-trial-{t:02d}",
                            "epoch": epoch,
                            "trial": t,
                            "image": i,
                            "victim": victims_of(setting, t, i),
                            "gir": 25.0,
                            "psnr": base[t, i] + (delta if epoch == 0 else 0) + noise[t, i],
                            "ssim": 0.5,
                            "mse": 0.01,
                            "lpips": np.nan,
                            "converged": True,
                        }
                    )
    return pd.DataFrame(rows)


def _uploads(per_image: pd.DataFrame, unconverged: set = frozenset()) -> pd.DataFrame:
    u = per_image.drop_duplicates(["setting", "upload"])[["setting", "upload", "epoch", "trial"]].copy()
    u["label_accuracy"], u["gh"], u["epsilon"], u["iterations"], u["iterations_run"] = 1.0, 0.1, np.nan, 500, 500
    u["hyperparameters"] = "fixed"
    u["converged"] = [(s, e) not in unconverged for s, e in zip(u.setting, u.epoch)]
    return u


def _table(per_image, uploads, baseline="pure"):
    describe = lambda s, e, u: {"scheme": s, "test_accuracy": 0.8, "client": "B=4", "epsilon": None}  # noqa: E731
    table = results_table(per_image, uploads, describe, EVIDENCE, ["pure", "defended", "same"])
    return add_differences(table, per_image, baseline, lambda s: True, EVIDENCE)


def test_cells_pair_the_same_images_and_the_verdict_reads_interval_and_p():
    per_image = _per_image({"pure": 0.0, "defended": -6.0, "same": 0.0})
    table = _table(per_image, _uploads(per_image, unconverged={("same", 3)})).set_index(["setting", "epoch"])
    assert table.loc[("pure", 0), "n"] == 16 and table.loc[("pure", 0), "trials"] == 4
    cell = per_image[(per_image.setting == "defended") & (per_image.epoch == 0)].psnr
    assert table.loc[("defended", 0), "psnr"] == pytest.approx(cell.mean())
    assert (table.loc[("defended", 0), "psnr_low"], table.loc[("defended", 0), "psnr_high"]) == mean_interval(
        cell, EVIDENCE
    )
    both = paired(per_image, "defended", "pure", 0)
    assert table.loc[("defended", 0), "p_value"] == stats.wilcoxon(both.psnr - both.psnr_baseline).pvalue
    assert table.loc[("defended", 0), "psnr_diff"] == pytest.approx(-6.0, abs=0.5)
    assert verdict_at(table.loc[("defended", 0)].to_frame().T.assign(epoch=0).iloc[0], 0.05).startswith("protects:")
    assert verdict_at(table.loc[("same", 0)].to_frame().T.assign(epoch=0).iloc[0], 0.05).startswith("no detectable")
    training = pd.DataFrame({"scheme": ["pure", "defended", "same"], "epoch": 3, "test_accuracy": [0.9, 0.85, 0.9]})
    summary = summary_of(table.reset_index(), training, EVIDENCE, "pure").set_index("setting")
    assert summary.loc["pure", "verdict"] == "baseline"
    assert summary.loc["defended", "verdict"].startswith("epoch 0: protects: -6.")
    assert "epoch 3: no detectable protection" in summary.loc["defended", "verdict"]
    assert summary.loc["same", "verdict"].endswith("rests on 4 unconverged attack(s)")
    assert summary.loc["defended", "accuracy_cost"] == pytest.approx(0.05)


def test_a_trial_that_holds_other_victims_is_not_paired():
    per_image = _per_image({"pure": 0.0, "defended": -6.0}, victims_of=lambda s, t, i: 10 * t + i + (s == "defended"))
    with pytest.raises(PipelineError, match="a trial holds other victims in the two settings"):
        paired(per_image, "defended", "pure", 0)


def test_without_a_baseline_the_table_has_no_paired_numbers_and_says_so():
    per_image = _per_image({"pure": 0.0, "defended": -6.0, "same": 0.0})
    table = _table(per_image, _uploads(per_image), baseline=None)
    assert table.psnr_diff.isna().all() and table.p_value.isna().all()
    summary = summary_of(
        table, pd.DataFrame({"scheme": ["pure"], "epoch": [3], "test_accuracy": [0.9]}), EVIDENCE, None
    )
    assert set(summary.verdict) == {"no baseline (report.baseline: null): compare the intervals"}


def test_the_same_inputs_give_the_same_table_bytes():
    per_image = _per_image({"pure": 0.0, "defended": -6.0, "same": 0.0})
    texts = []
    for _ in range(2):
        buffer = io.StringIO()
        _table(per_image, _uploads(per_image)).to_csv(buffer, index=False)
        texts.append(buffer.getvalue())
    assert texts[0] == texts[1]


def test_table_differences_find_a_changed_value_and_ignore_row_order_and_extra_columns():
    per_image = _per_image({"pure": 0.0, "defended": -6.0, "same": 0.0})
    ours = _table(per_image, _uploads(per_image)).assign(mse=0.01, ssim=0.5, lpips=None)
    theirs = ours.sample(frac=1, random_state=0).assign(attack_seconds=1.0)
    assert table_differences(ours, theirs) == []
    theirs.loc[(theirs.setting == "same") & (theirs.epoch == 0), "psnr"] += 0.5
    assert len(table_differences(ours, theirs)) == 1 and table_differences(ours, theirs)[0].startswith(
        "same epoch 0: psnr"
    )
    assert table_differences(ours, theirs[theirs.epoch == 0])[0].startswith("rows differ")
    assert {"iterations_run", "unconverged"} <= set(SHARED)


def test_the_classic_attackers_cells_sit_beside_the_adaptive_ones_and_leave_the_verdict_alone():
    """Where the classic attacker ran apart (here: on `defended`, 6 dB lower) its own mean and
    interval are shown; elsewhere the one attack is both; the verdict is the adaptive one's."""
    adaptive = _per_image({"pure": 0.0, "defended": 0.0}).assign(attacker="adaptive")
    classic = _per_image({"defended": -6.0}).assign(attacker="classic")
    table = add_classic(_table(adaptive, _uploads(adaptive)), pd.concat([adaptive, classic]), EVIDENCE)
    cells = table.set_index(["setting", "epoch"])
    mine = classic[classic.epoch == 0].psnr
    assert cells.loc[("defended", 0), "classic_separate"]
    assert cells.loc[("defended", 0), "classic_psnr"] == pytest.approx(mine.mean())
    assert (
        cells.loc[("defended", 0), "classic_psnr_low"],
        cells.loc[("defended", 0), "classic_psnr_high"],
    ) == mean_interval(mine, EVIDENCE)
    assert not cells.loc[("pure", 0), "classic_separate"]
    assert cells.loc[("pure", 0), "classic_psnr"] == cells.loc[("pure", 0), "psnr"]
    training = pd.DataFrame({"scheme": ["pure", "defended"], "epoch": 3, "test_accuracy": [0.9, 0.9]})
    summary = summary_of(table, training, EVIDENCE, "pure")
    assert summary.set_index("setting").loc["defended", "verdict"].startswith("epoch 0: no detectable protection")
    shown = shown_summary(summary).set_index("setting")
    assert shown.loc["pure", "classic epoch 0"] == "same attack"
    assert shown.loc["defended", "classic epoch 0"].startswith(f"{mine.mean():.1f} [")


def test_the_summary_names_tuned_hyperparameters_and_only_then_has_the_column():
    assert hyperparameters_of({"tuned": None}) == "fixed"
    assert hyperparameters_of({"tuned": {"lr": 0.123456, "tv_weight": 0.001}}) == "tuned: lr 0.123, tv_weight 0.001"
    per_image = _per_image({"pure": 0.0, "defended": -6.0})
    training = pd.DataFrame({"scheme": ["pure", "defended"], "epoch": 3, "test_accuracy": [0.9, 0.9]})
    fixed = _uploads(per_image)
    summary = summary_of(_table(per_image, fixed), training, EVIDENCE, "pure")
    assert "attack hyper-parameters" not in shown_summary(summary)
    tuned = fixed.assign(hyperparameters=["tuned: lr 0.2" if s == "pure" else "fixed" for s in fixed.setting])
    shown = shown_summary(summary_of(_table(per_image, tuned), training, EVIDENCE, "pure")).set_index("setting")
    assert shown.loc["pure", "attack hyper-parameters"] == "tuned: lr 0.2"
    assert shown.loc["defended", "attack hyper-parameters"] == "fixed"
