"""The results' statistics: the batch as the unit, scipy's and statsmodels' numbers, the pairing,
the family's correction, copies shown once, power, stable bytes."""

import io

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

from pipeline.errors import PipelineError
from pipeline.outputs import hyperparameters_of
from pipeline.presentation import shown_summary, shown_table
from pipeline.results import (
    add_classic,
    add_differences,
    add_family,
    add_floor,
    batch_differences,
    paired,
    results_table,
    settles,
    summary_of,
)
from pipeline.statistics import (
    Evidence,
    batch_means,
    batches_needed,
    detectable_difference,
    holm,
    t_estimate,
    t_test_power,
    variance_components,
)
from tests.helpers import noncentral_t_power
from tools.from_mlflow import SHARED, table_differences

EVIDENCE = Evidence(confidence=0.95, alpha=0.05, power=0.8, effect=2.0)
ORDER = ["pure", "defended", "same", "copy", "pure-2x"]


def test_the_interval_and_the_test_are_scipys_t_on_the_batch_means_and_agree():
    x = np.array([-3.1, -0.4, -2.2, 0.7, -5.0, -1.3, -2.8, -0.9])
    found = t_estimate(x, 0.95)
    theirs = stats.ttest_1samp(x, 0.0)
    ci = theirs.confidence_interval(0.95)
    assert (found.mean, found.low, found.high, found.p) == (x.mean(), ci.low, ci.high, theirs.pvalue)
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))  # by hand
    assert found.low == pytest.approx(x.mean() - half) and found.high == pytest.approx(x.mean() + half)
    for shift in np.linspace(-4, 4, 33):  # one procedure: the interval excludes 0 exactly when p < 0.05
        e = t_estimate(x + shift, 0.95)
        assert (e.p < 0.05) == (e.high < 0 or e.low > 0)
    assert np.isnan(t_estimate([1.0], 0.95).low) and t_estimate([0.0, 0.0, 0.0], 0.95).p == 1.0


def test_holm_is_statsmodels_multipletests():
    p = np.array([0.001, 0.04, 0.03, 0.2, 0.012, 0.5])
    assert np.array_equal(holm(p), multipletests(p, method="holm")[1])
    assert holm(p)[0] == pytest.approx(0.006)  # the smallest p times the family's size


def test_the_detectable_difference_and_the_batches_needed_are_statsmodels_power_solutions():
    sd, n, alpha = 1.6, 13, 0.05 / 14
    ours = detectable_difference(sd, n, alpha, 0.8)
    assert ours == pytest.approx(sd * TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=0.8))
    assert TTestPower().power(ours / sd, n, alpha) == pytest.approx(0.8, abs=1e-6)
    needed = batches_needed(sd, 2.0, 0.05, 0.8)
    assert TTestPower().power(2.0 / sd, needed, 0.05) >= 0.8 > TTestPower().power(2.0 / sd, needed - 1, 0.05)
    assert np.isnan(detectable_difference(sd, 1, alpha, 0.8))


@pytest.mark.parametrize("size", [0.3, 1.0, 1.5])
@pytest.mark.parametrize("batches", [2, 5, 16])
def test_the_t_test_power_is_statsmodels_power(size, batches):
    for alpha in (0.05, 0.05 / 27):
        assert t_test_power(size, batches, alpha) == pytest.approx(TTestPower().power(size, batches, alpha), abs=1e-8)


def test_the_t_test_power_holds_at_ten_million_batches():
    # Over [0, inf) the quadrature missed the chi's narrow peak here: 0.841 for 0.885, 0.047 for 0.05.
    assert t_test_power(0.001, 10**7, 0.05) == pytest.approx(noncentral_t_power(0.001, 10**7, 0.05), abs=1e-6)
    assert t_test_power(0.0, 10**7, 0.05) == pytest.approx(0.05, abs=1e-6)


@pytest.mark.parametrize(("batches", "family"), [(16, 22), (6, 22), (4, 27)])
def test_the_detectable_difference_has_the_power_at_few_batches(batches, family):
    # statsmodels' solver answers 2.77 SD at 6 batches over 22 tests (power 0.75) and 4.11 at 4
    # over 27 (power 0.40); the root of the power has the power, by scipy's noncentral t too.
    alpha = 0.05 / family
    size = detectable_difference(1.0, batches, alpha, 0.8)
    assert noncentral_t_power(size, batches, alpha) == pytest.approx(0.8, abs=1e-6)


