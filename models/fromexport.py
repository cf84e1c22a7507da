"""`python -m models.build --from-export DIR [--base PKG]`: the next model from what the fleet recorded and what
its people said (docs/learning_loop.md, "The next model"; docs/models.md, "Building from an export").

    python -m models.build --from-export DIR [--base PKG [--trusted-key PUB]] [--key KEY] [--version V]
                           [--out OUT] [--quick] [--seed N] [--jobs N] [--cache DIR] [--real-traces DIR]

1. The base: the model of package PKG (its signature verified with `--trusted-key`; without one its structure and
   hashes are checked and the card says it was not verified), or the shipped models/harvester-anomaly.int8.onnx.
   The candidate keeps the base's name, classes, features, hop, required features and alert policy; its version
   is `--version`, by default the base's with the minor part one up (2.0.0 → 2.1.0).
2. Windows: each vehicle's samples of the export, day by day, through the agent's FeatureEngine with the base's
   features (models/exportread.py).
3. Labels from the verdicts and breakdowns (models/fleetlabels.py, which documents them and their constants:
   `LEAD_S` = 60 s before an alert opened belong to its verdict, `LABEL_HORIZON_S` = 30 min before a breakdown
   show its fault, `HELD_OUT_SHARE` = 0.3 of the labelled vehicle-days are held out by hash).
4. Training: the fleet's labelled windows of the other vehicle-days, every one of them, and the simulator's
   labelled runs (the standard recipe's training runs, `--quick`: its small set; every second window, as the build
   takes them) with the same recipe as the shipped model (models/recipe.py: normaliser, signals taken away, MLP,
   familiarity envelope over simulated runs and fleet vehicle-days), exported to ONNX and int8.
5. The candidate and the base on the same held-out windows, and both through the real healthy traces
   (models/fleeteval.py, models/realtraces.py); the decision; the card (`NAME-VERSION.card.json` and `.card.md`,
   beside `NAME-VERSION.onnx` and `.int8.onnx` in OUT); with `--key`, when at least as good, the signed package
   OUT/NAME-VERSION.pkg (harvester_common/modelpkg.py, as `cloud-sync model sign` makes it).

Exit status 0: built (and signed with --key); 1: refused, each reason printed and in the card, no package (one
left from an earlier run under that name is removed); 2: bad input, one line, nothing written. Progress on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from agent.contract import Contract, ContractError
from agent.scoring import ModelLoadError, Scorer
from harvester_common import modelpkg
from harvester_common.clirun import UserError, read_limited, write_atomically
from models.dataset import HEALTHY, engine_running
from models.exportread import Export, ExportError, open_export, vehicle_windows
from models.fleetcard import render_card
from models.fleeteval import BASE, CANDIDATE, HeldOutDay, compare, decide, run_model
from models.fleetlabels import (
    HELD_OUT_SHARE,
    LABEL_HORIZON_S,
    LEAD_S,
    Timeline,
    clean_day,
    episodes,
    held_out,
    label_windows,
    timeline,
)
from models.recipe import export_onnx, familiarity, feature_stats, plan_runs, quantize, simulate_all, train
from models.training import Normaliser

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SHIPPED = Path(__file__).resolve().parent / "harvester-anomaly.int8.onnx"
# What a vehicle needs to run the candidate: any agent that reads packages (as `cloud-sync model sign` asks).
MIN_AGENT_VERSION = "0.1.0"
SIM_RUN_S = 1200.0  # the standard recipe's run length, with or without --quick


@dataclass(frozen=True, slots=True)
class Base:
    model: bytes
    contract: Contract
    source: dict[str, Any]  # what the card says of it


@dataclass(slots=True)
class DayData:
    vehicle: str
    day: str
    end: npt.NDArray[np.float64]
    x: npt.NDArray[np.float64]
    labels: list[str | None]
    reasons: list[str]
    clean: bool


def say(text: str, t0: float) -> None:
    print(f"[{time.monotonic() - t0:5.1f}s] {text}", file=sys.stderr, flush=True)


def next_version(version: str) -> str:
    """The base's version with its minor part one up: 2.0.0 → 2.1.0, 2.3.7 → 2.4.0, 2 → 2.1."""
    try:
        parts = modelpkg.version_tuple(version)
    except modelpkg.PackageError:
        raise UserError(f"the base's version {version[:40]!r} is not 1 to 4 dot-separated integers: give --version"
                        ) from None
    if len(parts) == 1:
        return f"{parts[0]}.1"
    return ".".join(str(p) for p in (parts[0], parts[1] + 1, *(0 for _ in parts[2:])))


