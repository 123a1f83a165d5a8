"""Evaluation outputs: the summaries derived from the per-sample rows, report.json and report.md.

Per-sample rows are the source of truth; every mean and interval is derived from them here
(stats.Bootstrap over episodes), so the overall, per-task, per-horizon, per-object and rollout
tables can never disagree with the rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from lftk.eval.metrics import PSNR_CAP_DB
from lftk.eval.rollout import ROLLOUT_METHODS, RolloutResult
from lftk.eval.scoring import COLUMN, COLUMNS, GROUP_TITLES
from lftk.eval.stats import BOOTSTRAP_RESAMPLES, CONFIDENCE, Bootstrap, episode_key, summarize

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
KEY_COLUMNS = ("ssim", "psnr", "motion_psnr", "obj_err_px", "ee_err_px")  # the breakdown tables' columns
METRIC_NAMES = [c.name for c in COLUMNS]


def _groups(rows: Sequence[dict], key) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(str(key(r)), []).append(r)
    # Numbers in numeric order (horizon 25 before 100, rollout step 2 before 10), then names.
    return dict(sorted(out.items(), key=lambda kv: (0, int(kv[0]), "") if kv[0].isdigit() else (1, 0, kv[0])))


def _per_object(rows: Sequence[dict], methods: Sequence[str], boot: Bootstrap) -> dict:
    """{task/name: {"kind", "moved_px", "n", "summary": {method: {"err_px": mean_ci}}}}."""
    names = sorted({(r["task"], n, d["kind"]) for r in rows for n, d in r["positions"].items() if d.get("err_px")})
    out = {}
    for task, name, kind in names:
        sel = [r for r in rows if r["task"] == task and r["positions"].get(name, {}).get("err_px")]
        moved = [r["positions"][name]["moved_px"] for r in sel if r["positions"][name].get("moved_px") is not None]
        out[f"{task}/{name}"] = {
            "kind": kind,
            "moved_px": float(np.mean(moved)) if moved else None,
            "n": len(sel),
            "summary": summarize(sel, methods, ["err_px"], boot,
                                 value=lambda r, m, _k, n=name: r["positions"][n]["err_px"].get(m)),
        }
    return out


def build_sections(rows: Sequence[dict], methods: Sequence[str], rollout: RolloutResult | None) -> dict:
    """Every derived part of the report: overall summary, breakdowns, rollout per step."""
    keys = [episode_key(r) for r in rows] + [episode_key(r) for r in (rollout.rows if rollout else [])]
    boot = Bootstrap(keys)

    def section(sel: Sequence[dict], meths: Sequence[str] = methods) -> dict:
        return {"n": len(sel), "episodes": len({episode_key(r) for r in sel}),
                "summary": summarize(sel, meths, METRIC_NAMES, boot)}

    out = {
        "n_episodes": len({episode_key(r) for r in rows}),
        "bootstrap": {"unit": "episode", "resamples": BOOTSTRAP_RESAMPLES, "confidence": CONFIDENCE},
        "summary": summarize(rows, methods, METRIC_NAMES, boot),
        "per_task": {t: section(sel) for t, sel in _groups(rows, lambda r: r["task"]).items()},
        "per_horizon": {h: section(sel) for h, sel in _groups(rows, lambda r: r.get("horizon")).items()},
        "per_object": _per_object(rows, methods, boot),
        "rollout": None,
    }
    if rollout is not None:
        steps = _groups(rollout.rows, lambda r: r["step"])
        out["rollout"] = {
            "methods": list(ROLLOUT_METHODS),
            "n_samples": len({r["sample"] for r in rollout.rows}),
            "eligible": rollout.eligible,
            "per_step": {
                k: {"horizon": sel[0]["horizon"], **section(sel, ROLLOUT_METHODS)} for k, sel in steps.items()
            },
            "rows": rollout.rows,
        }
    return out


# ------------------------------------------------------------------------------------ markdown


def cell(stat: dict, column: str) -> str:
    c = COLUMN[column]
    if stat["mean"] is None:
        return "n/a"
    if stat["ci"]:
        return f"{c.show(stat['mean'])} [{c.show(stat['ci'][0])}, {c.show(stat['ci'][1])}]"
    return f"{c.show(stat['mean'])} (1 episode: no interval)" if stat["episodes"] == 1 else c.show(stat["mean"])


def _head(column: str) -> str:
    c = COLUMN[column]
    return f"{c.label} {'↑' if c.higher_is_better else '↓'}"


def _present(summary: dict, columns: Sequence[str]) -> list[str]:
    """Columns with a value for some method: a metric n/a everywhere is listed, not tabled."""
    return [c for c in columns if any(s[c]["n"] for s in summary.values())]


def _table(summary: dict, methods: Sequence[str], columns: Sequence[str], ci: bool = True) -> list[str]:
    lines = ["| method | " + " | ".join(_head(c) for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for m in methods:
        cells = [cell(summary[m][c], c) if ci else COLUMN[c].show(summary[m][c]["mean"]) for c in columns]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _breakdown(title: str, label: str, sections: dict, methods: Sequence[str], columns: Sequence[str]) -> list[str]:
    if not sections or not columns:
        return []
    out = [f"## {title}", "", f"| {label} | n | method | " + " | ".join(_head(c) for c in columns) + " |",
           "|---" * (len(columns) + 3) + "|"]
    for key, sec in sections.items():
        for m in methods:
            cells = " | ".join(COLUMN[c].show(sec["summary"][m][c]["mean"]) for c in columns)
            out.append(f"| {key} | {sec['n']} | {m} | {cells} |")
    return out + [""]


def _objects(report: dict) -> list[str]:
    objs, methods = report["per_object"], report["methods"]
    if not objs:
        return []
    out = ["## Per object and hand: position error (px)", "",
           "| task/object | n | moved (px) | " + " | ".join(methods) + " |", "|---" * (len(methods) + 3) + "|"]
    for name, o in objs.items():
        cells = " | ".join(cell(o["summary"][m]["err_px"], "obj_err_px") for m in methods)
        out.append(f"| {name} | {o['n']} | {COLUMN['obj_err_px'].show(o['moved_px'])} | {cells} |")
    return out + ["", "`moved`: how far it truly moved between the current and the future frame (projected states)."]


def _rollout(report: dict) -> list[str]:
    ro = report["rollout"]
    if not ro:
        return []
    steps = ro["per_step"]
    columns = _present(next(iter(steps.values()))["summary"], KEY_COLUMNS)
    out = ["## Rollout: the model fed its own outputs", "",
           f"{ro['n_samples']} samples (of {ro['eligible']} whose episode runs long enough); step k predicts "
           "t+k·Δ from the model's own t+(k-1)·Δ; copy holds frame t.", "",
           "| step | horizon | n | method | " + " | ".join(_head(c) for c in columns) + " |",
           "|---" * (len(columns) + 4) + "|"]
    for k, sec in steps.items():
        for m in ro["methods"]:
            cells = " | ".join(cell(sec["summary"][m][c], c) for c in columns)
            out.append(f"| {k} | {sec['horizon']} | {sec['n']} | {m} | {cells} |")
    return out + [""]


def _keep_text(keep: float | None, objects: bool | None = None) -> str:
    return (f", keep {keep:g}" if keep else "") + (", keep objects" if objects else "")


def render_markdown(report: dict) -> str:
    methods, s = report["methods"], report["settings"]
    out = [
        f"# lftk eval: `{report['model']}`",
        "",
        f"{report['n_samples']} samples from {report['n_episodes']} episodes of split `{report['split']}` in "
        f"`{report['data']}`, at {s['resolution']} px, on {s.get('backend', 'diffusers pipeline')} "
        f"({s.get('precision', 'fp32')}); {s['steps']} steps, guidance {s['guidance']}, "
        f"image guidance {s['image_guidance']}{_keep_text(s.get('keep'), s.get('keep_objects'))} ({s.get('sampling_from', 'given')}), seed {s['seed']}.",
        f"Mean [95% interval]: bootstrap over episodes ({report['bootstrap']['resamples']} resamples); "
        "n/a where a metric does not apply; with few episodes the intervals are coarse.",
        "",
    ]
    for group, title in GROUP_TITLES.items():
        columns = _present(report["summary"], [c.name for c in COLUMNS if c.group == group])
        if columns:
            out += [f"## {title}", "", *_table(report["summary"], methods, columns), ""]
            if group == "trajectory":
                out += ["Object error averages the objects a method shows; `objects missing` is the share of "
                        "the objects the truth shows that it does not show at all.", ""]
    if report["unavailable"]:
        out += ["Unavailable here:", *(f"- {k}: {v}" for k, v in report["unavailable"].items()), ""]
    key = _present(report["summary"], KEY_COLUMNS)
    out += _breakdown("Per task (means)", "task", report["per_task"], methods, key)
    out += _breakdown("Per horizon (means)", "horizon", report["per_horizon"], methods, key)
    out += _rollout(report)
    out += _objects(report)
    capped = {m: n for m in methods if (n := sum(bool(r["metrics"][m]["psnr_capped"]) for r in report["rows"]))}
    counts = " (capped samples: " + ", ".join(f"{m} {n}" for m, n in capped.items()) + ")" if capped else ""
    out += ["", "## Notes", "",
            f"- PSNR of an exact prediction is infinite; it is counted as {PSNR_CAP_DB:g} dB{counts}.",
            f"- Motion mask: pixels where current and true future differ by more than {s['motion_threshold']} levels "
            f"(max over RGB), dilated by {s['motion_dilation_px']} px; the same pixels for every method.",
            "- Positions: objects by their colour (episode.json), hands by matching the true frame's patch; "
            "pixels at the evaluated resolution. Real data without simulator states: n/a."]
    if s.get("keep"):
        out.append(f"- Keep {s['keep']:g}: the model's frames take the current frame's own pixels wherever they differ from "
                   f"the current frame as the VAE redraws it by less than {s['keep']:g} levels (mean over RGB, 3x3 box).")
    if s.get("keep_objects"):
        out.append("- Keep objects: an object of the current frame (connected pixels of saturated colour) that the "
                   "model's frame no longer shows anywhere is put back where it was; it cannot draw an object at its "
                   "new place (lftk.runtime.objects).")
    if report.get("figures"):
        out.append("- Figures: " + ", ".join(f"`{f}`" for f in report["figures"]) + ".")
    return "\n".join(out) + "\n"


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: a NaN or inf that slipped through is a bug to see now, not invalid JSON later.
    from lftk import atomic

    atomic.write_bytes(out / REPORT_JSON, json.dumps(report, indent=1, allow_nan=False).encode())  # never half a report
    atomic.write_bytes(out / REPORT_MD, render_markdown(report).encode())


def read_report(path: Path | str) -> dict:
    """report.json from a report dir, a run dir (its eval/) or the file itself."""
    from lftk.errors import LftkError

    p = Path(path)
    for cand in (p, p / REPORT_JSON, p / "eval" / REPORT_JSON):
        if cand.is_file():
            from lftk.jsonfile import read_object

            return read_object(cand)
    raise LftkError(f"{path}: no {REPORT_JSON} (expected a report dir, a run dir with eval/, or the file)")


def summary_text(report: dict, columns: Sequence[str] = KEY_COLUMNS) -> str:
    """The headline as plain text for a terminal: one line per method, mean [95% interval]."""
    cols = _present(report["summary"], columns)
    table = [("method", *(_head(c) for c in cols))]
    table += [(m, *(cell(report["summary"][m][c], c) for c in cols)) for m in report["methods"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines += [f"unavailable: {k}: {v}" for k, v in report["unavailable"].items()]
    return "\n".join(lines)
