"""Plots of a suite (PNG, matplotlib's Agg backend): curves, bars, sharpness."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from experiments.stats import mean_std
from experiments.workdirs import Run, run_metric, sharpness_value

__all__ = [
    "plot_bars",
    "plot_curves",
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


def _curve(runs: Sequence[Run], key: str, x: str = "epoch"):
    """Per epoch: (x mean, y mean, y std) over the runs that have that epoch."""
    by_epoch: dict[int, list[tuple[float, float]]] = {}
    for r in runs:
        times = {t["epoch"]: t.get("train_time_s") for t in r.timing}
        for row in r.history:
            if row.get(key) is None:
                continue
            xv = row["epoch"] if x == "epoch" else times.get(row["epoch"])
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


def plot_curves(groups, group, key, x, ylabel, path, title) -> str:
    plt = _plt()
    keys = [k for k in groups if k[0] == group]
    settings = list(dict.fromkeys(k[1] for k in keys))
    labels = list(dict.fromkeys(k[2] for k in keys))
    colors = _colors(labels)
    fig, axes = _grid(len(settings))
    for ax, setting in zip(axes, settings, strict=True):
        for label in labels:
            runs = [r for r in groups.get((group, setting, label), []) if r.finished]
            if not runs:
                continue
            xs, ys, ss = _curve(runs, key, x)
            lo = [100 * (m - s) for m, s in zip(ys, ss, strict=True)]
            hi = [100 * (m + s) for m, s in zip(ys, ss, strict=True)]
            ax.plot(xs, [100 * y for y in ys], marker="o", ms=3, color=colors[label], label=label)
            ax.fill_between(xs, lo, hi, color=colors[label], alpha=0.15, lw=0)
        ax.set_title(setting, fontsize=9)
        ax.set_xlabel("epoch" if x == "epoch" else "training wall-clock (s)")
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


def plot_bars(groups, group, path, title, metric="best_val_test", ylabel=None) -> str:
    """The paper's bar chart: settings along x, methods side by side, std error bars.

    More than 4 settings wrap onto several rows (4 settings each).
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
                    ss.append(scale * (s or 0.0))
                    lows.append(scale * m - scale * (s or 0.0))
                    highs.append(scale * m + scale * (s or 0.0))
            if xs:
                handles[label] = ax.bar(
                    xs, ms, width, yerr=ss, capsize=2, color=colors[label], label=label
                )
        ax.set_xticks(range(len(chunk)))
        ax.set_xticklabels(chunk, fontsize=8)
        ax.set_xlim(-0.5, per_row - 0.5)
        ax.set_ylabel(ylabel or "test acc @ best val loss (%)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    if lows:  # one scale for every row; accuracies zoomed to the data
        bottom = max(0.0, math.floor(min(lows) / 5) * 5 - 5) if scale == 100.0 else min(0, *lows)
        top = max(highs) + 0.05 * (max(highs) - bottom) + 1e-9
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
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
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
    ax.set_xscale("symlog")
    ax.set_xlabel("top Hessian eigenvalue (final model)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