def load_base(package: Path | None, trusted_key: Path | None) -> Base:
    """The base model: a package's (verified with `trusted_key` if given), or the shipped one. UserError for a
    package that does not verify or parse, or a model that does not load."""
    if package is None:
        model = read_limited(SHIPPED, "model", modelpkg.MAX_PACKAGE_BYTES)
        source: dict[str, Any] = {"kind": "shipped model", "path": str(SHIPPED), "verified": None}
        where = str(SHIPPED)
    else:
        data = read_limited(package, "package", modelpkg.MAX_PACKAGE_BYTES)
        try:
            if trusted_key is not None:
                pkg = modelpkg.verify_package(data, modelpkg.load_public_keys([trusted_key]))
            else:
                pkg = modelpkg.parse_package(data)
                # No key to check the signature with: the hashes at least catch a damaged file.
                for what, part, want in (("model", pkg.model, pkg.manifest.sha256),
                                         ("card", pkg.card, pkg.manifest.card_sha256)):
                    if hashlib.sha256(part).hexdigest() != want:
                        raise modelpkg.PackageError("hash_mismatch", f"the {what} does not hash to what the "
                                                                     "manifest says")
        except modelpkg.PackageError as e:
            if e.code == "bad_key_file":
                raise UserError(str(e)) from None
            raise UserError(f"{package}: the base package is refused ({e.code}): {e}") from None
        model = pkg.model
        source = {"kind": "package", "path": str(package), "package_sha256": pkg.package_sha256,
                  "key_id": pkg.manifest.key_id, "verified": trusted_key is not None,
                  "manifest": {"name": pkg.manifest.name, "version": pkg.manifest.version}}
        where = str(package)
    try:
        scorer = Scorer.load_bytes(model)
    except (ModelLoadError, ContractError) as e:
        raise UserError(f"{where}: the base model cannot be used: {e}") from None
    c = scorer.contract
    if package is not None and (c.model_name, c.model_version) != (source["manifest"]["name"],
                                                                   source["manifest"]["version"]):
        raise UserError(f"{package}: the package says {source['manifest']['name']} {source['manifest']['version']}, "
                        f"its model {c.model_name} {c.model_version}")
    source["model_sha256"] = hashlib.sha256(model).hexdigest()
    return Base(model, c, source)


def read_fleet(export: Export, base: Base, t0: float) -> tuple[list[DayData], Timeline]:
    """Every vehicle-day's windows with their labels and the reasons for the ones left out."""
    c = base.contract
    tl = timeline(export.alerts, export.verdicts, export.breakdowns, c.classes, c.healthy_class)
    out: list[DayData] = []
    for k, vehicle in enumerate(export.vehicles):
        n = 0
        for dw in vehicle_windows(export, vehicle, c.features, c.hop_s):
            labels, reasons = label_windows(tl, vehicle, dw.day, dw.end, engine_running(dw.x, c.features),
                                            c.healthy_class, dw.full)
            out.append(DayData(vehicle, dw.day, dw.end, dw.x, labels, reasons, clean_day(tl, vehicle, dw.day)))
            n += len(dw.end)
        say(f"vehicle {k + 1}/{len(export.vehicles)} {vehicle}: {n} windows", t0)
    return out, tl


def _count(labels: list[str | None]) -> dict[str, int]:
    return dict(sorted(Counter(lab for lab in labels if lab is not None).items()))


