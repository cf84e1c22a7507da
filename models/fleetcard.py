"""The card of a candidate built from an export (`NAME-VERSION.card.md`), from its `card.json`: the decision, the
candidate beside its base on the held-out data per fault and on the real healthy traces, and the data used."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MAX_ROWS = 60  # vehicle rows and held-out days listed in the Markdown (card.json has them all)


def _num(v: Any, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def _pairs(d: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"


def _evaluation(e: dict[str, Any]) -> list[str]:
    c, b = e["models"]["candidate"], e["models"]["base"]
    lines = [
        f"{len(e['vehicle_days'])} held-out vehicle-days, {e['windows']} windows "
        f"({_pairs(e['windows_per_label'])}); {e['healthy_hours']} hours of healthy windows; "
        f"{e['windows_compared']} windows scored by both (ROC-AUC is over these).",
        "",
        "| fault | windows | episodes | ROC-AUC candidate / base | detected candidate / base | alerts candidate / base"
        " | false alarms per hour candidate / base |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f, row in e["faults"].items():
        rc, rb = row["candidate"], row["base"]
        det = (f"{rc['detected']} / {rb['detected']} of {row['episodes']}" if row["episodes"] else "-")
        lines.append(f"| {f} | {row['windows']} | {row['episodes']} | {_num(rc['roc_auc'])} / {_num(rb['roc_auc'])} "
                     f"| {det} | {rc['alerts']} / {rb['alerts']} | {_num(rc['false_alarms_per_hour'], '.3f')} / "
                     f"{_num(rb['false_alarms_per_hour'], '.3f')} |")
    lines.append(f"| **all** | {e['windows']} | {sum(r['episodes'] for r in e['faults'].values())} | "
                 f"{_num(c['roc_auc'])} / {_num(b['roc_auc'])} | - | {c['alerts']} / {b['alerts']} | "
                 f"{_num(c['false_alarms_per_hour'], '.3f')} / {_num(b['false_alarms_per_hour'], '.3f')} |")
    lines += ["", f"Windows not scored, candidate / base: unfamiliar {c['windows_unfamiliar']} / "
                  f"{b['windows_unfamiliar']}, missing a required feature {c['windows_missing_features']} / "
                  f"{b['windows_missing_features']}."]
    return lines


def _real(real: dict[str, Any]) -> list[str]:
    c = real.get("candidate", {})
    if "skipped" in c:
        return [f"Skipped: {c['skipped']}."]
    lines = ["| model | traces | hours | windows | with core | scored | unfamiliar | alerts |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("candidate", "base"):
        t = real[name]["total"]
        lines.append(f"| {name} | {len(real[name]['traces'])} | {t['hours']:.3f} | {t['windows']} | "
                     f"{t['windows_with_required']} | {t['windows_scored']} | {t['windows_unfamiliar']} | "
                     f"{t['alerts']} |")
    alarms = {k: v["alerts"] for k, v in c["traces"].items() if v["alerts"]}
    if alarms:
        lines += ["", "The candidate's alerts: " + ", ".join(f"{k} ({n})" for k, n in sorted(alarms.items())) + "."]
    if c.get("left_out"):
        lines += ["", "Left out: " + "; ".join(c["left_out"]) + "."]
    return lines


def render_card(card: dict[str, Any]) -> str:
    m, b, d, dec = card["model"], card["base"], card["data"], card["decision"]
    if b["kind"] == "package":
        base = (f"the package {b['path']} (sha256 {b['package_sha256'][:16]}..., key {b['key_id']}; "
                + ("signature verified" if b["verified"] else "**signature not verified**: no --trusted-key; its "
                   "structure and hashes were checked") + ")")
    else:
        base = f"the shipped model {b['path']}"
    lines = [
        f"# Candidate card: {m['name']} {m['version']}",
        "",
        f"Built by `python -m models.build --from-export {card['build']['from_export']}` from the fleet's data and "
        f"the simulator; base: {b['name']} {b['version']}, {base}. Classes: {', '.join(m['classes'])}.",
        "",
        "## Decision",
        "",
    ]
    if dec["at_least_as_good"]:
        lines.append("**At least as good as the base** on the held-out data and the real healthy traces. "
                     + (f"Signed into `{dec['package']}` (key {dec['key_id']})." if dec["signed"] else
                        "Not signed (no --key)."))
    else:
        lines += ["**Refused**: not at least as good as the base.", ""] + [f"- {r}" for r in dec["reasons"]]
    lines += [
        "",
        "The rule (docs/learning_loop.md): for every fault with held-out episodes, detection not lower, false alarms "
        "per hour not higher, ROC-AUC not lower by more than 0.01; false alarms over all labels not higher; no "
        "alert on the real healthy traces.",
        "",
        "## Held out: candidate beside base",
        "",
        *_evaluation(card["evaluation"]),
        "",
        "## Real healthy machines",
        "",
        *_real(card["real_traces"]),
        "",
        "## Data",
        "",
        f"- vehicles: {len(d['vehicles'])}; days: {len(d['days'])} ({', '.join(d['days'][:3])}"
        f"{', ...' if len(d['days']) > 3 else ''}); samples read {d['samples_read']}"
        + (f", {d['samples_out_of_range']} with a time out of range left out" if d["samples_out_of_range"] else ""),
        f"- alerts by verdict now: {_pairs(d['alerts'])}; verdicts {d['verdicts']} "
        f"({d['verdicts_without_alert']} on alerts outside the export); breakdowns {d['breakdowns']}"
        + (f"; unusable (no id or time): {_pairs(d['records_unusable'])}" if d["records_unusable"] else ""),
        f"- labelled windows for training: {_pairs(d['windows_per_label']['train'])}; held out: "
        f"{_pairs(d['windows_per_label']['held_out'])}",
        f"- left out: {_pairs(d['left_out'])}",
        "- faults outside the model's classes (kept out of training): "
        + (", ".join(f"{f} (confirmed alerts {v['alerts']}, breakdowns {v['breakdowns']})"
                     for f, v in d["faults_outside_classes"].items()) or "none"),
        f"- simulator: {card['build']['simulator_runs']} labelled runs (the standard recipe"
        f"{', quick set' if card['build']['quick'] else ''}), {card['build']['simulator_windows']} windows; fleet: "
        f"{card['build']['fleet_windows']} windows",
        f"- labels: {d['labelling']['lead_s']:g} s before an alert opened belong to its verdict; "
        f"{d['labelling']['label_horizon_s']:g} s before a breakdown show its fault; healthy: false alarms' spans and "
        "vehicle-days clear of alerts and breakdowns (models/fleetlabels.py)",
        f"- held out: {card['held_out']['rule']}: " + (", ".join(card["held_out"]["vehicle_days"][:MAX_ROWS])
                                                       or "none")
        + (" ..." if len(card["held_out"]["vehicle_days"]) > MAX_ROWS else ""),
        "",
        "| vehicle | day | windows | labelled | left out | held out |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in d["vehicle_days"][:MAX_ROWS]:
        lines.append(f"| {r['vehicle']} | {r['day']} | {r['windows']} | {_pairs(r['labelled'])} | "
                     f"{_pairs(r['left_out'])} | {'yes' if r['held_out'] else ''} |")
    if len(d["vehicle_days"]) > MAX_ROWS:
        lines.append(f"| ... {len(d['vehicle_days']) - MAX_ROWS} more in card.json | | | | | |")
    lines += [
        "",
        "## Model",
        "",
        f"Features and alert policy are the base's ({len(card['features'])} features, required: "
        f"{', '.join(card['required_features'])}; alert after {card['alert_policy']['min_windows']} windows >= "
        f"{card['alert_policy']['threshold']}). Familiarity margin {card['familiarity']['margin']}. int8 model "
        f"{card['int8_size_bytes']} bytes. Build: seed {card['build']['seed']}, {card['build']['seconds']} s.",
    ]
    return "\n".join(lines) + "\n"
