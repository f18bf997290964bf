"""The statistics behind every number distill prints: means with 95% percentile-bootstrap
intervals, paired intervals of differences, gap closed, and the words that may describe them.

Paired means: the same resampled items for every model compared, so question difficulty cancels.
Words follow the evidence: a change is "rose" / "fell" only when the 95% interval of the
difference excludes zero; otherwise it is "no measurable change", whatever the point estimate.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def bootstrap_interval(values: Sequence[float], resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def paired_bootstrap(
    columns: Sequence[Sequence[float]],
    statistic: Callable[..., float | None],
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[tuple[float, float] | None, int]:
    """95% interval of ``statistic(mean_0, mean_1, ...)`` over paired resamples of the items
    (every column resampled with the same indices), and how many resamples had no value
    (``statistic`` returned None). No interval when most resamples had none: it would mislead."""
    n = len(columns[0])
    if n == 0 or any(len(column) != n for column in columns):
        raise ValueError("paired columns must be non-empty and of equal length")
    rng = random.Random(seed)
    values, undefined = [], 0
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        value = statistic(*(sum(column[i] for i in picks) / n for column in columns))
        if value is None:
            undefined += 1
        else:
            values.append(value)
    if len(values) < resamples / 2:
        return None, undefined
    values.sort()
    return (values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]), undefined


def difference_interval(
    before: Sequence[float], after: Sequence[float], resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% paired bootstrap interval of mean(after) − mean(before)."""
    interval, _ = paired_bootstrap([before, after], lambda b, a: a - b, resamples, seed)
    assert interval is not None  # a difference is always defined
    return interval


def gap_closed(base: float, tuned: float, teacher: float) -> float | None:
    """(tuned − base) / (teacher − base); None when the teacher is not better than the base (there
    is no gap to close)."""
    gap = teacher - base
    if gap <= 0:
        return None
    return (tuned - base) / gap


def gap_closed_interval(
    base: Sequence[float], tuned: Sequence[float], teacher: Sequence[float], resamples: int = 1000, seed: int = 0
) -> tuple[float | None, float | None, int]:
    """Paired bootstrap over questions (same resampled questions for all three models): 95%
    interval of gap closed, and how many resamples had no gap (teacher ≤ base) and were skipped."""
    interval, undefined = paired_bootstrap([base, tuned, teacher], gap_closed, resamples, seed)
    return (interval[0], interval[1], undefined) if interval else (None, None, undefined)


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def points(value: float) -> str:
    """A difference of two shares in percentage points, signed."""
    return f"{100 * value:+.1f} pp"


def excludes_zero(interval: Sequence[float] | None) -> bool:
    return interval is not None and (interval[0] > 0 or interval[1] < 0)


def describe_change(before: float | None, after: float | None, interval: Sequence[float] | None, what: str = "") -> str:
    """ "rose from 20.0% to 35.0% (+15.0 pp, 95% CI +3.3 pp to +26.7 pp)" only when the interval
    of the difference excludes zero; otherwise "showed no measurable change (20.0% → 25.0%; ...)"."""
    if before is None or after is None:
        return f"{what}could not be compared ({pct(before)} → {pct(after)})"
    ci = f", 95% CI {points(interval[0])} to {points(interval[1])}" if interval else ""
    if excludes_zero(interval):
        direction = "rose" if after > before else "fell"
        return f"{what}{direction} from {pct(before)} to {pct(after)} ({points(after - before)}{ci})"
    return f"{what}showed no measurable change ({pct(before)} → {pct(after)}; {points(after - before)}{ci})"
