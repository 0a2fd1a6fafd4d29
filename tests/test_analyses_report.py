"""The Feature reuse and Data scarcity chapters' numbers and sentences (``report.analyses``) and their figures.

Every frame here is synthetic, built with the columns the analysis runs write (issue #12) and with values chosen so
that the right answer is known: which layer is best, where the CKA falls below 0.5, which unit moved furthest, which
units are critical, which regime is ahead at which fraction. Each data-chosen sentence is checked in both directions
and with nothing finished. The Store wrappers read fake run folders (meta.json + the CSV) as the store does.
"""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pandas as pd
import pytest

from transferstudy import figures, report, results
from transferstudy.report import analyses, tables
from transferstudy.report.store import Store, StoreError

matplotlib.use("Agg")

ALEX_LAYERS = ["pool1", "pool2", "relu3", "relu4", "pool5", "fc6", "fc7"]
ALEX_UNITS = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "head"]
DEIT_STAGES = ["embed", *[f"block{i}" for i in range(1, 13)]]
DEIT_LAYERS = [f"{s}.{r}" for s in DEIT_STAGES for r in ("cls", "mean")]
DEIT_UNITS = ["patch_embed", "cls_token", "pos_embed", *[f"block{i}" for i in range(1, 13)], "norm", "head"]
NAN = float("nan")


def rows(dataset: str, model: str, network: str, measure: str, layers: list[str], values, half: float | None = None):
    """Tidy feature-reuse rows: one per layer, the interval value ± ``half`` (None: no interval)."""
    return [{"model": model, "dataset": dataset, "network": network, "layer": layer, "measure": measure,
             "value": v, "ci_low": NAN if half is None else v - half, "ci_high": NAN if half is None else v + half}
            for layer, v in zip(layers, values, strict=True)]


def frame(*parts) -> pd.DataFrame:
    return pd.DataFrame([r for part in parts for r in part], columns=analyses.FEATURE_COLUMNS)


def alexnet_knn(dataset: str, backbone, partial, full, half=0.02) -> list[dict]:
    return (rows(dataset, "alexnet", "backbone", "knn_k20", ALEX_LAYERS, backbone, half)
            + rows(dataset, "alexnet", "partial", "knn_k20", ALEX_LAYERS, partial, half)
            + rows(dataset, "alexnet", "full", "knn_k20", ALEX_LAYERS, full, half))


RISING = [0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7]


# --- depth and readouts ----------------------------------------------------------------------------------------


def test_depth_puts_both_architectures_on_one_axis_and_deits_two_readouts_at_one_depth():
    f = frame(rows("cifar10", "alexnet", "backbone", "knn_k20", ALEX_LAYERS, RISING),
              rows("cifar10", "deit_base", "backbone", "knn_k20", DEIT_LAYERS, np.linspace(0.1, 0.9, 26)))
    depth = analyses.with_depth(f)
    alex = depth[depth["model"] == "alexnet"]
    assert np.allclose(alex["depth"], np.arange(7) / 6)
    deit = depth[depth["model"] == "deit_base"].set_index("layer")
    assert deit.loc["embed.cls", "depth"] == deit.loc["embed.mean", "depth"] == 0
    assert deit.loc["block6.mean", "depth"] == pytest.approx(0.5)
    assert deit.loc["block12.cls", "depth"] == 1
    assert analyses.readout("block3.cls") == "cls" and analyses.readout("pool5") is None
    assert analyses.stage("block3.mean") == "block3" and analyses.stage("fc6") == "fc6"
    mean_only = analyses.probes(f, "knn_k20", "mean")
    assert set(mean_only[mean_only["model"] == "deit_base"]["readout"]) == {"mean"}
    assert len(mean_only[mean_only["model"] == "alexnet"]) == 7  # a CNN's layers have no readout: always kept


# --- k-NN -----------------------------------------------------------------------------------------------------


def test_knn_table_has_a_column_per_network_with_the_interval_where_there_is_one():
    f = frame(alexnet_knn("cifar10", RISING, RISING, RISING),
              rows("ferplus", "alexnet", "backbone", "knn_k20", ALEX_LAYERS, RISING, half=None))
    table = analyses.knn_table(f)
    assert list(table.columns) == ["dataset", "model", "layer", "backbone", "partial fine-tune", "full fine-tune"]
    assert list(table["dataset"]) == ["cifar10"] * 7 + ["ferplus"] * 7
    first = table.iloc[0]
    assert first["layer"] == "pool1" and first["backbone"] == tables.pct_ci(0.3, 0.28, 0.32) == "30.0% [28.0, 32.0]"
    fer = table[table["dataset"] == "ferplus"].iloc[-1]
    assert fer["backbone"] == "70.0%" and fer["full fine-tune"] == "—"  # no interval; no fine-tune row


