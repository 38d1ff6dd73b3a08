"""Paired differences with 95% confidence intervals (Student's t over paired runs) and mean curves with bands."""

import math
import statistics

# Two-sided 95% quantiles of Student's t, by degrees of freedom.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 24: 2.064, 29: 2.045}  # fmt: skip


def t_975(df: int) -> float:
    """The 0.975 quantile of t with ``df`` degrees of freedom (the next smaller tabled df: conservative)."""
    if df >= 30:
        return 1.96 + 2.5 / df  # within 0.002 of the exact quantile from df 30 on
    return T_975[max(d for d in T_975 if d <= df)]


def interval(values: list[float]) -> dict:
    """Mean and its 95% t-interval; ``low``/``high`` None with fewer than two values."""
    values = [v for v in values if v is not None]
    n = len(values)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0, "excludes_zero": False}
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1, "excludes_zero": False}
    half = t_975(n - 1) * statistics.stdev(values) / math.sqrt(n)
    low, high = mean - half, mean + half
    return {"mean": mean, "low": low, "high": high, "n": n, "excludes_zero": low > 0 or high < 0}


def paired(a: list[float | None], b: list[float | None]) -> dict:
    """a - b over pairs (same start and seed) where both exist: mean and 95% t-interval."""
    return interval([x - y for x, y in zip(a, b, strict=True) if x is not None and y is not None])


def show(ci: dict, digits: int = 4, signed: bool = True) -> str:
    """``+0.0123 [-0.0040, +0.0286], n=6`` (a difference; ``signed=False`` for a level); no interval for one run."""
    if ci["mean"] is None:
        return "–"
    sign = "+" if signed else ""
    if ci["low"] is None:
        return f"{ci['mean']:{sign}.{digits}f} (n=1, no interval)"
    return f"{ci['mean']:{sign}.{digits}f} [{ci['low']:{sign}.{digits}f}, {ci['high']:{sign}.{digits}f}], n={ci['n']}"


def mean_sd(values: list[float | None], digits: int = 4) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def band(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float, float, float]]:
    """(x, mean, low, high) at the x every curve has: the mean over runs and its 95% t-interval (the mean itself
    for one run)."""
    if not curves:
        return []
    shared = sorted(set.intersection(*(set(x for x, _ in c) for c in curves)))
    rows = []
    for x in shared:
        ci = interval([dict(c)[x] for c in curves])
        low = ci["low"] if ci["low"] is not None else ci["mean"]
        high = ci["high"] if ci["high"] is not None else ci["mean"]
        rows.append((x, ci["mean"], low, high))
    return rows
