"""Plots of a suite (PNG, matplotlib's Agg backend): curves, bars, sharpness."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from experiments import suites
from experiments.stats import mean_std
from experiments.workdirs import Run, run_metric, sharpness_value

__all__ = [
    "X_LABELS",
    "bar_limits",
    "plot_bars",
    "plot_curves",
    "plot_differences",
    "plot_final",
    "plot_sharpness_vs_accuracy",
]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(labels: Sequence[str]) -> dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _grid(n: int, width: float = 4.2, height: float = 3.2):
    plt = _plt()
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, height * nrows + 0.6), squeeze=False
    )
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


#: The x axes of :func:`plot_curves`.
X_LABELS = {
    "epoch": "epoch",
    "time": "training wall-clock (s)",
    "grads": "gradient evaluations (forward+backward passes, batches)",
}


def _x_value(run: Run, row: dict, x: str, times: dict) -> float | None:
    """The x coordinate of a history row: its epoch, training time or gradient evaluations."""
    if x == "epoch":
        return row["epoch"]
    if x == "time":
        return times.get(row["epoch"])
    if x == "grads":
        return (
            None
            if row.get("step") is None
            else suites.gradient_evaluations_at(run.cell, row["step"])
        )
    raise ValueError(f"unknown x axis {x!r}; valid: {', '.join(X_LABELS)}")


def _curve(runs: Sequence[Run], key: str, x: str = "epoch"):
    """Per epoch: (x mean, y mean, y std) over the runs that have that epoch."""
    by_epoch: dict[int, list[tuple[float, float]]] = {}
    for r in runs:
        times = {t["epoch"]: t.get("train_time_s") for t in r.timing}
        for row in r.history:
            if row.get(key) is None:
                continue
            xv = _x_value(r, row, x, times)
            if xv is None:
                continue
            by_epoch.setdefault(row["epoch"], []).append((float(xv), float(row[key])))
    xs, ys, ss = [], [], []
    for e in sorted(by_epoch):
        pts = by_epoch[e]
        xs.append(sum(p[0] for p in pts) / len(pts))
        m, s, _ = mean_std([p[1] for p in pts])
        ys.append(m)
        ss.append(s or 0.0)
    return xs, ys, ss


def _legend(fig, axes, labels):
    handles, names = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            names,
            loc="lower center",
            ncol=min(len(names), 5),
            fontsize=8,
            frameon=False,
        )
        fig.tight_layout(rect=(0, 0.06 + 0.05 * (len(names) > 5), 1, 0.95))
    else:
        fig.tight_layout(rect=(0, 0, 1, 0.95))


def _has_gradient_count(run: Run) -> bool:
    try:
        suites.gradient_evaluations(run.cell.method, dict(run.cell.overrides))
    except ValueError:  # a method this checkout does not define
        return False
    return True


def plot_curves(groups, group, key, x, ylabel, path, title, scale=100.0) -> str:
    """Mean curve of ``key`` per row against ``x`` (:data:`X_LABELS`), ± std band."""
    plt = _plt()
    keys = [k for k in groups if k[0] == group]
    settings = list(dict.fromkeys(k[1] for k in keys))
    labels = list(dict.fromkeys(k[2] for k in keys))
    colors = _colors(labels)
    fig, axes = _grid(len(settings))
    for ax, setting in zip(axes, settings, strict=True):
        for label in labels:
            runs = [r for r in groups.get((group, setting, label), []) if r.finished]
            if x == "grads":
                runs = [r for r in runs if _has_gradient_count(r)]
            if not runs:
                continue
            xs, ys, ss = _curve(runs, key, x)
            lo = [scale * (m - s) for m, s in zip(ys, ss, strict=True)]
            hi = [scale * (m + s) for m, s in zip(ys, ss, strict=True)]
            ax.plot(xs, [scale * y for y in ys], marker="o", ms=3, color=colors[label], label=label)
            ax.fill_between(xs, lo, hi, color=colors[label], alpha=0.15, lw=0)
        ax.set_title(setting, fontsize=9)
        ax.set_xlabel(X_LABELS[x])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    _legend(fig, axes, labels)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_final(groups, group, path, title) -> str:
    plt = _plt()
    keys = [k for k in groups if k[0] == group]
    settings = list(dict.fromkeys(k[1] for k in keys))
    labels = list(dict.fromkeys(k[2] for k in keys))
    fig, axes = _grid(len(settings), width=max(4.2, 0.55 * len(labels) + 1.5))
    for ax, setting in zip(axes, settings, strict=True):
        for j, (metric, name, marker) in enumerate(
            (("best_val_test", "test acc @ best val loss", "o"), ("final_test", "final", "s"))
        ):
            xs, ms, ss = [], [], []
            for i, label in enumerate(labels):
                runs = [r for r in groups.get((group, setting, label), []) if r.finished]
                m, s, _ = mean_std([run_metric(r, metric) for r in runs])
                if m is not None:
                    xs.append(i + (j - 0.5) * 0.2)
                    ms.append(100 * m)
                    ss.append(100 * (s or 0.0))
            ax.errorbar(xs, ms, yerr=ss, fmt=marker, capsize=3, ms=4, label=name)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(setting, fontsize=9)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    _legend(fig, axes, ["a", "b"])
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def bar_limits(lows: Sequence[float], highs: Sequence[float]) -> tuple[float, float]:
    """y limits of a bar chart: from 0 (or below it, for negative bars) to 5 % above the
    highest error bar. Bars never start above 0: a cut axis exaggerates differences."""
    bottom = min(0.0, *lows)
    return bottom, max(0.0, *highs) + 0.05 * (max(0.0, *highs) - bottom) + 1e-9


def plot_bars(groups, group, path, title, metric="best_val_test", ylabel=None) -> str:
    """The paper's bar chart: settings along x, methods side by side, std error bars.

    More than 4 settings wrap onto several rows (4 settings each). Bars start at 0; the
    zoomed comparisons are :func:`plot_final` and :func:`plot_differences`.
    """
    plt = _plt()
    keys = [k for k in groups if k[0] == group]
    settings = list(dict.fromkeys(k[1] for k in keys))
    labels = list(dict.fromkeys(k[2] for k in keys))
    colors = _colors(labels)
    width = 0.8 / max(len(labels), 1)
    per_row = 4 if len(settings) > 4 else max(len(settings), 1)
    chunks = [settings[i : i + per_row] for i in range(0, len(settings), per_row)] or [[]]
    scale = 100.0 if metric in ("best_val_test", "final_test") else 1.0
    fig, axes = plt.subplots(
        len(chunks),
        1,
        figsize=(max(6.0, 0.3 * len(labels) * per_row + 2), 3.4 * len(chunks) + 1.0),
        squeeze=False,
    )
    handles: dict[str, Any] = {}
    lows, highs = [], []
    for ax, chunk in zip(axes[:, 0], chunks, strict=True):
        for i, label in enumerate(labels):
            xs, ms, ss = [], [], []
            for j, setting in enumerate(chunk):
                runs = [r for r in groups.get((group, setting, label), []) if r.finished]
                values = [
                    run_metric(r, metric) if r.summary else sharpness_value(r, metric) for r in runs
                ]
                m, s, _ = mean_std(values)
                if m is not None:
                    xs.append(j - 0.4 + width * (i + 0.5))
                    ms.append(scale * m)
                    ss.append(None if s is None else scale * s)
                    lows.append(scale * m - scale * (s or 0.0))
                    highs.append(scale * m + scale * (s or 0.0))
            if xs:
                # Error bars only where there is a spread (more than one seed).
                yerr = [e or 0.0 for e in ss] if any(e is not None for e in ss) else None
                handles[label] = ax.bar(
                    xs, ms, width, yerr=yerr, capsize=2, color=colors[label], label=label
                )
        ax.set_xticks(range(len(chunk)))
        ax.set_xticklabels(chunk, fontsize=8)
        ax.set_xlim(-0.5, per_row - 0.5)
        ax.set_ylabel(ylabel or "test acc @ best val loss (%)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    if lows:  # one scale for every row
        bottom, top = bar_limits(lows, highs)
        for ax in axes[:, 0]:
            ax.set_ylim(bottom, top)
    fig.suptitle(title, fontsize=10)
    names = [label for label in labels if label in handles]
    if names:
        fig.legend(
            [handles[n] for n in names],
            names,
            loc="lower center",
            ncol=min(len(names), 5),
            fontsize=8,
            frameon=False,
        )
    fig.tight_layout(
        rect=(0, (0.07 if len(chunks) == 1 else 0.04) + 0.05 * (len(names) > 5), 1, 0.96)
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_sharpness_vs_accuracy(runs: Sequence[Run], path: str, title: str) -> str:
    plt = _plt()
    done = [r for r in runs if r.finished and r.source_summary]
    labels = list(dict.fromkeys(r.cell.label for r in done))
    colors = _colors(labels)
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    for label in labels:
        pts = [
            (
                sharpness_value(r, "lambda_max"),
                run_metric(Run(r.cell, "done", r.source_summary), "final_test"),
            )
            for r in done
            if r.cell.label == label
        ]
        pts = [(a, b) for a, b in pts if a is not None and b is not None]
        if pts:
            ax.scatter(
                [p[0] for p in pts], [100 * p[1] for p in pts], color=colors[label], label=label
            )
    ax.set_xlabel("top Hessian eigenvalue (final model)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    # Outside the axes, so it hides no point.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_differences(rows, reference: str, path: str, title: str) -> str:
    """Seed-paired differences to ``reference`` with their 95 % confidence intervals.

    Args:
      rows: ``(label, metric name, PairedDifference)`` triples (from
        :func:`experiments.tables.paired_differences`), one panel per metric name.
      reference: the reference row's label (for the axis title).
      path: the PNG to write.
      title: the figure title.

    Returns:
      ``path``.
    """
    plt = _plt()
    metrics = list(dict.fromkeys(m for _, m, _ in rows))
    labels = list(dict.fromkeys(label for label, _, _ in rows))
    fig, axes = _grid(len(metrics) or 1, width=5.0, height=0.35 * len(labels) + 1.4)
    for ax, metric in zip(axes, metrics, strict=False):
        ys, ms, lo, hi = [], [], [], []
        for i, label in enumerate(labels):
            d = next((d for lab, m, d in rows if lab == label and m == metric), None)
            if d is None or d.mean is None:
                continue
            ys.append(i)
            ms.append(d.mean)
            lo.append(d.mean - (d.ci_low if d.ci_low is not None else d.mean))
            hi.append((d.ci_high if d.ci_high is not None else d.mean) - d.mean)
        ax.errorbar(ms, ys, xerr=[lo, hi], fmt="o", capsize=3, ms=4, color="tab:blue")
        ax.axvline(0.0, color="k", lw=0.8)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"{metric} minus {reference} (pp), mean and 95 % CI", fontsize=8)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
