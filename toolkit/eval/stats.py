"""Means with 95% confidence intervals from a bootstrap over episodes, and paired differences.

Samples from one episode are near copies of each other (neighbouring frames, the same layout), so
they are not independent draws: the unit of resampling is the episode. Each resample draws as
many episodes as there are, with replacement, and takes the mean over all their samples; the
interval is the 2.5th and 97.5th percentile of BOOTSTRAP_RESAMPLES such means. With fewer than two
episodes there is nothing to resample and the interval is None ("n/a"), never a fake zero width.

One seeded draw of episode indices serves every metric and method of a report, so intervals
of two methods on the same samples come from the same resamples.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 1000
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0


def episode_key(row: dict) -> str:
    """The resampling unit of a report row: task/episode, or the sample itself when unknown."""
    if row.get("episode") is None:
        return f"sample:{row['sample']}"
    return f"{row.get('task')}/{row['episode']}"


class Bootstrap:
    """Resample weights over a fixed list of episodes: (B, E) counts of each episode per resample."""

    def __init__(self, episodes: Sequence[str], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED):
        self.episodes = list(dict.fromkeys(episodes))
        self.index = {e: i for i, e in enumerate(self.episodes)}
        n = len(self.episodes)
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, n, size=(resamples, n)) if n else np.zeros((resamples, 0), int)
        self.weights = np.zeros((resamples, n))
        np.add.at(self.weights, (np.arange(resamples)[:, None], draws), 1.0)  # (B, E)

    def resampled(
        self, values: Sequence[float | None], keys: Sequence[str]
    ) -> tuple[float | None, np.ndarray, int, int]:
        """(mean, (B',) means of the resamples that hold a value, n values, episodes with values)."""
        sums = np.zeros(len(self.episodes))
        counts = np.zeros(len(self.episodes))
        for v, k in zip(values, keys):
            if v is not None:
                sums[self.index[k]] += float(v)
                counts[self.index[k]] += 1.0
        n = int(counts.sum())
        if not n:
            return None, np.zeros(0), 0, 0
        w_sums, w_counts = self.weights @ sums, self.weights @ counts  # (B,)
        ok = w_counts > 0  # a resample that drew only episodes without values has no mean
        return float(sums.sum() / n), w_sums[ok] / w_counts[ok], n, int((counts > 0).sum())

    def mean_ci(self, values: Sequence[float | None], keys: Sequence[str]) -> dict:
        """{"mean", "ci": [lo, hi] | None, "n", "episodes"} over the non-None values."""
        mean, means, n, used = self.resampled(values, keys)
        return {"mean": mean, "ci": interval(means) if used >= 2 else None, "n": n, "episodes": used}


def interval(means: np.ndarray) -> list[float]:
    tail = (1.0 - CONFIDENCE) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return [float(lo), float(hi)]


def summarize(
    rows: Sequence[dict], methods: Sequence[str], metric_names: Sequence[str], boot: Bootstrap,
    value: Callable[[dict, str, str], float | None] | None = None,
) -> dict:
    """{method: {metric: mean_ci}} over `rows` (each with "metrics": {method: {metric: value}})."""
    get = value or (lambda row, method, metric: row["metrics"].get(method, {}).get(metric))
    keys = [episode_key(r) for r in rows]
    return {
        method: {m: boot.mean_ci([get(r, method, m) for r in rows], keys) for m in metric_names}
        for method in methods
    }


def paired_difference(a: dict[str, tuple[float, str]], b: dict[str, tuple[float, str]], boot: Bootstrap) -> dict:
    """B - A over samples both have: {"mean", "ci", "n", "episodes", "excludes_zero"}.

    `a` and `b` map sample name -> (value, episode key). Pairing by sample removes the spread that
    comes from which frames were drawn, so a real difference shows with fewer episodes.
    """
    common = sorted(set(a) & set(b))
    diffs = [b[s][0] - a[s][0] for s in common]
    out = boot.mean_ci(diffs, [a[s][1] for s in common])
    out["excludes_zero"] = None if out["ci"] is None else bool(out["ci"][0] > 0 or out["ci"][1] < 0)
    return out