def test_knn_sentence_names_an_early_peak_and_counts_fine_tunes_beyond_the_intervals():
    early = [0.3, 0.4, 0.5, 0.62, 0.55, 0.5, 0.45]  # FERPlus: best at relu4, not at fc7
    f = frame(alexnet_knn("cifar10", RISING, RISING, [*RISING[:-1], 0.9]),   # full fine-tune far above at fc7
              alexnet_knn("ferplus", early, early, [*early[:-1], 0.46]))     # within the intervals
    summary = analyses.knn_summary(f)
    assert list(summary["best_layer"]) == ["fc7", "relu4"]
    assert list(summary["verdict_full"]) == ["ahead", "within"]
    assert list(summary["verdict_partial"]) == ["within", "within"]
    sentence = analyses.knn_sentence(summary)
    assert "earlier probe point than its last in 1 of 2 model-dataset pairs: AlexNet on FERPlus (relu4: 62.0%, " \
           "against 45.0% at fc7)" in sentence
    assert "In the other 1 it is highest at the last." in sentence
    assert ("At the last probe point fine-tuning raised the k-NN accuracy beyond both intervals in 0 of 2 for the "
            "partial fine-tune and 1 of 2 for the full fine-tune, and lowered it beyond them in 0 and 0; the rest are "
            "within the intervals.") in sentence
    # the other direction: every peak at the last layer, the fine-tune below beyond the intervals
    f = frame(alexnet_knn("cifar10", RISING, RISING, [*RISING[:-1], 0.5]))
    sentence = analyses.knn_sentence(analyses.knn_summary(f))
    assert "highest at its last probe point in the one model-dataset pair." in sentence
    assert "in 0 of 1 for the partial fine-tune and 0 of 1 for the full fine-tune, and lowered it beyond them in 0 " \
           "and 1;" in sentence
    assert "No feature-reuse run has finished" in analyses.knn_sentence(analyses.knn_summary(frame()))


def test_knn_summary_reads_deits_mean_readout_and_says_when_there_is_no_interval():
    values = np.linspace(0.2, 0.8, 13)
    deit = []
    for network, shift in (("backbone", 0.0), ("full", 0.1)):
        for stage_, v in zip(DEIT_STAGES, values):
            deit += rows("cifar10", "deit_base", network, "knn_k20", [f"{stage_}.cls", f"{stage_}.mean"],
                         [0.99 if stage_ == "block3" else v, v + shift], half=None)
    summary = analyses.knn_summary(frame(deit))
    assert summary.iloc[0]["best_layer"] == "block12.mean"  # block3.cls's 0.99 is another readout
    assert summary.iloc[0]["verdict_full"] == "unknown"
    assert "in 0 of 1 for the full fine-tune" in analyses.knn_sentence(summary)
    assert analyses.knn_sentence(summary).endswith("the rest are within the intervals or have none (1).")
    assert analyses.knn_summary(frame(deit), read="cls").iloc[0]["best_layer"] == "block3.cls"


def test_knn_k_sentence_counts_where_k200_scores_below_k20_per_dataset():
    low = [v - 0.1 for v in RISING]
    f = frame(alexnet_knn("cifar10", RISING, RISING, RISING),
              rows("cifar10", "alexnet", "backbone", "knn_k200", ALEX_LAYERS, [*RISING[:5], 0.9, 0.9], 0.02),
              alexnet_knn("ferplus", RISING, RISING, RISING),
              rows("ferplus", "alexnet", "backbone", "knn_k200", ALEX_LAYERS, low, 0.02),
              rows("ferplus", "alexnet", "full", "knn_k200", ALEX_LAYERS, low, 0.02))
    assert analyses.knn_k_sentence(f) == ("With k = 200 instead of 20, the k-NN accuracy is lower at 0 of the 7 probe "
                                          "points on CIFAR-10 (2 above) and 14 of the 14 probe points on FERPlus "
                                          "(0 above), counting every network.")
    assert "no k = 200" in analyses.knn_k_sentence(frame())
    assert "cannot be compared" in analyses.knn_k_sentence(frame(alexnet_knn("cifar10", RISING, RISING, RISING)))


# --- CKA ------------------------------------------------------------------------------------------------------


def cka(dataset: str, network: str, values, model: str = "alexnet", half=0.03) -> list[dict]:
    return rows(dataset, model, network, "cka", ALEX_LAYERS, values, half)