def test_the_batches_needed_hold_where_the_power_solver_gives_up():
    # At 10 SDs and alpha 0.05 / 27 statsmodels' solver answers 2.000005 (so 3 batches, with
    # power 0.43), and at 50 SDs nan; the fewest batches with the power are 4 and 3.
    assert batches_needed(1.0, 10.0, 0.05 / 27, 0.8) == 4
    assert noncentral_t_power(10.0, 3, 0.05 / 27) < 0.8 <= noncentral_t_power(10.0, 4, 0.05 / 27)
    assert batches_needed(1.0, 50.0, 0.05 / 27, 0.8) == 3
    assert batches_needed(0.0, 1.0, 0.05, 0.8) == 2
    for sd, effect in ((float("nan"), 1.0), (1.0, float("nan")), (1.0, 0.0), (1.0, -1.0)):
        with pytest.raises(ValueError, match="no sample size"):
            batches_needed(sd, effect, 0.05, 0.8)
    for alpha, power in ((0.05, 1.0), (float("nan"), 0.8), (0.05, float("nan")), (0.9, 0.8)):
        with pytest.raises(ValueError, match="0 < alpha < power < 1"):
            batches_needed(1.0, 1.0, alpha, power)


def test_variance_components_recover_a_known_clustered_design():
    rng = np.random.default_rng(3)
    between, within, size = 1.2, 5.1, 4
    cells = []
    for _ in range(40):
        effects = rng.normal(0, np.sqrt(between), 50)
        rows = [(t, effects[t] + rng.normal(0, np.sqrt(within))) for t in range(50) for _ in range(size)]
        cells.append(pd.DataFrame(rows, columns=["trial", "d"]))
    c = variance_components(cells, "d")
    assert c.between == pytest.approx(between, rel=0.1) and c.within == pytest.approx(within, rel=0.05)
    assert c.icc == pytest.approx(between / (between + within), abs=0.03)
    assert c.batch_sd == pytest.approx(np.sqrt(between + within / size), rel=0.05)
    assert c.design_effect == pytest.approx(1 + 3 * c.icc)


def test_the_unit_matters_image_level_wilcoxon_passes_where_the_batch_level_test_does_not():
    """Four batches of four images, each batch one shared shift: the 16 images look like strong
    evidence, but they are four measurements."""
    rng = np.random.default_rng(5)
    shifts = np.array([-3.0, -2.0, -2.5, 1.0])
    d = np.repeat(shifts, 4) + rng.normal(0, 0.3, 16)
    frame = pd.DataFrame({"trial": np.repeat(np.arange(4), 4), "d": d})
    assert stats.wilcoxon(d).pvalue < 0.05
    batch = t_estimate(batch_means(frame, "d"), 0.95)
    assert batch.p > 0.05 and batch.low < 0 < batch.high


def _per_image(
    shift: dict[str, float], trials=6, victims_of=lambda setting, trial, image: 10 * trial + image, noise_sd=0.5
):
    rng = np.random.default_rng(1)
    rows = []
    for epoch in (0, 3):
        base = rng.normal(25 if epoch == 0 else 12, 4, size=(trials, 4)) + rng.normal(0, 2, size=(trials, 1))
        for setting, delta in shift.items():
            noise = rng.normal(0, noise_sd, size=(trials, 4))
            for t in range(trials):
                for i in range(4):
                    rows.append(
                        {
                            "setting": setting,
                            "upload": f"epoch-{epoch:03d}-trial-{t:02d}",
                            "checkpoint": f"epoch-{epoch:03d}",
                            "step": 157 * epoch,
                            "trial": t,
                            "image": i,
                            "victim": victims_of(setting, t, i),
                            "gir": 25.0,
                            "psnr": base[t, i] + (delta if epoch == 0 else 0) + noise[t, i],
                            "ssim": 0.5,
                            "mse": 0.01,
                            "lpips": np.nan,
                            "iip": float(i % 2),
                            "converged": True,
                        }
                    )
    return pd.DataFrame(rows)