def data_summary(days: list[DayData], held: set[tuple[str, str]], tl: Timeline, export: Export,
                 classes: tuple[str, ...]) -> dict[str, Any]:
    train_c: Counter[str] = Counter()
    held_c: Counter[str] = Counter()
    left: Counter[str] = Counter()
    rows = []
    for d in days:
        lab = _count(d.labels)
        why = dict(sorted(Counter(r for r in d.reasons if r).items()))
        (held_c if (d.vehicle, d.day) in held else train_c).update(lab)
        left.update(why)
        rows.append({"vehicle": d.vehicle, "day": d.day, "windows": len(d.end), "labelled": lab, "left_out": why,
                     "clean": d.clean, "held_out": (d.vehicle, d.day) in held})
    return {
        "export": str(export.root),
        "export_manifest": {k: export.manifest[k] for k in ("arguments", "rows") if k in export.manifest},
        "vehicles": export.vehicles,
        "days": sorted({d.day for d in days}),
        "samples_read": export.samples_read,
        "samples_out_of_range": export.samples_out_of_range,
        "alerts": dict(sorted(tl.alerts_by_verdict.items())),
        "verdicts": len(export.verdicts),
        "verdicts_without_alert": tl.verdicts_without_alert,
        # Rows no window can be placed by (no id, no time): counted, never silently dropped.
        "records_unusable": dict(sorted((Counter(export.unusable) + Counter(tl.unusable)).items())),
        "breakdowns": len(export.breakdowns),
        "windows_per_label": {"train": dict(sorted(train_c.items())), "held_out": dict(sorted(held_c.items()))},
        "left_out": dict(sorted(left.items())),
        "faults_outside_classes": dict(sorted(tl.outside_classes.items())),
        "classes": list(classes),
        "vehicle_days": rows,
        "labelling": {"lead_s": LEAD_S, "label_horizon_s": LABEL_HORIZON_S, "held_out_share": HELD_OUT_SHARE},
    }


@dataclass(frozen=True, slots=True)
class Inputs:
    key: Ed25519PrivateKey | None
    base: Base
    name: str
    version: str
    export: Export
    out: Path


def check_inputs(a: argparse.Namespace) -> Inputs:
    """Everything the user gave, checked before any work: a bad key fails in a second, not after the training."""
    key = None
    if a.key is not None:
        try:
            key = modelpkg.load_private_key(a.key)
        except modelpkg.PackageError as e:
            raise UserError(str(e)) from None
    if a.version is not None:
        try:
            modelpkg.version_tuple(a.version)
        except modelpkg.PackageError:
            raise UserError(f"--version {a.version[:40]!r}: not 1 to 4 dot-separated integers") from None
    if a.trusted_key is not None and a.base is None:
        raise UserError("--trusted-key verifies the --base package: give --base too")
    base = load_base(a.base, a.trusted_key)
    bc = base.contract
    version = a.version or next_version(bc.model_version)
    if version == bc.model_version:
        raise UserError(f"--version {version} is the base's own version: the candidate needs another")
    try:
        export = open_export(a.from_export)
    except ExportError as e:
        raise UserError(str(e)) from None
    out: Path = a.out
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: not a directory")
    return Inputs(key, base, bc.model_name, version, export, out)


@dataclass(frozen=True, slots=True)
class Candidate:
    contract: Contract
    fp32: bytes
    model: bytes  # int8: what ships
    simulator_runs: int
    simulator_windows: int
    fleet_windows: int
    fold_unfamiliar: float