def test_cka_table_and_the_first_layer_below_one_half():
    f = frame(cka("cifar10", "partial", [1, 1, 1, 1, 1, 0.9, 0.8]),
              cka("cifar10", "full", [NAN, 0.9, 0.7, 0.6, 0.55, 0.4, 0.6]))  # NaN skipped; falls at fc6
    table = analyses.cka_table(f)
    assert list(table.columns) == ["dataset", "model", "layer", "partial fine-tune", "full fine-tune"]
    assert table.iloc[5]["full fine-tune"] == "0.40 [0.37, 0.43]" and table.iloc[0]["full fine-tune"] == "—"
    drops = analyses.cka_drops(f)
    assert list(drops["network"]) == ["partial", "full"]
    full = drops.iloc[1]
    assert full["layer"] == "fc6" and full["depth"] == pytest.approx(5 / 6) and full["lowest"] == 0.4
    assert pd.isna(drops.iloc[0]["layer"]) and drops.iloc[0]["lowest"] == 0.8
    sentence = analyses.cka_sentence(drops)
    assert ("falls below 0.5 in 1 of the 2 fine-tuned networks: AlexNet's full fine-tune on CIFAR-10 first at fc6 "
            "(CKA 0.40, relative depth 0.83).") in sentence
    assert "The other one stays at 0.5 or above at every probe point" in sentence
    assert "lowest CKA 0.80, AlexNet's partial fine-tune on CIFAR-10 at fc7" in sentence


def test_cka_sentence_when_no_network_falls_and_when_every_one_does_and_with_nothing():
    stay = analyses.cka_drops(frame(cka("cifar10", "partial", [1] * 7), cka("ferplus", "full", [0.9] * 6 + [0.6])))
    sentence = analyses.cka_sentence(stay)
    assert sentence.startswith("All 2 fine-tuned networks stay at 0.5 or above") and "falls below" not in sentence
    assert "lowest CKA 0.60, AlexNet's full fine-tune on FERPlus at fc7" in sentence
    one = analyses.cka_drops(frame(cka("cifar10", "full", [0.9, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2])))
    sentence = analyses.cka_sentence(one)
    assert sentence == ("The CKA with the backbone falls below 0.5 in the one fine-tuned network: AlexNet's full "
                        "fine-tune on CIFAR-10 first at pool2 (CKA 0.30, relative depth 0.17).")
    assert analyses.cka_drops(frame()).empty
    assert "no CKA" in analyses.cka_sentence(analyses.cka_drops(frame()))
    assert analyses.cka_drops(frame(cka("cifar10", "full", [1, 1, 1, 1, 1, 0.6, 0.45])), threshold=0.4)["layer"].isna().all()


# --- weight distance ----------------------------------------------------------------------------------------


def distances(dataset: str, network: str, values, model: str = "alexnet", units=ALEX_UNITS) -> list[dict]:
    return rows(dataset, model, network, "weight_distance", units, values, half=None)


def test_weight_summary_leaves_out_the_head_counts_frozen_units_and_finds_the_trend():
    f = frame(distances("cifar10", "partial", [0, 0, 0, 0, 0, 0.02, 0.03, 5.0]),
              distances("cifar10", "full", [0.001, 0.002, 0.004, 0.005, 0.006, 0.01, 0.02, 4.0]))
    table = analyses.weight_table(f)
    assert list(table.columns) == ["dataset", "model", "unit", "partial fine-tune", "full fine-tune"]
    assert list(table["unit"]) == ALEX_UNITS and table.iloc[0]["partial fine-tune"] == "0.0000"
    summary = analyses.weight_summary(f).set_index("network")
    assert summary.loc["partial", "top_unit"] == "fc7" and summary.loc["full", "top_unit"] == "fc7"  # not the head
    assert summary.loc["partial", "frozen"] == 5 and summary.loc["full", "frozen"] == 0
    assert pd.isna(summary.loc["partial", "rho"]) and summary.loc["full", "rho"] == pytest.approx(1.0)
    sentence = analyses.weight_sentence(analyses.weight_summary(f))
    assert "AlexNet's partial fine-tune on CIFAR-10: fc7 (0.0300)" in sentence
    assert ("Frozen units stayed exactly at their start, as the regime intends: 5 in AlexNet's partial fine-tune on "
            "CIFAR-10.") in sentence
    assert "Of the 1 fine-tunes with 3 or more trained units, the deeper units moved further in 1" in sentence
    assert "and less far in 0." in sentence


def test_weight_sentence_in_the_other_direction_and_with_too_few_units_and_with_nothing():
    f = frame(distances("ferplus", "full", [0.05, 0.04, 0.03, 0.02, 0.01, 0.005, 0.001, 1.0]))
    sentence = analyses.weight_sentence(analyses.weight_summary(f))
    assert "AlexNet's full fine-tune on FERPlus: conv1 (0.0500)" in sentence
    assert "the deeper units moved further in 0 (Spearman's rank correlation of depth and distance above 0) and " \
           "less far in 1." in sentence
    few = analyses.weight_summary(frame(distances("cifar10", "partial", [0, 0, 0, 0, 0, 0, 0.03, 2.0])))
    assert "No fine-tune trained enough units (3 or more)" in analyses.weight_sentence(few)
    assert "no weight distances" in analyses.weight_sentence(analyses.weight_summary(frame()))