def _uploads(per_image: pd.DataFrame, unconverged: set = frozenset()) -> pd.DataFrame:
    u = per_image.drop_duplicates(["setting", "upload"])[["setting", "upload", "checkpoint", "step", "trial"]].copy()
    u["label_accuracy"], u["gh"], u["epsilon"], u["iterations"], u["iterations_run"] = 1.0, 0.1, np.nan, 500, 500
    u.loc[u.setting == "pure-2x", "iterations"] = 1000
    u["hyperparameters"] = "fixed"
    u["converged"] = [(s, e) not in unconverged for s, e in zip(u.setting, u.checkpoint)]
    return u


def _describe(setting, checkpoint, uploads):
    return {"scheme": setting, "test_accuracy": 0.8, "client": "B=4", "epsilon": None, "privacy": ""}


def _table(per_image, uploads, baseline="pure", copies=None, budget=None):
    table = results_table(per_image, uploads, _describe, EVIDENCE, ORDER, copies)
    return add_family(add_differences(table, per_image, baseline, lambda s: True, EVIDENCE, budget), EVIDENCE)


FIRST, LAST = "epoch-000", "epoch-003"
TRAINING = pd.DataFrame({"scheme": ORDER, "epoch": 3, "test_accuracy": [0.9, 0.85, 0.9, 0.9, 0.9]})


def test_cells_are_batch_means_and_the_verdict_reads_the_holm_adjusted_paired_t_test():
    per_image = _per_image({"pure": 0.0, "defended": -6.0, "same": 0.0})
    table = _table(per_image, _uploads(per_image, unconverged={("same", LAST)})).set_index(["setting", "checkpoint"])
    assert table.loc[("pure", FIRST), "n"] == 24 and table.loc[("pure", FIRST), "trials"] == 6
    cell = per_image[(per_image.setting == "defended") & (per_image.checkpoint == FIRST)]
    means = cell.groupby("trial").psnr.mean().to_numpy()  # an independent computation of the batch means
    ci = stats.ttest_1samp(means, 0).confidence_interval(0.95)
    row = table.loc[("defended", FIRST)]
    assert row.psnr == pytest.approx(cell.psnr.mean())
    assert (row.psnr_low, row.psnr_high) == pytest.approx((ci.low, ci.high))
    both = paired(per_image, "defended", "pure", FIRST)
    d = (both.psnr - both.psnr_baseline).groupby(both.trial).mean().to_numpy()
    assert np.allclose(batch_differences(both), d)
    test = stats.ttest_1samp(d, 0)
    assert row.p_value == pytest.approx(test.pvalue) and row.paired_batches == 6
    family = table[table.role == "test"]
    assert len(family) == 4 and (table.family_size == 4).all()  # defended and same at two epochs
    assert np.allclose(family.p_adjusted, multipletests(family.p_value, method="holm")[1])
    assert row.effect == "protects" and row.psnr_diff == pytest.approx(-6.0, abs=0.5)
    same = table.loc[("same", FIRST)]
    assert same.effect == "none" and same.detectable == pytest.approx(
        detectable_difference(same.diff_sd, 6, 0.05 / 4, 0.8)
    )
    summary = summary_of(table.reset_index(), TRAINING, EVIDENCE, "pure").set_index("setting")
    assert summary.loc["pure", "verdict"] == "baseline"
    assert summary.loc["defended", "verdict"].startswith("epoch 0: protects: -6.")
    assert "epoch 3: no detectable effect" in summary.loc["defended", "verdict"]
    # the unconverged attacks qualify their own cell only
    assert summary.loc["same", "verdict"].endswith("; rests on 6 unconverged attack(s)")
    assert "unconverged" not in summary.loc["same", "verdict"].split("; epoch 3")[0]
    assert summary.loc["defended", "accuracy_cost"] == pytest.approx(0.05)
    shown = shown_table(table.reset_index()).set_index(["setting", "checkpoint"])  # checkpoints as "epoch 0"
    assert shown.loc[("defended", "epoch 0"), "verdict"] == "protects"
    assert shown.loc[("same", "epoch 0"), "verdict"].startswith("none (would detect >= ")


