"""What the Feature reuse and Data scarcity chapters show, computed from the analysis runs' tidy tables (and, for
weight against statistics transfer, from the predictions ``tables.weight_vs_statistics`` pairs).

The two analyses (Matsoukas et al. 2022) write one tidy CSV per run (``store.ANALYSIS_TABLES``);
``Store.analysis_frame`` concatenates them with ``model`` and ``dataset`` columns. Every function here takes
such a frame (the Store only in the thin wrappers at the top), returns a DataFrame or a sentence, and never
assumes that all four model-dataset pairs finished: a pair without a finished run is simply absent, and the
sentences say what they are based on. Fractions stay fractions (accuracy 0.72, not 72).

feature_reuse.csv: ``network`` (backbone, partial, full), ``layer`` (a probe point such as ``pool5`` or
``block3.cls``; for weight_distance and resilience rows the unit, such as ``conv1`` or ``block3``), ``measure``
(knn_k20, knn_k200, cka, weight_distance, resilience_restore, resilience_redraw, and the baseline ``accuracy``
at layer ``output``), ``value``, ``ci_low``, ``ci_high`` (NaN where there is no interval).

data_scarcity.csv: model, dataset, regime, fraction, seed, n_train, n_test, test_accuracy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as _scipy_stats

from .. import config
from . import stats, tables
from .store import ANALYSIS_LABELS, DATASET_LABELS, LADDER, MODEL_LABELS, REGIME_LABELS, REGIME_SHORT, Run, Store

NETWORKS = ("backbone", "partial", "full")
FINETUNED = ("partial", "full")
NETWORK_LABELS = {"backbone": "backbone", "partial": "partial fine-tune", "full": "full fine-tune"}
FINETUNED_LABELS = {n: NETWORK_LABELS[n] for n in FINETUNED}
KNN = {"knn_k20": "k = 20", "knn_k200": "k = 200"}
READOUTS = ("cls", "mean")  # DeiT-Base's two readouts at each probe point: the class token, the patch tokens' mean
READOUT = "mean"  # the one the figures and sentences read (the class token is constant until the first block)
CKA_THRESHOLD = 0.5
HEAD = "head"  # the new classifier: trained from a random start, so it moves far and is always needed
FEATURE_COLUMNS = ["model", "dataset", "network", "layer", "measure", "value", "ci_low", "ci_high"]
SCARCITY_COLUMNS = ["model", "dataset", "regime", "fraction", "seed", "n_train", "n_test", "test_accuracy"]
PAIRS = [(d, m) for d in config.DATASETS for m in config.MODELS]


def pair_label(dataset: str, model: str) -> str:
    """'AlexNet on CIFAR-10'."""
    return f"{MODEL_LABELS.get(model, model)} on {DATASET_LABELS.get(dataset, dataset)}"


def network_label(dataset: str, model: str, network: str) -> str:
    """'AlexNet's full fine-tune on CIFAR-10'."""
    return f"{MODEL_LABELS.get(model, model)}'s {NETWORK_LABELS.get(network, network)} on " \
           f"{DATASET_LABELS.get(dataset, dataset)}"


def _listing(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1] if items else ""


def _of(k: int, n: int, noun: str) -> str:
    """'the one network', 'all 4 networks', '2 of the 4 networks'."""
    return f"the one {noun}" if n == 1 else f"all {n} {noun}s" if k == n else f"{k} of the {n} {noun}s"


def _number(value: float, digits: int = 2) -> str:
    return "—" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def number_ci(value: float, low: float, high: float, digits: int = 2) -> str:
    """'0.93 [0.91, 0.95]': a number that is not a percentage (CKA, a distance) with its interval, if it has one."""
    if value is None or pd.isna(value):
        return "—"
    if pd.isna(low) or pd.isna(high):
        return _number(value, digits)
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def pct_ci(value: float, low: float, high: float) -> str:
    """``tables.pct_ci``, or ``tables.pct`` where the number has no interval."""
    return tables.pct(value) if pd.isna(low) or pd.isna(high) else tables.pct_ci(value, low, high)


def _verdict(a_low: float, a_high: float, b_low: float, b_high: float) -> str:
    """Where B's band lies against A's: 'ahead' (entirely above), 'behind' (entirely below), 'within' (they
    overlap), or 'unknown' (one of them has no band)."""
    if any(pd.isna(v) for v in (a_low, a_high, b_low, b_high)):
        return "unknown"
    return "ahead" if b_low > a_high else "behind" if b_high < a_low else "within"


# --- the store: which runs finished, the frames, the source line ----------------------------------------


def finished(store: Store, name: str) -> list[Run]:
    """The finished runs of analysis ``name``."""
    return [run for (_, _, analysis), run in store.analyses.items() if analysis == name and run.ok]


def runs_table(store: Store, name: str) -> pd.DataFrame:
    """The four runs of analysis ``name``: status (with the error's first line) and provenance."""
    rows = []
    for dataset, model in PAIRS:
        run = store.analysis(dataset, model, name)
        status = run.status if run.status != "missing" else "not run yet"
        if not run.ok and run.error:
            status += ": " + str(run.error).strip().splitlines()[0][:160]
        rows.append({"dataset": DATASET_LABELS[dataset], "model": MODEL_LABELS[model], "status": status,
                     "provenance": run.provenance().replace("*", "").replace("`", "")})
    return pd.DataFrame(rows, columns=["dataset", "model", "status", "provenance"])