def test_deit_units_keep_their_own_names_no_substring_matching():
    values = np.linspace(0.01, 0.2, len(DEIT_UNITS))
    f = frame(distances("cifar10", "full", values, "deit_base", DEIT_UNITS))
    table = analyses.weight_table(f)
    assert list(table["unit"]) == DEIT_UNITS
    assert analyses.weight_summary(f).iloc[0]["top_unit"] == "norm"  # the largest once the head is left out


# --- resilience ---------------------------------------------------------------------------------------------


def resilience(dataset: str, network: str, restore, redraw, baseline=(0.8, 0.75, 0.85), model: str = "alexnet"):
    value, low, high = baseline
    return (rows(dataset, model, network, "resilience_restore", ALEX_UNITS, restore, half=0.05)
            + rows(dataset, model, network, "resilience_redraw", ALEX_UNITS, redraw, half=0.05)
            + [{"model": model, "dataset": dataset, "network": network, "layer": "output", "measure": "accuracy",
                "value": value, "ci_low": low, "ci_high": high}])


def test_resilience_marks_a_unit_critical_when_restoring_it_costs_more_than_the_baseline_interval():
    f = frame(resilience("cifar10", "full", [0.6, 0.8, 0.8, 0.79, 0.76, 0.8, 0.8, 0.1],
                         [0.1, 0.1, 0.78, 0.8, 0.8, 0.8, 0.8, 0.1]),
              resilience("cifar10", "partial", [0.8] * 7 + [0.12], [0.8] * 7 + [0.1]))
    table = analyses.resilience_table(f)
    full = table[table["network"] == "full"].set_index("unit")
    assert list(full.index) == ALEX_UNITS
    assert full.loc["conv1", "critical"] and not full.loc["conv5", "critical"]  # 0.76 is inside [0.75, 0.85]
    assert full.loc["conv1", "baseline_low"] == 0.75 and full.loc["conv2", "redraw"] == 0.1
    critical = analyses.critical_units(analyses.resilience_table(f)).set_index("network")
    assert critical.loc["full", "critical"] == ["conv1"] and critical.loc["full", "head_critical"]
    assert critical.loc["partial", "critical"] == [] and critical.loc["partial", "units"] == 7
    assert critical.loc["full", "survive_redraw"] == 5 and critical.loc["partial", "survive_redraw"] == 7
    sentence = analyses.critical_sentence(analyses.critical_units(table))
    assert ("costs accuracy beyond the baseline's interval in 1 of the 2 fine-tuned networks: AlexNet's full "
            "fine-tune on CIFAR-10 (conv1).") in sentence
    assert "The other one has no critical unit in its backbone" in sentence
    assert "(only the new head is critical" in sentence
    assert "Re-drawn at random instead, 12 of the 14 backbone units scored keep the accuracy" in sentence


def test_critical_sentence_with_no_critical_unit_anywhere_and_a_baseline_without_interval():
    f = frame(resilience("cifar10", "full", [0.8] * 8, [0.8] * 8), resilience("ferplus", "full", [0.8] * 8, [0.8] * 8))
    sentence = analyses.critical_sentence(analyses.critical_units(analyses.resilience_table(f)))
    assert sentence.startswith("None of the 2 fine-tuned networks has a critical unit in their backbones")
    assert "only the new head" not in sentence and "Restoring a single" not in sentence
    bare = frame(resilience("cifar10", "full", [0.79] + [0.8] * 7, [0.8] * 8, baseline=(0.8, NAN, NAN)))
    table = analyses.resilience_table(bare).set_index("unit")
    assert table.loc["conv1", "critical"] and not table.loc["conv2", "critical"]  # below the baseline itself
    assert "in the one fine-tuned network: AlexNet's full fine-tune on CIFAR-10 (conv1)" in analyses.critical_sentence(
        analyses.critical_units(table.reset_index()))
    assert "no resilience" in analyses.critical_sentence(analyses.critical_units(analyses.resilience_table(frame())))


# --- data scarcity --------------------------------------------------------------------------------------------


def scarcity(model="alexnet", dataset="cifar10", curves=None, n_test=100) -> pd.DataFrame:
    """``curves``: {regime: {fraction: [accuracy per seed]}}."""
    out = []
    for regime, points in curves.items():
        for fraction, accs in points.items():
            for seed, a in enumerate(accs):
                out.append({"model": model, "dataset": dataset, "regime": regime, "fraction": fraction, "seed": seed,
                            "n_train": int(400 * fraction), "n_test": n_test, "test_accuracy": a})
    return pd.DataFrame(out, columns=analyses.SCARCITY_COLUMNS)