def test_a_client_side_defense_on_the_baselines_scheme_has_its_cost_not_measured():
    """`same` uploads from pure's checkpoints with a client that trains otherwise (a DP client):
    its cost is not 0.000 but not measured; `pure-2x` (the attack alone differs) keeps pure's 0."""
    from pipeline.sections import ClientDPParams, trains_like
    from tests.helpers import plain_client

    base = plain_client(4)
    dp = plain_client(4, mode="eval", dp=ClientDPParams(kind="per-sample", clip=1.0, sigma=0.1, delta=1e-5))
    assert trains_like(plain_client(4, upload_buffers=True), base) and not trains_like(dp, base)
    per_image = _per_image({"pure": 0.0, "defended": -6.0, "same": 0.0, "pure-2x": 0.0})
    table = _table(per_image, _uploads(per_image)).reset_index()
    table.loc[table.setting.isin(["same", "pure-2x"]), "scheme"] = "pure"  # on pure's checkpoints
    clients = {"pure": base, "defended": base, "same": dp, "pure-2x": base}
    summary = summary_of(table, TRAINING, EVIDENCE, "pure", lambda s: trains_like(clients[s], base))
    summary = summary.set_index("setting")
    assert summary.loc["defended", "accuracy_cost"] == pytest.approx(0.05)  # its own scheme: trained in
    assert summary.loc["pure-2x", "accuracy_cost"] == 0 and summary.loc["pure-2x", "cost_measured"]
    assert pd.isna(summary.loc["same", "accuracy_cost"]) and not summary.loc["same", "cost_measured"]
    shown = shown_summary(summary.reset_index()).set_index("setting")["cost vs baseline"]
    assert shown["same"] == "not measured" and float(shown["pure-2x"]) == 0


def test_too_few_batches_are_marked_underpowered():
    per_image = _per_image({"pure": 0.0, "same": 0.0}, trials=2, noise_sd=3.0)
    table = _table(per_image, _uploads(per_image)).set_index(["setting", "checkpoint"])
    assert table.loc[("same", FIRST), "underpowered"] and table.loc[("same", FIRST), "detectable"] > 2.0
    summary = summary_of(table.reset_index(), TRAINING, EVIDENCE, "pure").set_index("setting")
    assert "(underpowered for 2 dB)" in summary.loc["same", "verdict"]


def test_a_copied_cell_is_shown_once_and_stays_out_of_the_family():
    per_image = _per_image({"pure": 0.0, "defended": -6.0, "copy": -6.0})
    per_image = per_image[~((per_image.setting == "copy") & (per_image.checkpoint == FIRST))]  # attacked as defended's
    table = _table(per_image, _uploads(per_image), copies={("copy", FIRST): "defended"}).set_index(
        ["setting", "checkpoint"]
    )
    row = table.loc[("copy", FIRST)]
    assert row.same_upload_as == "defended" and row.role == "copy" and pd.isna(row.psnr) and pd.isna(row.p_value)
    assert (table.role == "test").sum() == 3 and table.loc[("copy", LAST), "role"] == "test"
    summary = summary_of(table.reset_index(), TRAINING, EVIDENCE, "pure").set_index("setting")
    assert summary.loc["copy", "verdict"].startswith("epoch 0: same upload as `defended`: measured there; epoch 3:")
    shown = shown_summary(summary.reset_index()).set_index("setting")
    assert shown.loc["copy", "PSNR epoch 0"] == "= defended"
    assert shown_table(table.reset_index()).set_index(["setting", "checkpoint"]).loc[
        ("copy", "epoch 0"), "PSNR dB"
    ] == ("same upload as defended")


def test_the_budget_row_states_the_attackers_gain_and_is_no_verdict():
    per_image = _per_image({"pure": 0.0, "defended": -6.0, "pure-2x": 3.0})
    table = _table(per_image, _uploads(per_image), budget="pure-2x").set_index(["setting", "checkpoint"])
    assert table.loc[("pure-2x", FIRST), "role"] == "budget" and pd.isna(table.loc[("pure-2x", FIRST), "p_adjusted"])
    assert (table.role == "test").sum() == 2
    summary = summary_of(table.reset_index(), TRAINING, EVIDENCE, "pure").set_index("setting")
    assert summary.loc["pure-2x", "verdict"].startswith("epoch 0: the attacker at 1000 iterations gains +3.")


