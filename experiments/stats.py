"""Statistics over seeds and their display: mean ± std, paired differences, formats.

Every displayed number is rounded once, from the full-precision value, to the precision
of its column: a mean and its std (or interval) always share the same number of decimals.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

__all__ = [
    "PairedDifference",
    "fmt_ci",
    "fmt_ms",
    "fmt_num",
    "fmt_p",
    "mean_std",
    "paired_difference",
    "reach",
    "t_interval",
]


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """``(mean, sample std or None when n < 2, n)`` of the non-None values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return None, None, 0
    m = sum(xs) / n
    if n < 2:
        return m, None, n
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var), n


def fmt_ms(
    m: float | None,
    s: float | None,
    *,
    scale: float = 1.0,
    digits: int = 2,
    signed: bool = False,
) -> str:
    """``"12.34 ± 0.56"`` (no ± without a std; ``"–"`` without a mean)."""
    if m is None:
        return "–"
    out = f"{m * scale:{'+' if signed else ''}.{digits}f}"
    if s is not None:
        out += f" ± {s * scale:.{digits}f}"
    return out


def fmt_num(x: float | None, digits: int = 6) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def reach(history: Sequence[dict], timing: Sequence[dict], threshold: float, key: str):
    """``(epoch, train_time_s, step)`` of the first epoch with ``key >= threshold``, or None."""
    times = {r["epoch"]: r.get("train_time_s") for r in timing}
    for row in history:
        v = row.get(key)
        if v is not None and v >= threshold:
            return row["epoch"], times.get(row["epoch"]), row.get("step")
    return None


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """Mean of seed-paired differences with its 95 % t confidence interval.

    Attributes:
      n: number of pairs.
      mean: mean difference (None without pairs).
      std: sample std of the differences (None when n < 2).
      ci_low, ci_high: the two-sided ``level`` confidence interval of the mean,
        ``mean ± t_{n-1, (1+level)/2} * std / sqrt(n)`` (None when n < 2).
      p_value: two-sided paired t-test of ``mean = 0`` (None when n < 2 or std = 0).
      wins: pairs with a positive difference.
    """

    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    wins: int


def t_interval(
    mean: float, std: float | None, n: int, *, wins: int = 0, level: float = 0.95
) -> PairedDifference:
    """The t interval and paired t-test of a mean difference from its mean, std and n."""
    from scipy import stats as scipy_stats

    if std is None or n < 2:
        return PairedDifference(n, mean, std, None, None, None, wins)
    se = std / math.sqrt(n)
    half = float(scipy_stats.t.ppf((1 + level) / 2, n - 1)) * se
    p = float(2 * scipy_stats.t.sf(abs(mean) / se, n - 1)) if std > 0 else None
    return PairedDifference(n, mean, std, mean - half, mean + half, p, wins)


def paired_difference(diffs: Sequence[float | None], level: float = 0.95) -> PairedDifference:
    """Summary of seed-paired differences (``a - b`` for each seed): mean, std, t CI, p."""
    xs = [float(d) for d in diffs if d is not None and math.isfinite(float(d))]
    m, s, n = mean_std(xs)
    return t_interval(m, s, n, wins=sum(d > 0 for d in xs), level=level)


def fmt_ci(d: PairedDifference, *, scale: float = 1.0, digits: int = 2) -> str:
    """``"[+0.12, +1.34]"`` (signed, same rounding as the mean); ``"–"`` without an interval."""
    if d.ci_low is None:
        return "–"
    return f"[{d.ci_low * scale:+.{digits}f}, {d.ci_high * scale:+.{digits}f}]"


def fmt_p(p: float | None) -> str:
    """A p-value for reading: ``"0.003"``, ``"<0.001"``, ``"–"``."""
    if p is None:
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"