def status_sentence(store: Store, name: str) -> str:
    """How many of the four model-dataset pairs the analysis has finished for, and which are not there and why."""
    what = ANALYSIS_LABELS[name]
    done = [(d, m) for d, m in PAIRS if store.analysis(d, m, name).ok]
    if len(done) == len(PAIRS):
        return f"{what} has finished for all {len(PAIRS)} model-dataset pairs."
    by_status: dict[str, list[str]] = {}
    for d, m in PAIRS:
        if (d, m) not in done:
            status = store.analysis(d, m, name).status
            by_status.setdefault("not run yet" if status == "missing" else status, []).append(pair_label(d, m))
    absent = "; ".join(f"{_listing(pairs)} ({status})" for status, pairs in by_status.items())
    if not done:
        return (f"{what} has not finished for any model-dataset pair yet ({absent}), so this page has no numbers to "
                f"show; make book runs it with the rest of the study.")
    return (f"{what} has finished for {len(done)} of the {len(PAIRS)} model-dataset pairs; the figures and sentences "
            f"below are based on those alone. Not finished: {absent}.")


def source(store: Store, name: str) -> str:
    """The source line of a figure: profile, initialisation, device and dates of the analysis's finished runs."""
    runs = finished(store, name)
    if not runs:
        return f"Source: no finished {ANALYSIS_LABELS[name].lower()} run of profile `{store.profile}`."
    return store.source(runs)