def test_a_trial_that_holds_other_victims_is_not_paired():
    per_image = _per_image({"pure": 0.0, "defended": -6.0}, victims_of=lambda s, t, i: 10 * t + i + (s == "defended"))
    with pytest.raises(PipelineError, match="a trial holds other victims in the two settings"):
        paired(per_image, "defended", "pure", FIRST)


def test_without_a_baseline_the_table_has_no_paired_numbers_and_says_so():
    per_image = _per_image({"pure": 0.0, "defended": -6.0, "same": 0.0})
    table = _table(per_image, _uploads(per_image), baseline=None)
    assert table.psnr_diff.isna().all() and table.p_value.isna().all() and (table.family_size == 0).all()
    summary = summary_of(table, TRAINING, EVIDENCE, None)
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
    theirs.loc[(theirs.setting == "same") & (theirs.step == 0), "psnr"] += 0.5
    assert len(table_differences(ours, theirs)) == 1 and table_differences(ours, theirs)[0].startswith(
        "same step 0: psnr"
    )
    assert table_differences(ours, theirs[theirs.step == 0])[0].startswith("rows differ")
    assert {"iterations_run", "unconverged"} <= set(SHARED)


def test_the_classic_attackers_cells_sit_beside_the_adaptive_ones_and_leave_the_verdict_alone():
    """Where the classic attacker ran apart (here: on `defended`, 6 dB lower) its own mean and
    interval over batches are shown; elsewhere the one attack is both; the verdict is the adaptive one's."""
    adaptive = _per_image({"pure": 0.0, "defended": 0.0}).assign(attacker="adaptive")
    classic = _per_image({"defended": -6.0}).assign(attacker="classic")
    table = add_classic(_table(adaptive, _uploads(adaptive)), pd.concat([adaptive, classic]), EVIDENCE)
    cells = table.set_index(["setting", "checkpoint"])
    mine = classic[classic.checkpoint == FIRST]
    ci = stats.ttest_1samp(mine.groupby("trial").psnr.mean(), 0).confidence_interval(0.95)
    assert cells.loc[("defended", FIRST), "classic_separate"]
    assert cells.loc[("defended", FIRST), "classic_psnr"] == pytest.approx(mine.psnr.mean())
    assert (
        cells.loc[("defended", FIRST), "classic_psnr_low"],
        cells.loc[("defended", FIRST), "classic_psnr_high"],
    ) == (pytest.approx((ci.low, ci.high)))
    assert not cells.loc[("pure", FIRST), "classic_separate"]
    assert cells.loc[("pure", FIRST), "classic_psnr"] == cells.loc[("pure", FIRST), "psnr"]
    summary = summary_of(table, TRAINING, EVIDENCE, "pure")
    assert summary.set_index("setting").loc["defended", "verdict"].startswith("epoch 0: no detectable effect")
    shown = shown_summary(summary).set_index("setting")
    assert shown.loc["pure", "classic epoch 0"] == "same attack"
    assert shown.loc["defended", "classic epoch 0"].startswith(f"{mine.psnr.mean():.1f} [")


