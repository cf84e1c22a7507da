"""The model-building method on public predictive-maintenance data nobody here made.

    python -m models.public [--quick] [--data DIR] [--seed N]

Same steps as the harvester model (models/build.py): window statistics as features (the agent's own
`agent.features.window_stat`), `Normaliser`, the same `train` (MLP 256-128 with missing-feature augmentation),
skl2onnx export, int8 dynamic quantization as `models.build.quantize` does it, and scores from onnxruntime for
fp32 and int8 on held-out rows. None of these sets is a harvester: they show the method, not the shipped model.
The data are read where they lie (../shared/data/pdm); nothing is copied.

- UCI hydraulic test rig (real, CC BY 4.0): 2,205 load cycles of 60 s; each cycle is one window over its
  temperature, flow, vibration and efficiency channels (the pressure channels are missing from our copy).
  Tasks: cooler degraded, valve degraded, internal pump leakage. Consecutive cycles are correlated (the rig holds
  each condition for 10 to 700 cycles), so the split is by blocks of 50 consecutive cycles, not cycle by cycle.
- AI4I 2020 (simulated milling machine, CC BY 4.0): one row per product, the six given process columns as
  features, task: machine failure. Rows are independent products: a seeded random split of rows.
- NASA C-MAPSS FD001 (simulated turbofans, public domain): windows of 30 cycles of each engine's varying
  sensors; task: at most 30 cycles to failure. Split by engine, so no engine is on both sides.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from agent.features import window_stat
from models.training import Normaliser, train_plain

Array = npt.NDArray[np.float64]
Labels = npt.NDArray[np.int64]
# The public data sets, beside the repository (never copied into it).
PUBLIC_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pdm"
STATS = ("mean", "std", "min", "max", "last", "slope")
HYDRAULIC = ("TS1", "TS2", "TS3", "TS4", "FS1", "FS2", "VS1", "CE", "CP", "SE")
HYDRAULIC_BLOCK = 50  # cycles; longer than the valve (10) and pump (41-51) condition runs, so a block mixes states
CMAPSS_WINDOW = 30  # cycles per window
CMAPSS_HORIZON = 30  # positive: remaining useful life <= this many cycles
TEST_SHARE = 0.3
SCORE_BATCH = 16  # windows per onnxruntime call, as agent.scoring.Scorer scores them


class Missing(Exception):
    """A data file that is not there."""


class Loaded(NamedTuple):
    x: Array
    tasks: dict[str, Labels]
    groups: Array  # rows sharing a group value go to the same side of the split
    notes: str


def _need(p: Path) -> Path:
    if not p.exists():
        raise Missing(str(p))
    return p


def _window_features(t: Array, c: Array) -> Array:
    """One row of `STATS` per row of `c` (rows, samples), the samples taken at times `t`."""
    return np.array([[window_stat(s, t, row) for s in STATS] for row in c])


def load_hydraulic(d: Path, quick: bool) -> Loaded:
    paths = [_need(d / f"{name}.txt.gz") for name in HYDRAULIC]
    prof = np.loadtxt(_need(d / "profile.txt"))
    blocks = []
    for p in paths:
        with gzip.open(p, "rt") as f:
            c = np.loadtxt(f)
        blocks.append(_window_features(np.linspace(0.0, 60.0, c.shape[1], endpoint=False), c))
    x = np.hstack(blocks)
    tasks = {
        "cooler_degraded": (prof[:, 0] != 100).astype(np.int64),
        "valve_degraded": (prof[:, 1] != 100).astype(np.int64),
        "pump_leakage": (prof[:, 2] > 0).astype(np.int64),
    }
    groups = (np.arange(len(x)) // HYDRAULIC_BLOCK).astype(np.float64)
    notes = (f"{len(HYDRAULIC)} channels x {len(STATS)} statistics per 60 s cycle; split by blocks of "
             f"{HYDRAULIC_BLOCK} consecutive cycles (neighbouring cycles are correlated)")
    # No subsampling even when quick: training takes a second, and on every other cycle the valve task's ROC-AUC
    # swung from 0.69 to 0.98 with the seed, too unstable to hold to a floor.
    del quick
    return Loaded(x, tasks, groups, notes)


def load_ai4i(d: Path, quick: bool) -> Loaded:
    with _need(d / "ai4i2020.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    kind = {"L": 0.0, "M": 1.0, "H": 2.0}  # the product quality grades, in order
    # Only the process columns: TWF/HDF/PWF/OSF/RNF are the failure modes that make up the label. Derived physics
    # (power, temperature difference) would match the generator's own failure rules; left out to keep the method
    # generic (with them the full run's PR-AUC rises from about 0.73 to 0.80, ROC-AUC barely moves).
    x = np.array([[kind.get(r["Type"], np.nan), float(r["Air temperature [K]"]), float(r["Process temperature [K]"]),
                   float(r["Rotational speed [rpm]"]), float(r["Torque [Nm]"]), float(r["Tool wear [min]"])]
                  for r in rows])
    y = np.array([int(r["Machine failure"]) for r in rows], np.int64)
    groups = np.arange(len(x)).astype(np.float64)
    notes = "type, air and process temperature, speed, torque, tool wear; seeded random split of rows (products)"
    if quick:
        return Loaded(x[::2], {"machine_failure": y[::2]}, groups[::2], notes + "; quick: every other row")
    return Loaded(x, {"machine_failure": y}, groups, notes)


def load_cmapss(d: Path, quick: bool) -> Loaded:
    raw = np.loadtxt(_need(d / "train_FD001.txt"))
    unit, cycle, sensors = raw[:, 0].astype(np.int64), raw[:, 1], raw[:, 5:]
    varying = sensors.std(axis=0) > 1e-6  # FD001 runs at one operating condition: several sensors are constant
    sensors = sensors[:, varying]
    step = 10 if quick else 5  # windows overlap heavily; a sparser hop loses little
    xs, ys, gs = [], [], []
    for u in np.unique(unit):
        m = unit == u
        s, c = sensors[m], cycle[m]
        life = c.max()
        for end in range(CMAPSS_WINDOW, len(c) + 1, step):
            w = slice(end - CMAPSS_WINDOW, end)
            xs.append([window_stat(st, c[w], s[w, j]) for j in range(s.shape[1]) for st in ("mean", "last", "slope")])
            ys.append(int(life - c[end - 1] <= CMAPSS_HORIZON))
            gs.append(float(u))
    notes = (f"{int(varying.sum())} varying sensors x mean, last, slope over {CMAPSS_WINDOW} cycles, a window every "
             f"{step} cycles; split by engine")
    return Loaded(np.array(xs), {f"within_{CMAPSS_HORIZON}_cycles_of_failure": np.array(ys, np.int64)},
                  np.array(gs), notes)


SETS: dict[str, tuple[str, str, Callable[[Path, bool], Loaded]]] = {
    "uci_hydraulic": ("uci_hydraulic_partial", "UCI hydraulic test rig (real; Helwig et al. 2015; CC BY 4.0)",
                      load_hydraulic),
    "ai4i2020": ("ai4i2020", "AI4I 2020 predictive maintenance (simulated; Matzka 2020; CC BY 4.0)", load_ai4i),
    "nasa_cmapss_fd001": ("nasa_cmapss", "NASA C-MAPSS FD001 turbofans (simulated; Saxena et al. 2008; public domain)",
                          load_cmapss),
}


def _split(groups: Array, seed: int) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Train and test masks, `TEST_SHARE` of the groups held out, seeded: no group is on both sides."""
    rng = np.random.default_rng(seed)
    uniq = np.unique(groups)
    held = rng.choice(uniq, size=max(1, round(TEST_SHARE * len(uniq))), replace=False)
    test = np.isin(groups, held)
    return ~test, test


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # quantize_dynamic warns on the root logger about shape pre-processing, meant for conv nets, once per model.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _fit_and_score(x_tr: Array, y_tr: Labels, x_te: Array, seed: int, folder: Path) -> tuple[Array, Array, float]:
    """Held-out scores (1 - P(healthy)) of the fp32 and the int8 model, and their file size ratio."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    from agent.scoring import session_options

    norm = Normaliser.fit(x_tr)
    clf = train_plain(norm.plain(x_tr), y_tr, seed)
    model = convert_sklearn(clf, initial_types=[("features", FloatTensorType([None, x_tr.shape[1]]))],
                            options={id(clf): {"zipmap": False}}, target_opset=17)
    fp32, int8 = folder / "m.onnx", folder / "m.int8.onnx"
    fp32.write_bytes(model.SerializeToString())
    with _quiet_root_logger():
        # As models.build.quantize, without the harvester contract these sets have no use for.
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
    z = norm.plain(x_te)
    scores = []
    for path in (fp32, int8):
        sess = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
        # In the agent's batches: dynamic quantization scales activations by each batch's range, so one batch of
        # all held-out rows (outliers at |z| > 30 included) costs the int8 model up to 0.03 ROC-AUC that it does
        # not lose on the vehicle.
        probs = np.vstack([sess.run(["probabilities"], {"features": z[i : i + SCORE_BATCH]})[0]
                           for i in range(0, len(z), SCORE_BATCH)])
        scores.append(1.0 - np.asarray(probs, np.float64)[:, 0])
    return scores[0], scores[1], int8.stat().st_size / fp32.stat().st_size


def evaluate_public(data_dir: Path, seed: int = 1, quick: bool = False) -> dict[str, Any]:
    """{"<dataset>/<task>": {"source": str, "n_train": int, "n_test": int, "positive_share": float,
        "fp32": {"roc_auc": float, "pr_auc": float}, "int8": {"roc_auc": float, "pr_auc": float},
        "size_ratio": float, "roc_auc_loss_int8": float, "notes": str}, ...}
    A data set whose files are absent is reported as {"<dataset>": {"skipped": "<which file> is absent"}} instead.
    `positive_share` is over all rows used (train and test)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    out: dict[str, Any] = {}
    for name, (folder, source, load) in SETS.items():
        t0 = time.monotonic()
        try:
            data = load(Path(data_dir) / folder, quick)
        except Missing as e:
            out[name] = {"skipped": f"{e} is absent"}
            print(f"public data {name}: skipped, {e} is absent", file=sys.stderr)
            continue
        tr, te = _split(data.groups, seed)
        for task, y in data.tasks.items():
            with tempfile.TemporaryDirectory() as d:
                s32, s8, ratio = _fit_and_score(data.x[tr], y[tr], data.x[te], seed, Path(d))
            res: dict[str, Any] = {"source": source, "n_train": int(tr.sum()), "n_test": int(te.sum()),
                                   "positive_share": round(float(y.mean()), 4)}
            for k, s in (("fp32", s32), ("int8", s8)):
                res[k] = {"roc_auc": round(float(roc_auc_score(y[te], s)), 4),
                          "pr_auc": round(float(average_precision_score(y[te], s)), 4)}
            res["size_ratio"] = round(ratio, 4)
            res["roc_auc_loss_int8"] = round(res["fp32"]["roc_auc"] - res["int8"]["roc_auc"], 4)
            res["notes"] = data.notes
            out[f"{name}/{task}"] = res
            print(f"public data {name}/{task}: ROC-AUC fp32 {res['fp32']['roc_auc']:.4f} int8 "
                  f"{res['int8']['roc_auc']:.4f} ({time.monotonic() - t0:.1f}s)", file=sys.stderr)
            t0 = time.monotonic()
    return out