CURVES = {"frozen_svm": {0.01: [0.2, 0.3, 0.4], 0.1: [0.5, 0.55, 0.6], 1.0: [0.7]},
          "linear_probe": {0.01: [0.5, 0.55, 0.6], 0.1: [0.6, 0.62, 0.64], 1.0: [0.72]},
          "full": {0.01: [0.1], 0.1: [0.3], 1.0: [0.9]}}


def test_scarcity_curves_band_is_the_draws_spread_or_an_interval_for_one_draw():
    curves = analyses.scarcity_curves(scarcity(curves=CURVES))
    assert list(curves["regime"].unique()) == ["frozen_svm", "linear_probe", "full"]  # least trained first
    first = curves.iloc[0]
    assert (first["fraction"], first["seeds"], first["band"]) == (0.01, 3, "draws")
    assert (first["mean"], first["low"], first["high"]) == pytest.approx((0.3, 0.2, 0.4))
    whole = curves[(curves["regime"] == "frozen_svm") & (curves["fraction"] == 1.0)].iloc[0]
    iv = tables.accuracy_interval(70, 100)
    assert whole["band"] == "interval" and (whole["low"], whole["high"]) == (iv.low, iv.high)
    table = analyses.scarcity_table(curves)
    assert list(table.columns) == ["dataset", "model", "regime", "1%", "10%", "100%"]
    assert table.iloc[0]["1%"] == "30.0% [20.0, 40.0]"
    sizes = analyses.scarcity_sizes(curves)
    assert list(sizes.iloc[0]) == ["cifar10", "alexnet", "4", "40", "400"]
    assert analyses.scarcity_table(curves.iloc[:0]).empty and analyses.scarcity_sizes(curves.iloc[:0]).empty


def test_seeds_sentence_says_plainly_which_curves_have_one_draw():
    sentence = analyses.seeds_sentence(analyses.scarcity_curves(scarcity(curves=CURVES)))
    assert "Below 100%, 2 curves average 3 subset draws" in sentence
    assert "AlexNet's full fine-tune on CIFAR-10 has only one draw at each fraction: its band is a 95% interval" in sentence
    several = analyses.seeds_sentence(analyses.scarcity_curves(scarcity(curves={"frozen_svm": CURVES["frozen_svm"]})))
    assert "only one draw" not in several and "1 curve average 3" in several
    assert "No data-scarcity run" in analyses.seeds_sentence(analyses.scarcity_curves(scarcity(curves={})))


def test_scarcity_gaps_at_the_fewest_and_most_images_and_whether_they_exceed_the_bands():
    curves = analyses.scarcity_curves(scarcity(curves=CURVES))
    gaps = analyses.scarcity_gaps(curves).set_index("b")
    probe = gaps.loc["linear_probe"]
    assert probe["small_gap"] == pytest.approx(0.25) and probe["small_verdict"] == "ahead"  # [0.5, 0.6] vs [0.2, 0.4]
    assert probe["large_gap"] == pytest.approx(0.02) and probe["large_verdict"] == "within"
    sentence = analyses.scarcity_sentence(analyses.scarcity_gaps(curves))
    assert ("AlexNet on CIFAR-10: the linear probe minus the frozen SVM is +25.0 pp with 1% of the training split "
            "(beyond the bands) and +2.0 pp with 100% (within the bands); the full fine-tune minus the frozen SVM is "
            "-20.0 pp with 1%") in sentence
    assert ("In 1 of these 2 comparisons the more trained regime gains on the frozen SVM as the training split grows "
            "(its difference is larger with the most images than with the fewest), in 1 it loses ground; the "
            "difference exceeds the bands in 2 with the fewest images and in 1 with the most.") in sentence
    # the other direction: the gap grows with the data
    grows = {"frozen_svm": {0.01: [0.3, 0.31, 0.32], 1.0: [0.5]}, "linear_probe": {0.01: [0.3, 0.31, 0.33],
                                                                                  1.0: [0.9]}}
    sentence = analyses.scarcity_sentence(analyses.scarcity_gaps(analyses.scarcity_curves(scarcity(curves=grows))))
    assert "+0.3 pp with 1% of the training split (within the bands) and +40.0 pp with 100% (beyond the bands)" in sentence
    assert sentence.endswith("So the linear probe gains on the frozen SVM as the training split grows; the difference "
                             "is within the bands with the fewest images and exceeds them with the most.")
    table = analyses.scarcity_gap_table(analyses.scarcity_gaps(analyses.scarcity_curves(scarcity(curves=grows))))
    assert table.iloc[0]["gap (most)"] == "+40.0 pp" and table.iloc[0]["fewest"] == "1%"
    assert "no gap between regimes" in analyses.scarcity_sentence(analyses.scarcity_gaps(
        analyses.scarcity_curves(scarcity(curves={"frozen_svm": CURVES["frozen_svm"]}))))


