"""Summaries of latency samples: percentiles, never only averages."""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Sequence

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def floats(chunks: Iterable[bytes]) -> list[float]:
    """Concatenate ``array('f')`` byte chunks from the workers into one sorted list."""
    out: array[float] = array("f")
    for chunk in chunks:
        out.frombytes(chunk)
    return sorted(out)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of already sorted values; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def summary(sorted_values: Sequence[float]) -> dict[str, float | int | None]:
    """count, p50, p90, p99, p99.9, max and mean of sorted values (milliseconds)."""
    if not sorted_values:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "p99.9": None, "max": None,
                "mean": None}
    out: dict[str, float | int | None] = {"count": len(sorted_values)}
    for q in PERCENTILES:
        out[f"p{q:g}"] = round(percentile(sorted_values, q), 3)
    out["max"] = round(float(sorted_values[-1]), 3)
    out["mean"] = round(sum(sorted_values) / len(sorted_values), 3)
    return out


def per_bin(bins: Sequence[int], values: Sequence[float], nbins: int,
            q: float) -> list[float | None]:
    """The ``q``-th percentile of ``values`` grouped by bin index (None for an empty bin)."""
    groups: list[list[float]] = [[] for _ in range(nbins)]
    for b, v in zip(bins, values, strict=True):
        if 0 <= b < nbins:
            groups[b].append(v)
    out: list[float | None] = []
    for g in groups:
        g.sort()
        out.append(round(percentile(g, q), 3) if g else None)
    return out


def histogram_quantile(buckets: dict[float, float], q: float) -> float | None:
    """The ``q``-th percentile of a Prometheus histogram's cumulative buckets (``le`` -> count).

    Linear within the bucket it falls in, as PromQL's ``histogram_quantile`` does; the upper
    bound of the last finite bucket when it falls in ``+Inf``. None without observations.
    """
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q / 100.0 * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            width = count - below
            return lower + (bound - lower) * ((rank - below) / width if width else 1.0)
        lower, below = bound, count
    return lower
