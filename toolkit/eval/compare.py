"""`lftk eval --compare A B`: two reports' model figures side by side, B - A with a 95% interval.

When the two reports scored mostly the same samples (the usual case: two runs evaluated on one
pair dir; at least PAIRED_SHARE of the smaller report's samples in common), the difference is
paired: per common sample B - A, bootstrapped over episodes, which cancels the spread that comes
from which frames were drawn. Otherwise each report is resampled on its own, all samples kept,
and the interval is that of the difference of the two means. "excludes 0" is the honest short
answer to "is B really different from A".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lftk.errors import LftkError
from lftk.eval.methods import MODEL_METHOD
from lftk.eval.report import read_report
from lftk.eval.scoring import COLUMN, COLUMNS
from lftk.eval.stats import BOOTSTRAP_SEED, Bootstrap, episode_key, interval, paired_difference

PAIRED_SHARE = 0.5


def _values(report: dict, method: str, metric: str) -> dict[str, tuple[float, str]]:
    return {
        r["sample"]: (v, episode_key(r))
        for r in report["rows"]
        if (v := r["metrics"].get(method, {}).get(metric)) is not None
    }


def _unpaired(a: dict, b: dict) -> dict:
    boot_a = Bootstrap([k for _, k in a.values()], seed=BOOTSTRAP_SEED)
    boot_b = Bootstrap([k for _, k in b.values()], seed=BOOTSTRAP_SEED + 1)  # independent draws
    mean_a, res_a, _, ep_a = boot_a.resampled([v for v, _ in a.values()], [k for _, k in a.values()])
    mean_b, res_b, _, ep_b = boot_b.resampled([v for v, _ in b.values()], [k for _, k in b.values()])
    n = min(len(res_a), len(res_b))
    ci = interval(res_b[:n] - res_a[:n]) if ep_a >= 2 and ep_b >= 2 and n else None
    return {
        "mean": mean_b - mean_a, "ci": ci, "n": min(len(a), len(b)), "episodes": min(ep_a, ep_b),
        "excludes_zero": None if ci is None else bool(ci[0] > 0 or ci[1] < 0),
    }


def compare_reports(path_a: Path | str, path_b: Path | str, method: str = MODEL_METHOD) -> dict:
    """{"a", "b", "method", "paired", "rows": [{metric, a, b, diff: {mean, ci, n, excludes_zero}}]}."""
    a, b = read_report(path_a), read_report(path_b)
    for name, rep in (("A", a), ("B", b)):
        if method not in rep.get("methods", []):
            raise LftkError(f"report {name} has no method '{method}' (has: {', '.join(rep.get('methods', []))})")
        if "rows" not in rep or "summary" not in rep:
            raise LftkError(f"report {name} was written by an older lftk eval: re-run lftk eval to compare")
    samples_a, samples_b = {r["sample"] for r in a["rows"]}, {r["sample"] for r in b["rows"]}
    common = samples_a & samples_b
    paired = bool(common) and len(common) >= PAIRED_SHARE * min(len(samples_a), len(samples_b))
    rows = []
    for col in COLUMNS:
        va, vb = _values(a, method, col.name), _values(b, method, col.name)
        if not va or not vb:
            continue
        if paired:
            keys = [k for _, k in va.values()]
            diff = paired_difference(va, vb, Bootstrap(keys))
            if not diff["n"]:
                continue
            sa = float(np.mean([va[s][0] for s in va if s in vb]))
            sb = float(np.mean([vb[s][0] for s in vb if s in va]))
        else:
            diff = _unpaired(va, vb)
            sa, sb = float(np.mean([v for v, _ in va.values()])), float(np.mean([v for v, _ in vb.values()]))
        rows.append({"metric": col.name, "a": sa, "b": sb, "diff": diff})
    return {
        "a": _describe(a), "b": _describe(b), "method": method, "paired": paired,
        "n_common": len(common), "rows": rows,
    }


def _describe(report: dict) -> str:
    """The model and what scored it: two precisions of one export read apart in the table."""
    s = report.get("settings", {})
    how = [f"on {s['backend']} ({s.get('precision', 'fp32')})"] if s.get("backend") else []
    if s.get("steps") is not None:
        how.append(f"{s['steps']} steps")
    return f"{report['model']}" + (f", {', '.join(how)}" if how else "")


def format_comparison(cmp: dict) -> str:
    """One plain-text table: metric | A | B | B - A | 95% CI | excludes 0 | better."""
    how = (f"paired over {cmp['n_common']} samples both scored" if cmp["paired"]
           else f"unpaired: the reports share {cmp['n_common']} samples, too few to pair on")
    lines = [f"A: {cmp['a']}", f"B: {cmp['b']}",
             f"method: {cmp['method']}; B - A {how}; 95% bootstrap over episodes", ""]
    table = [("metric", "A", "B", "B - A", "95% CI", "excludes 0", "better")]
    for r in cmp["rows"]:
        col, d = COLUMN[r["metric"]], r["diff"]
        ci = "n/a" if d["ci"] is None else f"[{col.show(d['ci'][0])}, {col.show(d['ci'][1])}]"
        excl = "n/a" if d["excludes_zero"] is None else ("yes" if d["excludes_zero"] else "no")
        better = "-"
        if d["excludes_zero"]:
            better = "B" if (d["mean"] > 0) == col.higher_is_better else "A"
        table.append((col.label, col.show(r["a"]), col.show(r["b"]), f"{d['mean']:+{col.fmt}}", ci, excl, better))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for k, row in enumerate(table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
