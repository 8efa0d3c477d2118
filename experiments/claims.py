r"""Seed-paired 95 % confidence intervals from a suite's committed per-run table.

The README's claims are restated from these numbers. Input: ``results/<suite>/runs.csv``
(one row per run, written by :mod:`experiments.aggregate`); runs are paired by seed
within a setting (same initial weights and batches), and for every label and reference
the mean paired difference gets a two-sided t interval (n - 1 degrees of freedom) and a
paired t-test p-value. Nothing is rerun; only finished runs (state ``done``) count.

Run::

  python -m experiments.claims --runs=results/fashion_mnist/runs.csv --reference=base \
      --reference=base_2x

For a table that only has the mean, std and count of paired differences (the committed
sharpness tables), ``--paired_summary=results/sharpness/sharpness_vs_base_2x.csv`` gives
the same intervals from those three numbers. ``--minus=final_test_acc`` adds, per method,
the difference of ``--metric`` and that column within each run (what best-validation
selection changed), with its interval over seeds.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence

from experiments.stats import (
    PairedDifference,
    fmt_ci,
    fmt_ms,
    fmt_p,
    mean_std,
    paired_difference,
    t_interval,
)

__all__ = ["main", "paired_rows", "read_table", "seed_std_range", "within_run_rows"]

#: The column of runs.csv with the paper's number (test accuracy at the best-val-loss epoch).
METRIC = "test_acc_@_best_val"


def read_table(path: str) -> list[dict[str, str]]:
    """The rows of a CSV written by :mod:`experiments.aggregate` (``#`` lines skipped)."""
    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def _values(rows: list[dict[str, str]], metric: str) -> dict[tuple[str, str], dict[int, float]]:
    """``{(setting, label): {seed: value}}`` of the finished runs, in the table's order."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for r in rows:
        if r.get("state") != "done" or not r.get(metric):
            continue
        out.setdefault((r["setting"], r["label"]), {})[int(r["seed"])] = float(r[metric])
    return out


def paired_rows(
    rows: list[dict[str, str]], references: Sequence[str], metric: str = METRIC
) -> list[tuple[str, str, tuple[float | None, float | None, int], dict[str, PairedDifference]]]:
    """Per (setting, label): ``(setting, label, (mean, std, n), {reference: difference})``."""
    values = _values(rows, metric)
    out = []
    for (setting, label), by_seed in values.items():
        diffs = {}
        for ref in references:
            ref_values = values.get((setting, ref))
            if ref_values is None or ref == label:
                continue
            diffs[ref] = _seed_paired(by_seed, ref_values)
        out.append((setting, label, mean_std(list(by_seed.values())), diffs))
    return out


def within_run_rows(
    rows: list[dict[str, str]], metric: str, minus: str
) -> list[tuple[str, str, PairedDifference]]:
    """Per (setting, label): ``metric - minus`` within each run, with its interval over seeds.

    E.g. ``test_acc_@_best_val - final_test_acc``: what best-validation selection changed.
    """
    others = _values(rows, minus)
    return [
        (setting, label, _seed_paired(by_seed, others.get((setting, label), {})))
        for (setting, label), by_seed in _values(rows, metric).items()
    ]


def _seed_paired(values: dict[int, float], others: dict[int, float]) -> PairedDifference:
    """``values - others`` over the seeds both have, with its interval."""
    return paired_difference([v - others[s] for s, v in sorted(values.items()) if s in others])


def _within_markdown(rows, metric: str, minus: str) -> str:
    header = ["setting", "method", "n", f"{metric} − {minus} (pp)", "95 % CI", "p", "higher"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting, label, d in rows:
        lines.append("| " + " | ".join([setting, label, str(d.n), *_difference_cells(d)]) + " |")
    return "\n".join(lines)


def _difference_cells(d: PairedDifference | None) -> list[str]:
    """Mean ± std, 95 % CI, p and wins of a difference in points ("–" when there is none)."""
    if d is None or d.n == 0:
        return ["–", "–", "–", "–"]
    return [
        fmt_ms(d.mean, d.std, scale=100.0, signed=True),
        fmt_ci(d, scale=100.0),
        fmt_p(d.p_value),
        f"{d.wins}/{d.n}",
    ]


def seed_std_range(rows: list[dict[str, str]], metric: str = METRIC) -> tuple[float, float] | None:
    """The smallest and largest seed std of ``metric`` over the labels with >= 2 runs."""
    stds = [mean_std(list(v.values()))[1] for v in _values(rows, metric).values()]
    stds = [s for s in stds if s is not None]
    return (min(stds), max(stds)) if stds else None


def _markdown(rows, references: Sequence[str]) -> str:
    header = ["setting", "method", "n", "test acc (%)"]
    for ref in references:
        header += [f"Δ vs {ref} (pp)", "95 % CI", "p", "wins"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting, label, (m, s, n), diffs in rows:
        cells = [setting, label, str(n), fmt_ms(m, s, scale=100.0)]
        for ref in references:
            cells += _difference_cells(diffs.get(ref))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _summary_markdown(path: str) -> str:
    """Intervals from ``d_<metric>_mean``, ``d_<metric>_std`` and ``pairs`` columns."""
    rows = read_table(path)
    metrics = [c.removesuffix("_mean").removeprefix("d_") for c in rows[0] if c.endswith("_mean")]
    header = ["method", "pairs"] + [f"Δ {m}: mean, 95 % CI, p" for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        n = int(r["pairs"])
        cells = [r["label"], str(n)]
        for m in metrics:
            mean, std = r[f"d_{m}_mean"], r[f"d_{m}_std"]
            if not mean or not std:
                cells.append("–")
                continue
            d = t_interval(float(mean), float(std), n)
            digits = 2 if m == "lambda_max" else 4
            cells.append(
                f"{fmt_ms(d.mean, None, digits=digits, signed=True)} "
                f"{fmt_ci(d, digits=digits)} p={fmt_p(d.p_value)}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.claims", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--runs", help="A runs.csv of experiments.aggregate.")
    p.add_argument("--reference", action="append", default=[], help="Reference label(s).")
    p.add_argument("--metric", default=METRIC, help=f"A runs.csv column (default {METRIC}).")
    p.add_argument(
        "--minus",
        help="Also per method: --metric minus this runs.csv column within each run, over "
        "seeds (--minus=final_test_acc: what best-validation selection changed).",
    )
    p.add_argument("--paired_summary", help="A table with d_<metric>_mean/_std and pairs.")
    args = p.parse_args(argv)
    if not args.runs and not args.paired_summary:
        print("error: give --runs=<runs.csv> or --paired_summary=<csv>", file=sys.stderr)
        return 2
    if args.runs:
        rows = read_table(args.runs)
        for column in (args.metric, args.minus):
            if rows and column is not None and column not in rows[0]:
                print(f"error: {args.runs} has no column {column!r}", file=sys.stderr)
                return 2
        print(_markdown(paired_rows(rows, args.reference, args.metric), args.reference))
        spread = seed_std_range(rows, args.metric)
        if spread:
            print(f"\nseed std of {args.metric}: {100 * spread[0]:.2f}–{100 * spread[1]:.2f} pp")
        if args.minus:
            within = within_run_rows(rows, args.metric, args.minus)
            print("\n" + _within_markdown(within, args.metric, args.minus))
    if args.paired_summary:
        print(_summary_markdown(args.paired_summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
