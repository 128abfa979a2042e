"""The report's pure parts: the summary a researcher reads first, and the comparison of two tables."""

import pandas as pd

from stages.report import SHARED, summary_of, table_differences


def _table() -> pd.DataFrame:
    rows = [("pure", "pure", 0, 0.10, 24.0), ("pure", "pure", 3, 0.85, 12.0),
            ("gh", "gh", 0, 0.10, 30.0), ("gh", "gh", 3, 0.80, 14.0),
            ("ra", "ra", 0, 0.10, 9.0), ("ra", "ra", 3, 0.70, 9.5)]
    return pd.DataFrame([{"setting": s, "scheme": k, "epoch": e, "test_accuracy": a, "epsilon": None, "gh": 0.1 * e,
                          "label_accuracy": 1.0, "psnr": p, "ssim": 0.5, "mse": 0.01, "lpips": None,
                          "iterations_run": 200} for s, k, e, a, p in rows])


def test_the_summary_gives_each_setting_its_best_psnr_and_accuracy_cost():
    table = _table()
    training = table[["scheme", "epoch", "test_accuracy"]]
    summary = summary_of(table, training).set_index("setting")
    assert summary.loc["gh", "best_psnr"] == 30.0 and summary.loc["gh", "best_psnr_epoch"] == 0
    assert summary.loc["ra", "best_psnr"] == 9.5 and summary.loc["ra", "best_psnr_epoch"] == 3
    assert abs(summary.loc["gh", "accuracy_cost"] - 0.05) < 1e-12 and summary.loc["pure", "accuracy_cost"] == 0
    assert summary.loc["ra", "last_psnr"] == 9.5 and abs(summary.loc["gh", "gh_last"] - 0.3) < 1e-12


def test_table_differences_find_a_changed_value_and_ignore_row_order_and_extra_columns():
    ours = _table()
    theirs = ours.sample(frac=1, random_state=0).assign(attack_seconds=1.0)
    assert table_differences(ours, theirs) == []
    theirs.loc[theirs.setting == "gh", "psnr"] += 0.5
    assert table_differences(ours, theirs) == ["gh epoch 0: psnr 30.0 vs 30.5", "gh epoch 3: psnr 14.0 vs 14.5"]
    assert table_differences(ours, theirs[theirs.epoch == 0])[0].startswith("rows differ")
    assert "iterations_run" in SHARED