@pytest.mark.parametrize(
    "adaptive_shift, classic_shift, effect",
    [(-6.0, -6.0, "protects"), (-6.0, 0.0, "none"), (-6.0, 6.0, "none"), (6.0, 6.0, "leaks more")],
)
def test_a_verdict_of_effect_needs_both_attackers_where_both_ran(adaptive_shift, classic_shift, effect):
    """Intersection-union: the cell's p is the larger of the two attackers' paired t-tests (scipy's, on
    the batch means against the baseline's), 1 where their differences disagree in sign; a defense
    that only the adaptive attacker is beaten by is not credited, though the adaptive test alone is."""
    adaptive = _per_image({"pure": 0.0, "defended": adaptive_shift}).assign(attacker="adaptive")
    classic = adaptive[adaptive.setting == "defended"].assign(attacker="classic")
    batch_noise = np.random.default_rng(2).normal(0, 1.0, size=classic.trial.max() + 1)
    classic = classic.assign(psnr=classic.psnr + classic_shift - adaptive_shift + batch_noise[classic.trial])
    every = pd.concat([adaptive, classic])
    alone = _table(adaptive, _uploads(adaptive)).set_index(["setting", "checkpoint"])
    assert alone.loc[("defended", FIRST), "effect"] == ("protects" if adaptive_shift < 0 else "leaks more")
    table = results_table(adaptive, _uploads(adaptive), _describe, EVIDENCE, ORDER)
    table = add_differences(table, adaptive, "pure", lambda s: True, EVIDENCE)
    table = add_family(add_classic(table, every, EVIDENCE, "pure"), EVIDENCE)
    cell = table.set_index(["setting", "checkpoint"]).loc[("defended", FIRST)]
    base = adaptive[(adaptive.setting == "pure") & (adaptive.checkpoint == FIRST)].groupby("trial").psnr.mean()
    differences = {
        name: frame[(frame.setting == "defended") & (frame.checkpoint == FIRST)].groupby("trial").psnr.mean() - base
        for name, frame in (("adaptive", adaptive), ("classic", classic))
    }
    p = {name: stats.ttest_1samp(d, 0).pvalue for name, d in differences.items()}
    assert cell.p_value == pytest.approx(p["adaptive"]) and cell.classic_p_value == pytest.approx(p["classic"])
    agree = np.sign(differences["adaptive"].mean()) == np.sign(differences["classic"].mean())
    assert cell.p_verdict == pytest.approx(max(p.values()) if agree else 1.0)
    assert cell.effect == effect
    verdict = summary_of(table, TRAINING, EVIDENCE, "pure").set_index("setting").loc["defended", "verdict"]
    assert verdict.startswith(f"epoch 0: {'no detectable effect' if effect == 'none' else effect}")
    assert "classic attacker" in verdict.split("; epoch 3")[0]
    why = "the larger of the two attackers'" if agree else "the attackers disagree in sign"
    assert f"({why}; Holm" in verdict.split("; epoch 3")[0]
    pure = table.set_index(["setting", "checkpoint"]).loc[("pure", FIRST)]
    assert pd.isna(pure.classic_p_value)  # the baseline is no test
    if effect == "none":  # both attackers must detect it: each sized at power (1 + 0.8) / 2
        sds = [differences[name].std(ddof=1) for name in ("adaptive", "classic")]
        alpha = EVIDENCE.alpha / int(cell.family_size)
        expected = max(detectable_difference(sd, 6, alpha, (1 + EVIDENCE.power) / 2) for sd in sds)
        assert cell.detectable == pytest.approx(expected)


def test_the_classic_attacker_is_not_paired_with_a_tuned_baseline():
    """The classic attacker runs with fixed hyper-parameters; a baseline whose only attack was tuned
    is another attacker, so the cell is tested by its adaptive attacker alone."""
    adaptive = _per_image({"pure": 0.0, "defended": -6.0}).assign(attacker="adaptive")
    classic = adaptive[adaptive.setting == "defended"].assign(attacker="classic")
    uploads = _uploads(adaptive)
    uploads.loc[uploads.setting == "pure", "hyperparameters"] = "tuned: lr 0.1"
    table = results_table(adaptive, uploads, _describe, EVIDENCE, ORDER)
    table = add_differences(table, adaptive, "pure", lambda s: True, EVIDENCE)
    table = add_family(add_classic(table, pd.concat([adaptive, classic]), EVIDENCE, "pure"), EVIDENCE)
    cell = table.set_index(["setting", "checkpoint"]).loc[("defended", FIRST)]
    assert cell.classic_separate and pd.isna(cell.classic_p_value)
    assert cell.p_verdict == cell.p_value and cell.effect == "protects"