def train_candidate(a: argparse.Namespace, inp: Inputs, days: list[DayData], held: set[tuple[str, str]],
                    t0: float) -> Candidate:
    """The fleet's labelled windows of the training vehicle-days and the simulator's runs, through the recipe."""
    bc = inp.base.contract
    classes, healthy, feats = list(bc.classes), bc.healthy_class, list(bc.features)
    train_days = [d for d in days if (d.vehicle, d.day) not in held]
    fleet_x = [d.x[[lab is not None for lab in d.labels]] for d in train_days]
    fleet_y = [np.array([classes.index(lab) for lab in d.labels if lab is not None], np.int64) for d in train_days]
    # The small set's runs as long as the standard ones: a fleet's vehicles run for hours, and the quick build's
    # 5-minute runs never reach the temperatures of a long harvest, which a candidate trained on them then calls a
    # fault (docs/learning_loop.md, "The next model": decisions).
    specs = [s for s in plan_runs(a.seed, a.quick, SIM_RUN_S)[0] if s.fault is None or s.fault in classes]
    sim = simulate_all(specs, "sim runs", a.jobs, a.cache, feats, bc.hop_s)
    sim_x, sim_y = [], []
    for run in sim:
        labs = run.labels()
        keep = [lab is not None for lab in labs]
        sim_x.append(run.x[keep][::2])  # every second window: 5 s apart they share 25 of their 30 s
        sim_y.append(np.array([classes.index(healthy if lab == HEALTHY else lab) for lab in labs if lab is not None],
                              np.int64)[::2])
    x_raw = np.vstack([*sim_x, *fleet_x])
    y = np.concatenate([*sim_y, *fleet_y])
    absent = [c for i, c in enumerate(classes) if not (y == i).any()]
    if absent:
        raise UserError(f"no training data for the base's class(es) {', '.join(absent)}: neither the simulator nor "
                        "the export has any")
    norm = Normaliser.fit(x_raw)
    fam, fold_unfamiliar = familiarity([run.x for run in sim] + [d.x for d in train_days], norm, a.seed)
    n_fleet = int(sum(len(v) for v in fleet_y))
    say(f"training on {len(y)} windows ({n_fleet} from the fleet, {len(y) - n_fleet} simulated; + as many with "
        f"signals taken away)", t0)
    clf = train(x_raw, y, norm, classes, feats, a.seed)
    contract = Contract(
        model_name=inp.name, model_version=inp.version, input_name="features", output_name="probabilities",
        classes=tuple(classes), healthy_class=healthy, hop_s=bc.hop_s, features=tuple(feats),
        mean=tuple(float(v) for v in norm.mean), std=tuple(float(v) for v in norm.std), alert=bc.alert,
        max_missing_fraction=bc.max_missing_fraction,
        training={"data": "a fleet export (verdicts and breakdowns as labels) and harvester simulator runs, "
                          "windowed by the agent's own code",
                  "base": {"name": bc.model_name, "version": bc.model_version}, "seed": a.seed,
                  "runs": len(specs), "fleet_windows": n_fleet, "windows": len(y),
                  "feature_stats": feature_stats(x_raw, [f.name for f in feats])},
        input_layout="features+missing_mask", required_features=bc.required_features, familiarity=fam)
    with tempfile.TemporaryDirectory(prefix="fromexport.") as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        export_onnx(clf, 2 * len(feats), contract, fp32)
        quantize(fp32, int8, contract)
        return Candidate(contract, fp32.read_bytes(), int8.read_bytes(), len(specs), len(y) - n_fleet, n_fleet,
                         fold_unfamiliar)