# --- the store: fake run folders -------------------------------------------------------------------------------


def write_analysis(profile_dir, dataset: str, model: str, name: str, table: pd.DataFrame | None = None,
                   status: str = "ok", cka_full: int | None = None):
    run_dir = profile_dir / dataset / model / name
    run_dir.mkdir(parents=True)
    results.write_json(run_dir / "meta.json", {"status": status, "profile": profile_dir.name, "pretrained": True,
                                               "device": "cpu", "date": "2024-05-01T12:00:00+00:00",
                                               **({"error": "RuntimeError: boom"} if status != "ok" else {})})
    if table is not None:
        file = "feature_reuse.csv" if name == "feature_reuse" else "data_scarcity.csv"
        table.drop(columns=[c for c in ("model", "dataset") if name == "feature_reuse" and c in table]).to_csv(
            run_dir / file, index=False)
    if cka_full:
        layers = np.array(ALEX_LAYERS[:cka_full])
        np.savez(run_dir / "cka_matrices.npz", cka_full=np.eye(cka_full), layers_full=layers)
    return run_dir


def test_the_store_wrappers_read_finished_runs_and_say_what_is_missing(tmp_path):
    profile = tmp_path / "runs" / "quick"
    profile.mkdir(parents=True)
    empty = Store.load(profile)
    assert analyses.feature_frame(empty).empty and list(analyses.feature_frame(empty).columns) == analyses.FEATURE_COLUMNS
    assert analyses.scarcity_frame(empty).empty
    assert "has not finished for any model-dataset pair yet" in analyses.status_sentence(empty, "feature_reuse")
    assert analyses.source(empty, "feature_reuse") == "Source: no finished feature reuse run of profile `quick`."
    assert analyses.cka_matrix(empty, "alexnet") is None
    settings = analyses.scarcity_settings(empty)
    assert list(settings["status"]) == ["not run yet"] * 4 and "1%" in settings.iloc[0]["fractions"]  # the profile's
    assert list(analyses.runs_table(empty, "data_scarcity")["status"]) == ["not run yet"] * 4

    write_analysis(profile, "cifar10", "alexnet", "feature_reuse", frame(alexnet_knn("cifar10", RISING, RISING, RISING)),
                   cka_full=3)
    write_analysis(profile, "ferplus", "alexnet", "feature_reuse", status="failed")
    write_analysis(profile, "cifar10", "alexnet", "data_scarcity", scarcity(curves=CURVES))
    store = Store.load(profile)
    f = analyses.feature_frame(store)
    assert len(f) == 21 and set(f["model"]) == {"alexnet"} and f["value"].dtype == float
    assert analyses.knn_summary(f).iloc[0]["best_layer"] == "fc7"
    assert len(analyses.scarcity_curves(analyses.scarcity_frame(store))) == 9
    sentence = analyses.status_sentence(store, "feature_reuse")
    assert sentence.startswith("Feature reuse has finished for 1 of the 4 model-dataset pairs")
    assert sentence.endswith("Not finished: DeiT-Base on CIFAR-10 and DeiT-Base on FERPlus (not run yet); AlexNet on "
                             "FERPlus (failed).")
    table = analyses.runs_table(store, "feature_reuse")
    assert table.iloc[2]["status"] == "failed: RuntimeError: boom" and "profile quick" in table.iloc[0]["provenance"]
    assert "2024-05-01" in analyses.source(store, "feature_reuse")
    run, layers, matrix = analyses.cka_matrix(store, "alexnet")
    assert run.key == "cifar10/alexnet/feature_reuse" and layers == ALEX_LAYERS[:3] and matrix.shape == (3, 3)
    assert analyses.cka_matrix(store, "alexnet", network="partial") is None
    assert analyses.cka_matrix(store, "deit_base") is None


