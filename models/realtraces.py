"""Real healthy machines: every recorded CAN trace in ../shared/data/can replayed through a built model exactly as
`harvester-agent replay` does (the built-in DBC, the agent's own pipeline). None of these machines was faulty, so
every alert is a false alarm; the build refuses a model with one (models/build.py, COVERAGE_FLOORS)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SUFFIXES = {".log", ".asc", ".blf", ".trc", ".csv", ".mf4"}


def trace_files(root: Path) -> tuple[list[Path], list[str]]:
    """The traces under `root`, and what was left out and why."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    skipped = []
    try:
        import asammdf  # noqa: F401
    except ImportError:
        skipped = [f"{p.relative_to(root)}: MF4 needs asammdf" for p in files if p.suffix.lower() == ".mf4"]
        files = [p for p in files if p.suffix.lower() != ".mf4"]
    return files, skipped


def evaluate_real(root: Path, model: Path) -> dict[str, Any]:
    import logging

    from agent.replay import replay

    if not root.is_dir():
        return {"skipped": f"{root} is absent"}
    files, skipped = trace_files(root)
    traces: dict[str, dict[str, Any]] = {}
    # A tractor that sends no fan signals is drift by design: the warnings would bury the build's progress.
    logging.getLogger("agent.pipeline").setLevel(logging.ERROR)
    for p in files:
        o = replay([p], model=model)
        hop_s = 5.0
        traces[str(p.relative_to(root))] = {
            "hours": round(o["windows"] * hop_s / 3600, 4),
            "windows": o["windows"],
            "windows_with_required": o["windows_with_required"],
            "windows_scored": o["windows_scored"],
            "windows_unfamiliar": o["windows_unfamiliar"],
            "alerts": o["alerts"],
            "unfamiliar_features": o["unfamiliar_features"],
        }
    total = {k: sum(t[k] for t in traces.values())
             for k in ("windows", "windows_with_required", "windows_scored", "windows_unfamiliar", "alerts")}
    total["hours"] = round(sum(t["hours"] for t in traces.values()), 4)
    total["false_alarms_per_hour"] = round(total["alerts"] / total["hours"], 3) if total["hours"] else None
    return {"root": str(root), "traces": traces, "total": total, "left_out": skipped}


def render_real(real: dict[str, Any]) -> list[str]:
    lines = ["## Real healthy machines", ""]
    if "skipped" in real:
        return [*lines, f"Skipped: {real['skipped']}."]
    lines += [
        "Every recorded trace in ../shared/data/can (a John Deere 5055E tractor and trucks logged with CSS CANedge;",
        "none of them faulty) replayed through the int8 model as `harvester-agent replay` does, with the built-in",
        "DBC. Every alert here would be a false alarm: the build refuses a model with one. Hours are windows x the",
        "5 s hop; the MF4 files are the same recordings as their candump conversions. 'With core' counts windows",
        "that had the required features (engine speed, load, coolant temperature).",
        "",
        "| trace | hours | windows | with core | scored | unfamiliar | alerts | false alarms / h |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, t in real["traces"].items():
        fah = f"{t['alerts'] / t['hours']:.1f}" if t["hours"] else "-"
        lines.append(f"| {name} | {t['hours']:.4f} | {t['windows']} | {t['windows_with_required']} | "
                     f"{t['windows_scored']} | {t['windows_unfamiliar']} | {t['alerts']} | {fah} |")
    tot = real["total"]
    fah = "-" if tot["false_alarms_per_hour"] is None else f"{tot['false_alarms_per_hour']:.1f}"
    lines.append(f"| **all {len(real['traces'])} traces** | {tot['hours']:.3f} | {tot['windows']} | "
                 f"{tot['windows_with_required']} | {tot['windows_scored']} | {tot['windows_unfamiliar']} | "
                 f"{tot['alerts']} | {fah} |")
    if real["left_out"]:
        lines += ["", "Left out: " + "; ".join(real["left_out"]) + "."]
    return lines