def test_the_summary_names_tuned_hyperparameters_and_only_then_has_the_column():
    assert hyperparameters_of({"tuned": None}) == "fixed"
    assert hyperparameters_of({"tuned": {"lr": 0.123456, "tv_weight": 0.001}}) == "tuned: lr 0.123, tv_weight 0.001"
    per_image = _per_image({"pure": 0.0, "defended": -6.0})
    fixed = _uploads(per_image)
    summary = summary_of(_table(per_image, fixed), TRAINING, EVIDENCE, "pure")
    assert "attack hyper-parameters" not in shown_summary(summary)
    tuned = fixed.assign(hyperparameters=["tuned: lr 0.2" if s == "pure" else "fixed" for s in fixed.setting])
    shown = shown_summary(summary_of(_table(per_image, tuned), TRAINING, EVIDENCE, "pure")).set_index("setting")
    assert shown.loc["pure", "attack hyper-parameters"] == "tuned: lr 0.2"
    assert shown.loc["defended", "attack hyper-parameters"] == "fixed"


def test_the_paired_tool_compares_two_runs_batch_by_batch():
    from tools.paired import paired_rows

    base = _per_image({"pure": 0.0}).assign(attacker="adaptive")
    other = base.assign(psnr=base.psnr + np.repeat(np.arange(len(base) // 4) % 3, 4))  # +0, +1, +2 per batch
    rows = paired_rows(base, other, None, 0.95)
    cell = next(r for r in rows if r["checkpoint"] == FIRST)
    d = (other.psnr - base.psnr)[base.checkpoint == FIRST].groupby(base.trial[base.checkpoint == FIRST]).mean()
    test = stats.ttest_1samp(d, 0)
    assert cell["batches"] == 6 and cell["n"] == 24
    assert cell["diff"] == pytest.approx((d.mean(), *test.confidence_interval(0.95))) and cell["p"] == pytest.approx(
        test.pvalue
    )


def test_chance_and_the_floor_are_paired_batch_intervals_and_the_fall_is_where_they_stay():
    """A cell's distance from chance is the paired t interval of its batches' PSNR less their chance
    PSNR (scipy's), from its setting's last checkpoint the same against that checkpoint's batches;
    a cell is at chance (at its floor) when that interval ends under the sized-for effect; the
    fall is the first checkpoint of the run of them that reaches the last."""
    per_image = _per_image({"pure": 0.0, "defended": -6.0}).copy()
    rng = np.random.default_rng(2)
    per_image["chance_psnr"] = 11.0 + rng.normal(0, 0.5, len(per_image))
    table = add_floor(_table(per_image, _uploads(per_image)), per_image, EVIDENCE)
    cells = table.set_index(["setting", "checkpoint"])
    cell = per_image[(per_image.setting == "pure") & (per_image.checkpoint == LAST)]
    above = (cell.psnr - cell.chance_psnr).groupby(cell.trial).mean()
    ci = stats.ttest_1samp(above, 0).confidence_interval(0.95)
    row = cells.loc[("pure", LAST)]
    assert row.chance_psnr == pytest.approx(cell.chance_psnr.mean())
    assert (row.above_chance, row.above_chance_low, row.above_chance_high) == pytest.approx(
        (above.mean(), ci.low, ci.high)
    )
    assert row.at_chance == (ci.high < EVIDENCE.effect)
    assert not cells.loc[("pure", FIRST), "at_chance"]  # 25 dB against 11: far above chance
    first = per_image[(per_image.setting == "defended") & (per_image.checkpoint == FIRST)]
    last = per_image[(per_image.setting == "defended") & (per_image.checkpoint == LAST)]
    d = first.groupby("trial").psnr.mean() - last.groupby("trial").psnr.mean()
    ci = stats.ttest_1samp(d, 0).confidence_interval(0.95)
    row = cells.loc[("defended", FIRST)]
    assert (row.above_floor, row.above_floor_low, row.above_floor_high) == pytest.approx((d.mean(), ci.low, ci.high))
    assert not row.at_floor and cells.loc[("defended", LAST), "at_floor"]  # the last is its own floor
    steps = [0, 4, 16, 64, 471]
    assert settles(steps, [False, True, False, True, True]) == (64, 16)  # a dip that comes back does not count
    assert settles(steps, [True] * 5) == (0, None)
    assert settles(steps, [True, True, True, True, False]) == (None, 471)
    summary = summary_of(table, TRAINING, EVIDENCE, "pure").set_index("setting")
    assert (summary.loc["defended", "floor_step"], summary.loc["defended", "above_floor_at_step"]) == (471, 0)
    assert summary.loc["defended", "falls"].startswith("at its floor from step 471 (above at step 0); ")