def test_deits_heatmap_keeps_one_readout_and_a_finished_runs_settings_win_over_the_profiles(tmp_path):
    profile = tmp_path / "runs" / "quick"
    run_dir = write_analysis(profile, "ferplus", "deit_base", "feature_reuse", frame())
    n = len(DEIT_LAYERS)
    np.savez(run_dir / "cka_matrices.npz", cka_full=np.arange(n * n, dtype=float).reshape(n, n) / (n * n),
             layers_full=np.array(DEIT_LAYERS))
    scarce = write_analysis(profile, "cifar10", "alexnet", "data_scarcity", scarcity(curves=CURVES))
    results.write_json(scarce / "params.json", {"fractions": [0.5, 1.0], "subset_seeds": 7, "finetunes": None,
                                                "finetune_seeds": 1, "n_train": 400})
    store = Store.load(profile)
    run, layers, matrix = analyses.cka_matrix(store, "deit_base")
    assert run.dataset == "ferplus" and layers == [f"{s}.mean" for s in DEIT_STAGES] and matrix.shape == (13, 13)
    assert matrix[1, 0] == pytest.approx((3 * n + 1) / (n * n))  # block1.mean's row, embed.mean's column
    assert len(analyses.cka_matrix(store, "deit_base", read=None)[1]) == n
    settings = analyses.scarcity_settings(store).set_index(["dataset", "model"])
    assert settings.loc[("CIFAR-10", "AlexNet"), "fractions"] == "50%, 100%"
    assert settings.loc[("CIFAR-10", "AlexNet"), "subset draws below 100%"] == 7
    assert settings.loc[("CIFAR-10", "AlexNet"), "fine-tunes"] == "none"
    assert settings.loc[("CIFAR-10", "AlexNet"), "training split"] == "400 images"
    assert settings.loc[("FERPlus", "DeiT-Base"), "status"] == "not run yet"


def test_page_helpers_show_a_note_for_nothing_and_each_number_with_its_interval():
    note = analyses.note_or(analyses.knn_table(frame()), "Nothing yet.")
    assert note.data == "```{note}\nNothing yet.\n```\n"
    styled = analyses.note_or(analyses.knn_table(frame(alexnet_knn("cifar10", RISING, RISING, RISING))), "Nothing")
    assert "30.0% [28.0, 32.0]" in styled.to_html() and "CIFAR-10" in styled.to_html()
    res = analyses.resilience_table(frame(resilience("cifar10", "full", [0.6] + [0.8] * 7, [0.1] * 8)))
    shown = analyses.resilience_shown(res)
    assert list(shown.columns) == ["dataset", "model", "network", "unit", "restored [95% CI]", "re-drawn [95% CI]",
                                   "as trained [95% CI]", "critical"]
    assert list(shown.iloc[0]) == ["cifar10", "alexnet", "full fine-tune", "conv1", "60.0% [55.0, 65.0]",
                                   "10.0% [5.0, 15.0]", "80.0% [75.0, 85.0]", "yes"]
    assert shown.iloc[1]["critical"] == "no"


def test_a_broken_table_is_named_by_the_store(tmp_path):
    profile = tmp_path / "runs" / "smoke"
    run_dir = write_analysis(profile, "cifar10", "alexnet", "feature_reuse")
    (run_dir / "feature_reuse.csv").write_text("network,layer\nfull,fc7\n")
    with pytest.raises(StoreError, match="feature_reuse.csv"):
        analyses.feature_frame(Store.load(profile))
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "ok"


# --- the figures ------------------------------------------------------------------------------------------------


def check_figure(fig) -> None:
    assert fig.get_facecolor()[:3] == (1.0, 1.0, 1.0)
    drawn = [ax for ax in fig.axes if ax.has_data()]
    assert drawn
    for ax in drawn:
        if ax.get_label() == "<colorbar>":
            assert ax.get_ylabel()
            continue
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), ax.get_title()


NETWORKS = {n: analyses.NETWORK_LABELS[n] for n in analyses.NETWORKS}
TUNED = {n: analyses.NETWORK_LABELS[n] for n in analyses.FINETUNED}


def test_depth_figures_draw_a_line_per_model_and_network_and_bands_where_there_are_intervals():
    deit = [r for n in analyses.NETWORKS
            for r in rows("cifar10", "deit_base", n, "knn_k20", DEIT_LAYERS, np.linspace(0.1, 0.9, 26), half=None)]
    f = frame(alexnet_knn("cifar10", RISING, RISING, RISING), deit)
    fig = figures.knn_by_depth(analyses.probes(f, "knn_k20"), report.DATASET_LABELS, report.MODEL_LABELS, NETWORKS,
                               "t")
    cifar, fer = fig.axes
    assert len(cifar.lines) == 6 and not fer.lines and fer.get_title() == "FERPlus: no finished run"
    assert len(cifar.collections) == 3  # AlexNet's three bands; DeiT's points have no interval
    assert max(len(line.get_xdata()) for line in cifar.lines) == 13  # DeiT: one readout, 13 probe points
    assert [line.get_color() for line in cifar.lines[:1]] == [figures.MODEL_COLOURS["alexnet"]]
    check_figure(fig)
    f = frame(cka("cifar10", "partial", [1] * 7), cka("cifar10", "full", [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]))
    fig = figures.cka_by_depth(analyses.probes(f, "cka"), report.DATASET_LABELS, report.MODEL_LABELS, TUNED, "t")
    assert len(fig.axes[0].lines) == 3 and fig.axes[0].lines[-1].get_ydata()[0] == 0.5  # two networks, the 0.5 line
    assert "CKA" in fig.axes[0].get_ylabel()
    check_figure(fig)
    with pytest.raises(ValueError, match="no_data"):
        figures.knn_by_depth(analyses.probes(frame(), "knn_k20"), report.DATASET_LABELS, report.MODEL_LABELS,
                             NETWORKS, "t")


