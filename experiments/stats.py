"""Statistics over seeds and their display: mean ± std, number formats, thresholds."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["fmt_ms", "fmt_num", "mean_std", "reach"]


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


def fmt_ms(m: float | None, s: float | None, *, scale: float = 1.0, digits: int = 2) -> str:
    """``"12.34 ± 0.56"`` (no ± without a std; ``"–"`` without a mean)."""
    if m is None:
        return "–"
    out = f"{m * scale:.{digits}f}"
    if s is not None:
        out += f" ± {s * scale:.{digits}f}"
    return out


def fmt_num(x: float | None, digits: int = 6) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def reach(history: Sequence[dict], timing: Sequence[dict], threshold: float, key: str):
    """``(epoch, train_time_s)`` of the first epoch with ``key >= threshold``, or None."""
    times = {r["epoch"]: r.get("train_time_s") for r in timing}
    for row in history:
        v = row.get(key)
        if v is not None and v >= threshold:
            return row["epoch"], times.get(row["epoch"])
    return None