def _numeric(frame: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    frame = frame.copy()
    for column in columns:
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    return frame


def feature_frame(store: Store) -> pd.DataFrame:
    """Every finished feature-reuse run's table (``FEATURE_COLUMNS``), values as floats."""
    frame = store.analysis_frame("feature_reuse")
    return _numeric(frame.reindex(columns=[*FEATURE_COLUMNS, *[c for c in frame if c not in FEATURE_COLUMNS]]),
                    ("value", "ci_low", "ci_high"))


def scarcity_frame(store: Store) -> pd.DataFrame:
    """Every finished data-scarcity run's table (``SCARCITY_COLUMNS``), numbers as numbers."""
    frame = store.analysis_frame("data_scarcity")
    return _numeric(frame.reindex(columns=[*SCARCITY_COLUMNS, *[c for c in frame if c not in SCARCITY_COLUMNS]]),
                    ("fraction", "seed", "n_train", "n_test", "test_accuracy"))


def cka_matrix(store: Store, model: str, network: str = "full", read: str | None = READOUT,
               prefer: tuple[str, ...] = config.DATASETS) -> tuple[Run, list[str], np.ndarray] | None:
    """``model``'s layer x layer CKA matrix of ``network`` with itself, from its first finished feature-reuse run
    that kept one (datasets in ``prefer`` order), or None. With ``read``, DeiT's probe points of that readout only."""
    for dataset in prefer:
        run = store.analysis(dataset, model, "feature_reuse")
        if run.ok and (run.run_dir / "cka_matrices.npz").is_file():
            matrices = run.cka_matrices()
            if network in matrices:
                layers, matrix = list(matrices[network][0]), np.asarray(matrices[network][1], dtype=float)
                keep = [i for i, layer in enumerate(layers) if read is None or readout(layer) in (None, read)]
                return run, [layers[i] for i in keep], matrix[np.ix_(keep, keep)]
    return None


SCARCITY_SETTINGS = {"fractions": "fractions", "subset_seeds": "subset draws below 100%",
                     "finetunes": "fine-tunes", "finetune_seeds": "fine-tune draws", "n_train": "training split"}


def scarcity_settings(store: Store) -> pd.DataFrame:
    """What each data-scarcity run trains, per model and dataset: a finished run's recorded settings, otherwise what
    the store's profile would run (``config.resolve``)."""
    rows = []
    for dataset, model in PAIRS:
        run = store.analysis(dataset, model, "data_scarcity")
        try:
            planned = config.resolve("data_scarcity", model, dataset, store.profile)
        except (config.ConfigError, KeyError):
            planned = {}
        cfg = {**planned, **(run.params if run.ok else {})}
        row = {"dataset": DATASET_LABELS[dataset], "model": MODEL_LABELS[model],
               "status": run.status.replace("missing", "not run yet")}
        for key, label in SCARCITY_SETTINGS.items():
            value = cfg.get(key)
            if key == "fractions" and value:
                value = ", ".join(f"{100 * float(f):g}%" for f in value)
            elif key == "finetunes":
                value = ", ".join(REGIME_SHORT.get(r, r) for r in value) if value else "none"
            elif key == "n_train":
                value = f"{value:,} images" if isinstance(value, int) else "all images"
            row[label] = "—" if value is None else value
        rows.append(row)
    return pd.DataFrame(rows)


def note_or(table: pd.DataFrame, empty: str, **show: Any):
    """``tables.show(table, **show)`` for a page, or a note saying ``empty`` when the table has no rows."""
    if len(table):
        return tables.show(table, **show)
    from IPython.display import Markdown

    return Markdown(f"```{{note}}\n{empty}\n```\n")


# --- probe points: where in the network ---------------------------------------------------------------------


def readout(layer: str) -> str | None:
    """DeiT-Base's readout of a probe point ('block3.cls' -> 'cls'); None for a CNN's layer."""
    stem, _, last = str(layer).rpartition(".")
    return last if stem and last in READOUTS else None


def stage(layer: str) -> str:
    """The probe point without its readout: 'block3.cls' -> 'block3', 'pool5' -> 'pool5'."""
    return str(layer).rpartition(".")[0] if readout(layer) else str(layer)


def with_depth(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``stage``, ``readout`` and ``depth``: the probe point's place among its model's probe points,
    0 at the first and 1 at the last (in the order the run wrote them), so AlexNet and DeiT-Base share an axis."""
    frame = frame.copy()
    frame["stage"] = frame["layer"].map(stage)
    frame["readout"] = frame["layer"].map(readout)
    depth = pd.Series(np.nan, index=frame.index, dtype=float)
    for _, rows in frame.groupby(["dataset", "model"], sort=False):
        order = list(pd.unique(rows["stage"]))
        scale = max(len(order) - 1, 1)
        depth[rows.index] = rows["stage"].map({s: i / scale for i, s in enumerate(order)}).astype(float)
    frame["depth"] = depth
    return frame


def probes(frame: pd.DataFrame, measure: str | tuple[str, ...], read: str | None = READOUT) -> pd.DataFrame:
    """The rows of ``measure`` at probe points, with their depth; with ``read``, DeiT's rows of that readout only
    (a CNN's layers have no readout and are always kept)."""
    measures = (measure,) if isinstance(measure, str) else measure
    rows = with_depth(frame[frame["measure"].isin(measures)])
    if read is not None:
        rows = rows[rows["readout"].isna() | (rows["readout"] == read)]
    return rows.reset_index(drop=True)


def _wide(rows: pd.DataFrame, keys: list[str], networks: tuple[str, ...], fmt) -> pd.DataFrame:
    """One row per ``keys`` with one formatted column per network (in the order the rows came)."""
    out = rows.drop_duplicates(keys)[keys].reset_index(drop=True)
    for network in networks:
        part = rows[rows["network"] == network].drop_duplicates(keys).set_index(keys)
        cells = {k: fmt(r.value, r.ci_low, r.ci_high) for k, r in zip(part.index, part.itertuples())}
        out[NETWORK_LABELS[network]] = [cells.get(tuple(k), "—") for k in out[keys].itertuples(index=False)]
    return out


_ORDER = {"dataset": config.DATASETS, "model": config.MODELS, "network": NETWORKS}


def _ordered(frame: pd.DataFrame, by: tuple[str, ...] = ("dataset", "model")) -> pd.DataFrame:
    """Datasets, models (and networks, regimes) in the study's order; rows otherwise as the runs wrote them."""
    def key(s: pd.Series) -> pd.Series:
        if s.name == "regime":
            return s.map(_regime_order)
        order = {v: i for i, v in enumerate(_ORDER.get(s.name, ()))}
        return s.map(lambda v: order.get(v, len(order))) if order else s

    return frame.sort_values(list(by), key=key, kind="stable", ignore_index=True)


def knn_table(frame: pd.DataFrame, measure: str = "knn_k20") -> pd.DataFrame:
    """k-NN test accuracy at every probe point, one column per network (with its interval where it has one)."""
    rows = _ordered(probes(frame, measure, read=None))
    return _wide(rows, ["dataset", "model", "layer"], NETWORKS, pct_ci)


def cka_table(frame: pd.DataFrame) -> pd.DataFrame:
    """CKA of each fine-tuned network's probe point with the backbone's, with its bootstrap interval."""
    rows = _ordered(probes(frame, "cka", read=None))
    return _wide(rows, ["dataset", "model", "layer"], FINETUNED, number_ci)


# --- k-NN: where a usable representation lives -------------------------------------------------------------


def knn_summary(frame: pd.DataFrame, measure: str = "knn_k20", read: str | None = READOUT) -> pd.DataFrame:
    """Per model-dataset pair: the backbone's best probe point for k-NN, and each fine-tune against the backbone at
    the last probe point (``verdict_<network>``: its interval entirely above / below the backbone's, or not)."""
    rows = []
    points = probes(frame, measure, read)
    for (dataset, model), pair in _ordered(points).groupby(["dataset", "model"], sort=False):
        backbone = pair[(pair["network"] == "backbone") & pair["value"].notna()]
        if backbone.empty:
            continue
        best = backbone.loc[backbone["value"].idxmax()]
        last = backbone.loc[backbone["depth"].idxmax()]
        row = {"dataset": dataset, "model": model, "best_layer": best["layer"], "best": best["value"],
               "best_depth": best["depth"], "last_layer": last["layer"], "last": last["value"],
               "last_low": last["ci_low"], "last_high": last["ci_high"]}
        for network in FINETUNED:
            tuned = pair[(pair["network"] == network) & (pair["layer"] == last["layer"])]
            value, low, high = (tuned.iloc[0][["value", "ci_low", "ci_high"]] if len(tuned) else (np.nan,) * 3)
            row |= {network: value, f"{network}_low": low, f"{network}_high": high,
                    f"verdict_{network}": (_verdict(last["ci_low"], last["ci_high"], low, high)
                                           if pd.notna(value) else "absent")}
        rows.append(row)
    return pd.DataFrame(rows, columns=["dataset", "model", "best_layer", "best", "best_depth", "last_layer", "last",
                                       "last_low", "last_high",
                                       *[f"{n}{s}" for n in FINETUNED for s in ("", "_low", "_high")],
                                       *[f"verdict_{n}" for n in FINETUNED]])


def knn_sentence(summary: pd.DataFrame, measure: str = "knn_k20") -> str:
    """Where the backbone's k-NN accuracy peaks, and whether fine-tuning raised it at the last probe point."""
    k = KNN.get(measure, measure)
    if summary.empty:
        return f"No feature-reuse run has finished, so there are no k-NN accuracies ({k}) to read yet."
    n = len(summary)
    early = summary[summary["best_layer"] != summary["last_layer"]]
    pairs = "pair" if n == 1 else "pairs"
    if early.empty:
        text = (f"The backbone's k-NN accuracy ({k}) is highest at its last probe point in "
                f"{'the one' if n == 1 else f'all {n}'} model-dataset {pairs}.")
    else:
        where = [f"{pair_label(r.dataset, r.model)} ({r.best_layer}: {tables.pct(r.best)}, against "
                 f"{tables.pct(r.last)} at {r.last_layer})" for r in early.itertuples()]
        text = (f"The backbone's k-NN accuracy ({k}) is highest at an earlier probe point than its last in "
                f"{len(early)} of {n} model-dataset {pairs}: {_listing(where)}.")
        if len(early) < n:
            text += f" In the other {n - len(early)} it is highest at the last."
    counts = {}
    for network in FINETUNED:
        have = summary[f"verdict_{network}"][summary[f"verdict_{network}"] != "absent"]
        if len(have):
            counts[network] = {v: int((have == v).sum()) for v in ("ahead", "behind", "within", "unknown")}
            counts[network]["n"] = len(have)
    if counts:
        ups = _listing([f"{c['ahead']} of {c['n']} for the {NETWORK_LABELS[n]}" for n, c in counts.items()])
        downs = _listing([str(c["behind"]) for c in counts.values()])
        unknown = sum(c["unknown"] for c in counts.values())
        text += (f" At the last probe point fine-tuning raised the k-NN accuracy beyond both intervals in {ups}, and "
                 f"lowered it beyond them in {downs}; the rest are within the intervals"
                 + (f" or have none ({unknown})." if unknown else "."))
    return text


def knn_k_sentence(frame: pd.DataFrame, read: str | None = READOUT) -> str:
    """Per dataset, at how many probe points (all networks) k = 200 scores below and above k = 20: a large memory
    bank's vote drowns rare classes, which should pull k = 200 down on an imbalanced target."""
    points = probes(frame, ("knn_k20", "knn_k200"), read)
    if points.empty:
        return "No feature-reuse run has finished, so there is no k = 200 to compare with k = 20 yet."
    wide = points.pivot_table(index=["dataset", "model", "network", "layer"], columns="measure", values="value",
                              aggfunc="first").dropna()
    if wide.empty or not {"knn_k20", "knn_k200"} <= set(wide.columns):
        return "No probe point has both k = 20 and k = 200, so the two cannot be compared."
    parts = []
    for dataset in [d for d in config.DATASETS if d in set(wide.index.get_level_values("dataset"))]:
        part = wide.xs(dataset, level="dataset")
        below = int((part["knn_k200"] < part["knn_k20"]).sum())
        above = int((part["knn_k200"] > part["knn_k20"]).sum())
        parts.append(f"{below} of the {len(part)} probe points on {DATASET_LABELS[dataset]} ({above} above)")
    return f"With k = 200 instead of 20, the k-NN accuracy is lower at {_listing(parts)}, counting every network."


# --- CKA: how similar each fine-tuned layer stays to the backbone ----------------------------------------------


def cka_drops(frame: pd.DataFrame, threshold: float = CKA_THRESHOLD, read: str | None = READOUT) -> pd.DataFrame:
    """Per fine-tuned network: the first probe point (in network order) whose CKA with the backbone is below
    ``threshold`` (``layer`` and ``depth`` empty when there is none), and the lowest CKA anywhere."""
    rows = []
    points = _ordered(probes(frame, "cka", read))
    for (dataset, model, network), part in points.groupby(["dataset", "model", "network"], sort=False):
        part = part[part["value"].notna()]
        if network not in FINETUNED or part.empty:
            continue
        below = part[part["value"] < threshold]
        first = below.iloc[0] if len(below) else None
        low = part.loc[part["value"].idxmin()]
        rows.append({"dataset": dataset, "model": model, "network": network,
                     "layer": None if first is None else first["layer"],
                     "depth": np.nan if first is None else first["depth"],
                     "value": np.nan if first is None else first["value"],
                     "ci_high": np.nan if first is None else first["ci_high"],
                     "lowest_layer": low["layer"], "lowest": low["value"]})
    order = {n: i for i, n in enumerate(FINETUNED)}
    frame_out = pd.DataFrame(rows, columns=["dataset", "model", "network", "layer", "depth", "value", "ci_high",
                                            "lowest_layer", "lowest"])
    return frame_out.sort_values("network", key=lambda s: s.map(order), kind="stable", ignore_index=True)


def cka_sentence(drops: pd.DataFrame, threshold: float = CKA_THRESHOLD) -> str:
    """Where each fine-tuned network's CKA with the backbone first falls below ``threshold``, or that it never does."""
    if drops.empty:
        return "No feature-reuse run has finished, so there is no CKA with the backbone to read yet."
    n = len(drops)
    fall, stay = drops[drops["layer"].notna()], drops[drops["layer"].isna()]
    parts = []
    if len(fall):
        where = [f"{network_label(r.dataset, r.model, r.network)} first at {r.layer} (CKA {_number(r.value)}, "
                 f"relative depth {r.depth:.2f})" for r in fall.itertuples()]
        parts.append(f"The CKA with the backbone falls below {threshold} in {_of(len(fall), n, 'fine-tuned network')}: "
                     f"{_listing(where)}.")
    if len(stay):
        lowest = stay.loc[stay["lowest"].idxmin()]
        if len(fall):
            subject = "The other one" if len(stay) == 1 else f"The other {len(stay)}"
        else:
            subject = "The one fine-tuned network" if n == 1 else f"All {n} fine-tuned networks"
        parts.append(f"{subject} {'stays' if len(stay) == 1 else 'stay'} at {threshold} or above at every probe point: "
                     f"by this measure fine-tuning kept {'its' if len(stay) == 1 else 'their'} features similar to the "
                     f"backbone's (lowest CKA {_number(lowest['lowest'])}, "
                     f"{network_label(lowest['dataset'], lowest['model'], lowest['network'])} at "
                     f"{lowest['lowest_layer']}).")
    return " ".join(parts)


# --- weight distance: how far each unit moved ------------------------------------------------------------------


def units(frame: pd.DataFrame, measure: str) -> pd.DataFrame:
    """The rows of a per-unit ``measure`` (weight_distance, resilience_*), with each unit's ``position`` in its
    network (0, 1, ... in the order the run wrote them)."""
    rows = _ordered(frame[frame["measure"] == measure]).rename(columns={"layer": "unit"})
    rows["position"] = rows.groupby(["dataset", "model", "network"], sort=False).cumcount()
    return rows.reset_index(drop=True)


def weight_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Weight distance of every unit (each tensor's ||w - w0|| / ||w0||, summed over the unit's tensors), one column
    per fine-tuned network."""
    rows = units(frame, "weight_distance").rename(columns={"unit": "layer"})
    return _wide(rows, ["dataset", "model", "layer"], FINETUNED, lambda v, lo, hi: _number(v, 4)).rename(
        columns={"layer": "unit"})


def weight_summary(frame: pd.DataFrame, skip: tuple[str, ...] = (HEAD,)) -> pd.DataFrame:
    """Per fine-tuned network, leaving out ``skip`` (the new head): the unit that moved furthest, how many did not
    move at all (frozen), and Spearman's rank correlation between a trained unit's depth and its distance
    (NaN with fewer than 3 trained units)."""
    rows = []
    for (dataset, model, network), part in units(frame, "weight_distance").groupby(
            ["dataset", "model", "network"], sort=False):
        part = part[~part["unit"].isin(skip) & part["value"].notna()]
        if part.empty:
            continue
        top = part.loc[part["value"].idxmax()]
        trained = part[part["value"] > 0]
        rho = np.nan
        if len(trained) >= 3 and trained["value"].nunique() > 1:
            rho = float(_scipy_stats.spearmanr(trained["position"], trained["value"]).statistic)
        rows.append({"dataset": dataset, "model": model, "network": network, "top_unit": top["unit"],
                     "top": top["value"], "frozen": int((part["value"] == 0).sum()), "trained": len(trained),
                     "rho": rho})
    return pd.DataFrame(rows, columns=["dataset", "model", "network", "top_unit", "top", "frozen", "trained", "rho"])


def weight_sentence(summary: pd.DataFrame) -> str:
    """Which unit moved furthest in each fine-tune, and whether the deeper trained units moved more or less."""
    if summary.empty:
        return "No feature-reuse run has finished, so there are no weight distances to read yet."
    tops = [f"{network_label(r.dataset, r.model, r.network)}: {r.top_unit} ({_number(r.top, 4)})"
            for r in summary.itertuples()]
    text = f"Leaving out the new head, the unit that moved furthest from its start is, for {_listing(tops)}."
    frozen = summary[summary["frozen"] > 0]
    if len(frozen):
        kept = [f"{r.frozen} in {network_label(r.dataset, r.model, r.network)}" for r in frozen.itertuples()]
        text += f" Frozen units stayed exactly at their start, as the regime intends: {_listing(kept)}."
    trend = summary[summary["rho"].notna()]
    if trend.empty:
        text += " No fine-tune trained enough units (3 or more) to say whether deeper units moved more."
    else:
        deeper, shallower = int((trend["rho"] > 0).sum()), int((trend["rho"] < 0).sum())
        flat = len(trend) - deeper - shallower
        text += (f" Of the {len(trend)} fine-tunes with 3 or more trained units, the deeper units moved further in "
                 f"{deeper} (Spearman's rank correlation of depth and distance above 0) and less far in {shallower}")
        text += f"; in {flat} there is no trend." if flat else "."
    return text


# --- resilience: which units the fine-tuned network still depends on -----------------------------------------


def resilience_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy with each unit restored to its start and re-drawn at random, beside the network's own
    (baseline) accuracy. ``critical``: restoring the unit alone costs accuracy beyond the baseline's interval
    (its accuracy below the interval's lower end; below the baseline itself where the baseline has no interval);
    ``redraw_critical`` likewise for re-drawing it."""
    keys = ["dataset", "model", "network", "unit"]
    restore = units(frame, "resilience_restore")
    redraw = units(frame, "resilience_redraw")[keys + ["value", "ci_low", "ci_high"]]
    base = frame[(frame["measure"] == "accuracy")].drop_duplicates(["dataset", "model", "network"])
    base = base[["dataset", "model", "network", "value", "ci_low", "ci_high"]].rename(
        columns={"value": "baseline", "ci_low": "baseline_low", "ci_high": "baseline_high"})
    out = restore[keys + ["position", "value", "ci_low", "ci_high"]].rename(
        columns={"value": "restore", "ci_low": "restore_low", "ci_high": "restore_high"})
    out = out.merge(redraw.rename(columns={"value": "redraw", "ci_low": "redraw_low", "ci_high": "redraw_high"}),
                    on=keys, how="outer").merge(base, on=["dataset", "model", "network"], how="left")
    floor = out["baseline_low"].where(out["baseline_low"].notna(), out["baseline"])
    out["critical"] = (out["restore"] < floor).where(out["restore"].notna() & floor.notna())
    out["redraw_critical"] = (out["redraw"] < floor).where(out["redraw"].notna() & floor.notna())
    out["position"] = out["position"].fillna(out.groupby(keys[:3])["position"].transform("max") + 1)
    return _ordered(out.sort_values([*keys[:3], "position"], kind="stable")).drop(columns="position")


def _true(value: Any) -> bool:
    """A flag of ``resilience_table`` (True, False or NaN where it could not be judged) as a plain bool."""
    return bool(pd.notna(value) and value)


def resilience_shown(resilience: pd.DataFrame) -> pd.DataFrame:
    """``resilience_table`` for a page: each accuracy with its interval, and whether the unit is critical."""
    flag = {True: "yes", False: "no"}
    return pd.DataFrame({
        "dataset": resilience["dataset"], "model": resilience["model"],
        "network": resilience["network"].map(lambda n: NETWORK_LABELS.get(n, n)), "unit": resilience["unit"],
        "restored [95% CI]": [pct_ci(*v) for v in zip(resilience["restore"], resilience["restore_low"],
                                                      resilience["restore_high"])],
        "re-drawn [95% CI]": [pct_ci(*v) for v in zip(resilience["redraw"], resilience["redraw_low"],
                                                     resilience["redraw_high"])],
        "as trained [95% CI]": [pct_ci(*v) for v in zip(resilience["baseline"], resilience["baseline_low"],
                                                       resilience["baseline_high"])],
        "critical": [flag.get(bool(c), "—") if pd.notna(c) else "—" for c in resilience["critical"]]})


def critical_units(resilience: pd.DataFrame) -> pd.DataFrame:
    """Per fine-tuned network: its critical units (``resilience_table``), the head apart, and how many of its
    backbone units survive being re-drawn at random (accuracy not below the baseline's interval)."""
    rows = []
    for (dataset, model, network), part in resilience.groupby(["dataset", "model", "network"], sort=False):
        body, head = part[part["unit"] != HEAD], part[part["unit"] == HEAD]
        rows.append({"dataset": dataset, "model": model, "network": network,
                     "critical": [u for u, c in zip(body["unit"], body["critical"]) if _true(c)],
                     "units": int(body["critical"].notna().sum()),
                     "head_critical": bool(len(head)) and _true(head["critical"].iloc[0]),
                     "survive_redraw": sum(pd.notna(c) and not c for c in body["redraw_critical"]),
                     "redrawn": int(body["redraw_critical"].notna().sum())})
    return pd.DataFrame(rows, columns=["dataset", "model", "network", "critical", "units", "head_critical",
                                       "survive_redraw", "redrawn"])


def critical_sentence(critical: pd.DataFrame) -> str:
    """Which backbone units each fine-tuned network needs as fine-tuning left them (restoring one alone costs
    accuracy beyond the baseline's interval), and how many survive being re-drawn at random."""
    if len(critical):
        critical = critical[critical["units"] > 0]
    if critical.empty:
        return "No feature-reuse run has finished, so there is no resilience to read yet."
    n = len(critical)
    some = critical[critical["critical"].map(len) > 0]
    none = critical[critical["critical"].map(len) == 0]
    parts = []
    if len(some):
        where = [f"{network_label(r.dataset, r.model, r.network)} ({_listing(list(r.critical))})"
                 for r in some.itertuples()]
        parts.append(f"Restoring a single backbone unit to its start costs accuracy beyond the baseline's interval in "
                     f"{_of(len(some), n, 'fine-tuned network')}: {_listing(where)}.")
    if len(none):
        if len(some):
            subject = ("The other one has" if len(none) == 1 else f"The other {len(none)} have") + " no critical unit"
        else:
            subject = ("The one fine-tuned network has no critical unit" if n == 1
                       else f"None of the {n} fine-tuned networks has a critical unit")
        heads = int(none["head_critical"].sum())
        text = (f"{subject} in its backbone: undoing any one unit's change alone keeps the accuracy within the "
                f"baseline's interval" if len(none) == 1 else
                f"{subject} in their backbones: undoing any one unit's change alone keeps the accuracy within the "
                f"baseline's interval")
        if heads == len(none):
            text += " (only the new head is critical: restored, it is the random head that fine-tuning started from)."
        elif heads:
            text += f" (the new head is critical in {heads} of them)."
        else:
            text += "."
        parts.append(text)
    redrawn, survive = int(critical["redrawn"].sum()), int(critical["survive_redraw"].sum())
    if redrawn:
        parts.append(f"Re-drawn at random instead, {survive} of the {redrawn} backbone units scored keep the accuracy "
                     f"within the baseline's interval.")
    return " ".join(parts)


# --- data scarcity -----------------------------------------------------------------------------------------------


def _regime_order(regime: str) -> int:
    order = [*LADDER, *[r for r in config.NOTEBOOK_REGIMES if r not in LADDER]]
    return order.index(regime) if regime in order else len(order)


def scarcity_curves(frame: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy per model, dataset, regime and fraction: the mean over the subset draws and its band, the
    min-max over the draws where there are several, a 95% bootstrap interval over the test images where there is
    one (``band``: 'draws' or 'interval')."""
    rows = []
    frame = frame[frame["test_accuracy"].notna()]
    for (model, dataset, regime, fraction), part in frame.groupby(["model", "dataset", "regime", "fraction"]):
        seeds = int(part["seed"].nunique()) if part["seed"].notna().any() else len(part)
        row = {"model": model, "dataset": dataset, "regime": regime, "fraction": float(fraction), "seeds": seeds,
               "n_train": float(part["n_train"].mean()), "n_test": part["n_test"].iloc[0],
               "mean": float(part["test_accuracy"].mean())}
        if len(part) > 1:
            row |= {"low": float(part["test_accuracy"].min()), "high": float(part["test_accuracy"].max()),
                    "band": "draws"}
        elif pd.notna(row["n_test"]) and row["n_test"] > 0:
            n = int(row["n_test"])
            iv = tables.accuracy_interval(int(round(row["mean"] * n)), n)
            row |= {"low": iv.low, "high": iv.high, "band": "interval"}
        else:
            row |= {"low": np.nan, "high": np.nan, "band": "none"}
        rows.append(row)
    out = pd.DataFrame(rows, columns=["model", "dataset", "regime", "fraction", "seeds", "n_train", "n_test", "mean",
                                      "low", "high", "band"])
    return _ordered(out, ("dataset", "model", "regime", "fraction"))


def scarcity_sizes(curves: pd.DataFrame) -> pd.DataFrame:
    """How many training images each fraction is, per dataset and model (the mean over the draws)."""
    if curves.empty:
        return pd.DataFrame(columns=["dataset", "model"])
    sizes = curves.assign(column=[f"{100 * f:g}%" for f in curves["fraction"]])
    wide = sizes.pivot_table(index=["dataset", "model"], columns="column", values="n_train", aggfunc="max", sort=False)
    wide = wide.reindex(columns=[f"{100 * f:g}%" for f in sorted(curves["fraction"].unique())])
    wide = wide.map(lambda v: "—" if pd.isna(v) else f"{int(round(v)):,}").reset_index()
    wide.columns.name = None
    return wide


def scarcity_table(curves: pd.DataFrame) -> pd.DataFrame:
    """The curves for a page: one row per model, dataset and regime, one column per fraction ('72.0% [68.1, 75.6]':
    the mean with its band)."""
    if curves.empty:
        return pd.DataFrame(columns=["dataset", "model", "regime"])
    cells = curves.assign(cell=[tables.pct_ci(m, lo, hi) if b != "none" else tables.pct(m)
                                for m, lo, hi, b in zip(curves["mean"], curves["low"], curves["high"], curves["band"])],
                          column=[f"{100 * f:g}%" for f in curves["fraction"]])
    wide = cells.pivot_table(index=["dataset", "model", "regime"], columns="column", values="cell", aggfunc="first",
                             sort=False)
    fractions = [f"{100 * f:g}%" for f in sorted(curves["fraction"].unique())]
    wide = wide.reindex(columns=fractions).fillna("—").reset_index()
    wide.columns.name = None
    return wide


def seeds_sentence(curves: pd.DataFrame) -> str:
    """Which curves average several subset draws and which have one draw per fraction (their bands are intervals
    over the test images, not a spread over subsets), said plainly."""
    if curves.empty:
        return "No data-scarcity run has finished, so there are no curves yet."
    below = curves[curves["fraction"] < 1]
    single, several = [], []
    for (dataset, model, regime), part in below.groupby(["dataset", "model", "regime"], sort=False):
        name = f"{MODEL_LABELS.get(model, model)}'s {REGIME_SHORT.get(regime, regime)} on " \
               f"{DATASET_LABELS.get(dataset, dataset)}"
        (single if part["seeds"].max() <= 1 else several).append((name, int(part["seeds"].max())))
    text = "At 100% every curve has one draw, the whole training split, so its band there is a 95% interval."
    if not single and not several:
        return text
    if several:
        counts = sorted({s for _, s in several})
        text += (f" Below 100%, {len(several)} curve{'s' if len(several) > 1 else ''} average "
                 f"{' to '.join(map(str, counts))} subset draws at each fraction (band: min to max over the draws).")
    if single:
        text += (f" {_listing([n for n, _ in single])} {'has' if len(single) == 1 else 'have'} only one draw at each "
                 f"fraction: {'its' if len(single) == 1 else 'their'} band is a 95% interval over the test images, and "
                 f"says nothing about how much another subset would change the result.")
    return text


def scarcity_gaps(curves: pd.DataFrame, reference: str = "frozen_svm") -> pd.DataFrame:
    """Each regime against ``reference`` (B − A, fractions) at the smallest and at the largest fraction both ran,
    per model and dataset, with where B's band lies against A's ('ahead', 'behind', 'within')."""
    rows = []
    for (dataset, model), pair in curves.groupby(["dataset", "model"], sort=False):
        base = pair[pair["regime"] == reference].set_index("fraction")
        if base.empty:
            continue
        for regime, part in pair[pair["regime"] != reference].groupby("regime", sort=False):
            part = part.set_index("fraction")
            shared = sorted(set(base.index) & set(part.index))
            if not shared:
                continue
            row = {"dataset": dataset, "model": model, "a": reference, "b": regime}
            for tag, f in (("small", shared[0]), ("large", shared[-1])):
                a, b = base.loc[f], part.loc[f]
                row |= {f"{tag}_fraction": f, f"{tag}_gap": b["mean"] - a["mean"],
                        f"{tag}_verdict": _verdict(a["low"], a["high"], b["low"], b["high"])}
            rows.append(row)
    return pd.DataFrame(rows, columns=["dataset", "model", "a", "b", "small_fraction", "small_gap", "small_verdict",
                                       "large_fraction", "large_gap", "large_verdict"])


_VERDICT_WORDS = {"ahead": "beyond the bands", "behind": "beyond the bands", "within": "within the bands",
                  "unknown": "without a band to judge it by"}


def scarcity_sentence(gaps: pd.DataFrame) -> str:
    """Per model and dataset, each regime's gap to the reference at the fewest and at the most training images and
    whether it exceeds the bands; then, counted, whether the more trained regimes gain or lose ground on the
    reference as the training split grows."""
    if gaps.empty:
        return ("No data-scarcity run has two regimes at a common fraction yet, so there is no gap between regimes "
                "to read.")
    parts = []
    for (dataset, model), pair in gaps.groupby(["dataset", "model"], sort=False):
        said = []
        for r in pair.itertuples():
            a, b = REGIME_SHORT.get(r.a, r.a), REGIME_SHORT.get(r.b, r.b)
            small = (f"{100 * r.small_gap:+.1f} pp with {100 * r.small_fraction:g}% of the training split "
                     f"({_VERDICT_WORDS[r.small_verdict]})")
            if r.large_fraction == r.small_fraction:
                said.append(f"the {b} minus the {a} is {small}, the only fraction both ran")
            else:
                said.append(f"the {b} minus the {a} is {small} and {100 * r.large_gap:+.1f} pp with "
                            f"{100 * r.large_fraction:g}% ({_VERDICT_WORDS[r.large_verdict]})")
        parts.append(f"{pair_label(dataset, model)}: {'; '.join(said)}.")
    spans = gaps[gaps["large_fraction"] > gaps["small_fraction"]]
    if len(spans):
        gains = int((spans["large_gap"] > spans["small_gap"]).sum())
        loses = int((spans["large_gap"] < spans["small_gap"]).sum())
        reference = REGIME_SHORT.get(spans["a"].iloc[0], spans["a"].iloc[0]) if spans["a"].nunique() == 1 \
            else "the reference regime"
        beyond_small = int(spans["small_verdict"].isin(("ahead", "behind")).sum())
        beyond_large = int(spans["large_verdict"].isin(("ahead", "behind")).sum())
        if len(spans) == 1:
            r = spans.iloc[0]
            verb = "gains on" if gains else "loses ground to" if loses else "keeps its distance to"
            parts.append(f"So the {REGIME_SHORT.get(r['b'], r['b'])} {verb} the {reference} as the training split "
                         f"grows; the difference {'exceeds' if beyond_small else 'is within'} the bands with the "
                         f"fewest images and {'exceeds' if beyond_large else 'is within'} them with the most.")
        else:
            parts.append(f"In {gains} of these {len(spans)} comparisons the more trained regime gains on the "
                         f"{reference} as the training split grows (its difference is larger with the most images "
                         f"than with the fewest), in {loses} it loses ground; the difference exceeds the bands in "
                         f"{beyond_small} with the fewest images and in {beyond_large} with the most.")
    return " ".join(parts)


def scarcity_gap_table(gaps: pd.DataFrame) -> pd.DataFrame:
    """The gaps for a page: percentage points, and where the bands put them."""
    out = gaps.assign(a=gaps["a"].map(lambda r: REGIME_SHORT.get(r, r)), b=gaps["b"].map(lambda r: REGIME_SHORT.get(r, r)))
    for tag in ("small", "large"):
        out[f"{tag}_fraction"] = [f"{100 * f:g}%" for f in out[f"{tag}_fraction"]]
        out[f"{tag}_gap"] = [f"{100 * g:+.1f} pp" for g in out[f"{tag}_gap"]]
    return out.rename(columns={"a": "against", "b": "regime", "small_fraction": "fewest", "small_gap": "gap (fewest)",
                               "small_verdict": "bands (fewest)", "large_fraction": "most",
                               "large_gap": "gap (most)", "large_verdict": "bands (most)"})


def regime_labels(regimes: Any = None) -> dict[str, str]:
    """Regime labels for the scarcity figure's legend, least trained first."""
    names = sorted(set(regimes) if regimes is not None else set(LADDER), key=_regime_order)
    return {r: REGIME_LABELS.get(r, r) for r in names}


# --- weight transfer against statistics transfer (tables.weight_vs_statistics) ---------------------------------


def transfer_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The WT-against-ST comparison for a page: both accuracies, WT − ST and (WT − ST) / WT with their intervals,
    McNemar's p."""
    rows = [{"dataset": DATASET_LABELS[r.dataset], "model": MODEL_LABELS[r.model],
             "weight transfer [95% CI]": tables.pct_ci(r.wt, r.wt_low, r.wt_high),
             "statistics transfer [95% CI]": tables.pct_ci(r.st, r.st_low, r.st_high),
             "WT − ST [95% CI]": tables.pp_ci(r.difference, r.diff_low, r.diff_high),
             "McNemar p": stats.format_p(r.p).removeprefix("p = "),
             "(WT − ST) / WT [95% CI]": number_ci(r.share, r.share_low, r.share_high)}
            for r in _ordered(frame).itertuples()]
    return pd.DataFrame(rows, columns=["dataset", "model", "weight transfer [95% CI]", "statistics transfer [95% CI]",
                                       "WT − ST [95% CI]", "McNemar p", "(WT − ST) / WT [95% CI]"])


def transfer_sentence(frame: pd.DataFrame) -> str:
    """Whether weight transfer beats statistics transfer beyond chance in each pair, and on each dataset which model
    has the larger (WT − ST) / WT, whether their intervals are apart, and whether that agrees with Matsoukas et al.
    (2022), who found the ViT relying more on the pretrained features than the CNN."""
    if frame.empty:
        return ("No statistics-transfer run has finished beside its full fine-tune yet, so weight and statistics "
                "transfer cannot be compared here.")
    beyond = frame[frame["p"] < stats.ALPHA]
    wt_ahead, st_ahead = ([pair_label(r.dataset, r.model) for r in beyond.itertuples() if keep(r.difference)]
                          for keep in (lambda d: d > 0, lambda d: d < 0))
    parts = [f"weight transfer beats statistics transfer beyond chance in {len(wt_ahead)}"
             + (f" ({_listing(wt_ahead)})" if wt_ahead else "")]
    if st_ahead:
        parts.append(f"statistics transfer beats weight transfer beyond chance in {len(st_ahead)} "
                     f"({_listing(st_ahead)})")
    n = len(frame)
    if same := n - len(wt_ahead) - len(st_ahead):
        parts.append(f"the difference is within chance in {same}")
    text = (f"Of the {n if n > 1 else 'one'} model-dataset pair{'s' if n > 1 else ''} with both runs (McNemar's "
            f"exact test, p < {stats.ALPHA}), {_listing(parts)}.")
    for dataset in config.DATASETS:
        both = frame[frame["dataset"] == dataset].set_index("model")
        if not set(config.MODELS) <= set(both.index) or both["share"].isna().any():
            continue
        cnn, vit = both.loc[config.MODELS[0]], both.loc[config.MODELS[1]]
        verdict = _verdict(cnn["share_low"], cnn["share_high"], vit["share_low"], vit["share_high"])
        (top, high), (other, low) = sorted(((MODEL_LABELS[m], both.loc[m, "share"]) for m in config.MODELS),
                                           key=lambda item: item[1], reverse=True)
        text += (f" On {DATASET_LABELS[dataset]}, (WT − ST) / WT is larger for {top} ({_number(high)} against "
                 f"{_number(low)} for {other})")
        if verdict == "within":
            text += (", but the two intervals overlap, so this build does not show that one model relies more on "
                     "the pretrained features than the other.")
        else:
            holds = "as" if verdict == "ahead" else "unlike what"
            text += (f" and the intervals are apart: {top} relies more on the pretrained features, "
                     f"{holds} Matsoukas et al. found for ViTs against CNNs.")
    return text