def test_unit_figures_draw_a_bar_or_point_per_unit_and_the_baseline_band():
    f = frame(distances("cifar10", "partial", [0, 0, 0, 0, 0, 0.02, 0.03, 5.0]),
              distances("cifar10", "full", np.linspace(0.01, 0.08, 8)),
              distances("cifar10", "full", np.linspace(0.01, 0.2, len(DEIT_UNITS)), "deit_base", DEIT_UNITS))
    fig = figures.weight_distance_bars(analyses.units(f, "weight_distance"), report.DATASET_LABELS,
                                       report.MODEL_LABELS, TUNED, "t")
    alex, deit = fig.axes
    assert [t.get_text() for t in alex.get_xticklabels()] == ALEX_UNITS[:-1]  # the head left out
    assert len(alex.patches) == 2 * 7 and len(deit.patches) == 2 * (len(DEIT_UNITS) - 1)
    check_figure(fig)
    res = analyses.resilience_table(frame(resilience("cifar10", "full", [0.6] + [0.8] * 7, [0.1] * 8)))
    fig = figures.resilience_points(res, report.DATASET_LABELS, report.MODEL_LABELS, "t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ALEX_UNITS
    assert ax.lines[0].get_ydata()[0] == 0.8 and len(ax.patches) == 1  # the baseline and its band
    check_figure(fig)
    fig = figures.cka_heatmap(ALEX_LAYERS, np.eye(7), "t")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ALEX_LAYERS
    check_figure(fig)
    with pytest.raises(ValueError, match="square matrix"):
        figures.cka_heatmap(ALEX_LAYERS, np.eye(3), "t")


def test_scarcity_figure_has_log_fractions_a_line_per_regime_and_hollow_single_draws():
    data = pd.concat([scarcity(curves=CURVES), scarcity(dataset="ferplus", curves={"frozen_svm": CURVES["frozen_svm"]})])
    curves = analyses.scarcity_curves(data)
    fig = figures.scarcity_curves(curves, report.DATASET_LABELS, report.MODEL_LABELS,
                                  analyses.regime_labels(curves["regime"]), "t")
    cifar, fer = fig.axes
    assert cifar.get_xscale() == "log" and [t.get_text() for t in cifar.get_xticklabels()] == ["1%", "10%", "100%"]
    assert len(cifar.lines) == 3 and len(fer.lines) == 1
    assert cifar.get_title() == "AlexNet on CIFAR-10"
    check_figure(fig)
    assert list(analyses.regime_labels(["full", "frozen_svm"])) == ["frozen_svm", "full"]
    with pytest.raises(ValueError, match="no_data"):
        figures.scarcity_curves(curves.iloc[:0], report.DATASET_LABELS, report.MODEL_LABELS, {}, "t")


def test_weight_vs_statistics_figure_draws_both_starts_of_each_model_with_intervals_and_the_share():
    row = {"dataset": "cifar10", "wt": 0.8, "wt_low": 0.75, "wt_high": 0.85, "st": 0.4, "st_low": 0.35,
           "st_high": 0.45, "share": 0.5}
    data = pd.DataFrame([{**row, "model": "alexnet"}, {**row, "model": "deit_base", "st": 0.2, "st_low": 0.15, "st_high": 0.25,
                                                     "share": 0.75}],
                        columns=tables.TRANSFER_COLUMNS)
    fig = figures.weight_vs_statistics(data, report.DATASET_LABELS, report.MODEL_LABELS, "t")
    cifar, fer = fig.axes
    assert [t.get_text() for t in cifar.get_xticklabels()] == ["AlexNet\n(WT − ST)/WT = 0.50",
                                                                "DeiT-Base\n(WT − ST)/WT = 0.75"]
    points = [line for line in cifar.lines if line.get_marker() == "o"]
    assert [tuple(line.get_ydata()) for line in points] == [(80.0,), (40.0,), (80.0,), (20.0,)]
    assert [line.get_markerfacecolor() for line in points[1::2]] == ["white", "white"]  # statistics transfer: hollow
    assert fer.get_title() == "FERPlus: no finished pair" and not fer.lines
    check_figure(fig)
    with pytest.raises(ValueError, match="no_data"):
        figures.weight_vs_statistics(data.iloc[:0], report.DATASET_LABELS, report.MODEL_LABELS, "t")