def render_public(section: dict[str, Any]) -> list[str]:
    """Markdown lines for the model card: what the section shows, a table, and each set's source and split."""
    lines = [
        "## Public data sets",
        "The same method (window statistics, standardisation, the same MLP, int8 dynamic quantization) trained and",
        "scored on public predictive-maintenance data nobody here made, on held-out rows (`python -m models.public`).",
        "None of them is a harvester, and only the hydraulic rig is real measurement: this shows the method carries",
        "to data it was not designed around, not how the shipped model does in the field.",
        "",
        "| data set / task | train / test | positives | ROC-AUC fp32 / int8 | PR-AUC fp32 / int8 | int8 size "
        "| int8 ROC-AUC loss |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    about: dict[str, tuple[str, str]] = {}
    for k, v in section.items():
        if "skipped" in v:
            lines.append(f"| {k} | skipped: {v['skipped']} | | | | | |")
            continue
        about.setdefault(k.split("/")[0], (v["source"], v["notes"]))
        lines.append(
            f"| {k} | {v['n_train']} / {v['n_test']} | {v['positive_share']:.1%} | "
            f"{v['fp32']['roc_auc']:.4f} / {v['int8']['roc_auc']:.4f} | "
            f"{v['fp32']['pr_auc']:.4f} / {v['int8']['pr_auc']:.4f} | {v['size_ratio']:.3f} | "
            f"{v['roc_auc_loss_int8']:+.4f} |"
        )
    if about:
        lines.append("")
        lines += [f"- {k}: {src}; {notes}." for k, (src, notes) in about.items()]
    return lines


def main(argv: list[str] | None = None) -> int:

    doc = __doc__ or "public data"
    p = argparse.ArgumentParser(prog="python -m models.public", description=doc.splitlines()[0])
    p.add_argument("--data", type=Path, default=PUBLIC_DATA, help="folder holding the data sets (../shared/data/pdm)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="fewer rows: a smoke run")
    a = p.parse_args(argv)
    t0 = time.monotonic()
    print("\n".join(render_public(evaluate_public(a.data, a.seed, a.quick))))
    print(f"public data: {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