def build_from_export(a: argparse.Namespace) -> int:
    t0 = time.monotonic()
    inp = check_inputs(a)
    base, bc, export, out = inp.base, inp.base.contract, inp.export, inp.out
    say(f"base {bc.model_name} {bc.model_version} ({base.source['kind']}); candidate {inp.name} {inp.version}; "
        f"export {export.root}: {len(export.vehicles)} vehicles, {len(export.days())} vehicle-days", t0)
    try:
        days, tl = read_fleet(export, base, t0)
    except ExportError as e:
        raise UserError(str(e)) from None
    day_classes = {(d.vehicle, d.day): set(_count(d.labels)) for d in days if _count(d.labels)}
    if not day_classes:
        raise UserError(f"no labelled data in {export.root}: {sum(len(d.end) for d in days)} windows, none labelled "
                        f"({len(export.alerts)} alert records, {len(export.verdicts)} verdicts, "
                        f"{len(export.breakdowns)} breakdowns, and no vehicle-day clear of alerts and breakdowns)")
    held = held_out(day_classes)
    say(f"{len(held)} of {len(day_classes)} labelled vehicle-days held out", t0)
    cand = train_candidate(a, inp, days, held, t0)
    say("candidate trained and quantized; evaluating it and the base on the held-out vehicle-days", t0)
    held_days = [HeldOutDay(d.vehicle, d.day, d.end, d.x, d.labels, episodes(tl, d.vehicle, d.end, d.labels))
                 for d in days if (d.vehicle, d.day) in held]
    runs = {CANDIDATE: run_model(Scorer.load_bytes(cand.model), held_days),
            BASE: run_model(Scorer.load_bytes(base.model), held_days)}
    evaluation = compare(held_days, runs, bc.classes, bc.healthy_class, bc.hop_s)
    real: dict[str, Any] | None = None
    if a.real_traces is not None:
        from models.realtraces import evaluate_real_models

        say(f"replaying the real healthy traces in {a.real_traces} through both", t0)
        real = evaluate_real_models(a.real_traces, {CANDIDATE: cand.model, BASE: base.model})
        if "skipped" in real[CANDIDATE]:
            say(f"real traces skipped: {real[CANDIDATE]['skipped']}", t0)
    reasons = decide(evaluation, real[CANDIDATE] if real is not None else None)
    key = inp.key
    stem = f"{inp.name}-{inp.version}"
    package = out / f"{stem}.pkg"
    signed = not reasons and key is not None
    card: dict[str, Any] = {
        "model": {"name": inp.name, "version": inp.version, "classes": list(bc.classes)},
        "base": {"name": bc.model_name, "version": bc.model_version, **base.source},
        "build": {"from_export": str(export.root), "seed": a.seed, "quick": a.quick,
                  "simulator_runs": cand.simulator_runs, "simulator_windows": cand.simulator_windows,
                  "fleet_windows": cand.fleet_windows, "seconds": round(time.monotonic() - t0, 1)},
        "data": data_summary(days, held, tl, export, bc.classes),
        "held_out": {"rule": f"whole vehicle-days by a hash of (vehicle, day), share {HELD_OUT_SHARE}, at least one "
                             "per labelled class found on two or more vehicle-days",
                     "vehicle_days": [f"{v} {d}" for v, d in sorted(held)]},
        "evaluation": evaluation,
        "real_traces": real if real is not None else {CANDIDATE: {"skipped": "not asked (--no-real-traces)"}},
        "decision": {"at_least_as_good": not reasons, "reasons": reasons, "signed": signed,
                     "package": package.name if signed else None,
                     "key_id": modelpkg.key_id(key.public_key()) if signed and key is not None else None},
        "features": [{"name": f.name, "signal": f.signal, "stat": f.stat, "window_s": f.window_s}
                     for f in bc.features],
        "required_features": list(bc.required_features),
        "alert_policy": asdict(bc.alert),
        "familiarity": {"margin": cand.contract.familiarity.margin if cand.contract.familiarity else None,
                        "held_out_fold_unfamiliar_share": round(cand.fold_unfamiliar, 5)},
        "int8_size_bytes": len(cand.model),
    }
    card_bytes = (json.dumps(card, indent=2, allow_nan=False) + "\n").encode()
    pkg = b""
    if signed and key is not None:
        from harvester_common.onnxmeta import read_contract

        # Made before anything is written: a card never says "signed" beside a package that could not be made.
        try:
            pkg = modelpkg.build_package(cand.model, card_bytes, key, name=inp.name, version=inp.version,
                                         contract=read_contract(cand.model), min_agent_version=MIN_AGENT_VERSION)
        except modelpkg.PackageError as e:
            raise UserError(f"the candidate cannot be packaged: {e}") from None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot make the folder: {e.strerror or e}") from None
    # The package first: a card that says "signed" never stands beside no package (a failed write ends the
    # build before the card is written). An unsigned build removes a package left under its name by an earlier
    # one, so that the package beside this card is never another model's.
    if pkg:
        write_atomically(package, pkg)
    elif package.exists():
        package.unlink()
        say(f"removed {package}, left from an earlier build: this build {'is refused' if reasons else 'is not signed'}",
            t0)
    write_atomically(out / f"{stem}.onnx", cand.fp32)
    write_atomically(out / f"{stem}.int8.onnx", cand.model)
    write_atomically(out / f"{stem}.card.json", card_bytes)
    write_atomically(out / f"{stem}.card.md", render_card(card).encode())
    cm, bm = evaluation["models"][CANDIDATE], evaluation["models"][BASE]
    say(f"held out: {evaluation['windows']} windows, {evaluation['healthy_hours']} healthy hours; ROC-AUC candidate "
        f"{cm['roc_auc']} base {bm['roc_auc']}; false alarms candidate {cm['false_alarms']} base "
        f"{bm['false_alarms']}", t0)
    if reasons:
        for r in reasons:
            print(f"REFUSED: {r}", file=sys.stderr)
        say(f"refused: {len(reasons)} reason(s), in {out / f'{stem}.card.md'}", t0)
        return 1
    if key is None:
        say(f"at least as good as the base: {out / f'{stem}.int8.onnx'} (not signed: no --key)", t0)
        return 0
    say(f"at least as good as the base: signed {package} ({inp.name} {inp.version}, key "
        f"{modelpkg.key_id(key.public_key())}, package sha256 {modelpkg.package_sha256(pkg)})", t0)
    return 0
