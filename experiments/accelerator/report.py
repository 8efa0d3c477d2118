"""The accelerator check's targets (✓/✗) and its report: ``report.md`` and ``check.json``."""

from __future__ import annotations

import json
import os
from typing import Any

from experiments.accelerator.plan import TARGETS

# ---- targets and the report ------------------------------------------------------------------


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every measured target: ``{"target", "where", "value", "bound", "ok"}``."""
    checks = []
    for phase in ("speed_simple_cnn", "speed_large"):
        for name, case in (results.get(phase) or {}).items():
            for method, r in (case.get("methods") or {}).items():
                if method in ("sam", "sadt_t1", "sadt_t3", "sadt_t2") and r.get("ratio_to_base"):
                    bound = TARGETS[method]
                    checks.append(
                        {
                            "target": f"{method} step <= {bound:g} x base",
                            "where": name,
                            "value": r["ratio_to_base"],
                            "ok": r["ratio_to_base"] <= bound,
                        }
                    )
            base = (case.get("methods") or {}).get("base") or {}
            if case.get("model") == "wrn28_10" and case.get("dtype") == "bfloat16":
                bound = TARGETS["wrn28_10_bf16_mfu"]
                mfu = base.get("mfu")
                checks.append(
                    {
                        "target": f"wrn28_10 bf16 base MFU >= {bound:.0%}",
                        "where": name,
                        "value": mfu,
                        "ok": None if mfu is None else mfu >= bound,
                    }
                )
    loop = results.get("loop_rate") or {}
    if "loop_vs_bare_rate" in loop:
        bound = TARGETS["loop_vs_bare_rate"]
        checks.append(
            {
                "target": f"loop >= {bound:.0%} of the bare step's rate",
                "where": f"simple_cnn base b{loop['batch_size']}",
                "value": loop["loop_vs_bare_rate"],
                "ok": loop["loop_vs_bare_rate"] >= bound,
            }
        )
    return checks


def _f(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _mark(ok) -> str:
    return "–" if ok is None else ("✓" if ok else "✗")


def _report_speed(results: dict[str, Any]) -> list[str]:
    lines = []
    for phase in ("speed_simple_cnn", "speed_large"):
        for name, case in (results.get(phase) or {}).items():
            if "methods" not in case:
                lines += [f"\n**{name}**: {case.get('skipped') or case.get('error')}"]
                continue
            lines += [
                f"\n**{name}** (shape {'x'.join(map(str, case['shape']))}, peak "
                f"{_f(case['peak_tflops'], 'g')} TFLOP/s from {case['peak_source']!r}; "
                f"`{case['command']}`)\n",
                "| method | step ms | ratio to base | compile s | GFLOP/step | TFLOP/s | MFU "
                "| XLA total MB |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for m, r in case["methods"].items():
                lines.append(
                    f"| {m} | {_f(r['step_ms'], '.3f')} | {_f(r['ratio_to_base'], '.2f')} "
                    f"| {_f(r['compile_s'], '.1f')} | {_f(r['gflop_per_step'], '.1f')} "
                    f"| {_f(r['achieved_tflops'], '.1f')} | {_f(r['mfu'], '.1%')} "
                    f"| {_f(r['xla_total_mb'], '.0f')} |"
                )
            if case.get("dropped_methods"):
                lines.append(f"\n(not timed, no time left: {', '.join(case['dropped_methods'])})")
    return lines


def _report_training(results: dict[str, Any]) -> list[str]:
    lines = []
    loop = results.get("loop_rate") or {}
    if "loop_ms_per_step" in loop:
        lines += [
            "\n## Loop rate\n",
            f"Real loop (Fashion-MNIST, base, batch {loop['batch_size']}, epochs after the first): "
            f"{loop['loop_ms_per_step']:.3f} ms/step; bare jitted step on a device-resident "
            f"batch: {loop['bare_ms_per_step']:.3f} ms/step; loop at "
            f"**{loop['loop_vs_bare_rate']:.1%}** of the bare rate (host data time "
            f"{_f(loop['data_time_fraction'], '.1%')} of the epoch). Checkpoints written: "
            f"{', '.join(loop['checkpoints'])}.",
        ]
    prec = results.get("precision") or {}
    if "float32" in prec:
        lines += [
            f"\n## bfloat16 vs float32 ({prec['method']}, {prec['epochs']} epochs, seed 0)\n",
            "| dtype | final test acc | best-val test acc | median epoch s |",
            "|---|---|---|---|",
        ]
        for d in ("float32", "bfloat16"):
            r = prec[d]
            lines.append(
                f"| {d} | {_f(r['final_test_accuracy'], '.2%')} "
                f"| {_f(r['best_val_test_accuracy'], '.2%')} "
                f"| {_f(r['median_epoch_time_s'], '.2f')} |"
            )
        lines.append(f"\nbfloat16 − float32: {prec['bf16_minus_f32_pp']:+.2f} pp")
    comp = results.get("comparison") or {}
    if "by_method" in comp:
        lines += [
            f"\n## Fashion-MNIST comparison ({comp['epochs']} epochs)\n",
            "| method | seeds | final test acc (mean ± sd) | best-val test acc (mean ± sd) "
            "| train s (mean) |",
            "|---|---|---|---|---|",
        ]
        for m, a in comp["by_method"].items():
            lines.append(
                f"| {m} | {','.join(map(str, a['seeds']))} "
                f"| {_f(a['final_test_accuracy_mean'], '.2%')} ± "
                f"{_f(a['final_test_accuracy_std'], '.2%')} "
                f"| {_f(a['best_val_test_accuracy_mean'], '.2%')} ± "
                f"{_f(a['best_val_test_accuracy_std'], '.2%')} "
                f"| {_f(a['train_time_s_mean'], '.1f')} |"
            )
        if comp["skipped"]:
            lines.append(f"\nSkipped (time budget): {'; '.join(comp['skipped'])}")
    return lines


def markdown_report(results: dict[str, Any]) -> str:
    """``report.md``: device, tests, targets, step times, loop, precision, comparison."""
    dev = results.get("device") or {}
    lines = [
        f"# Accelerator check: {dev.get('device_kind', '?')}\n",
        f"{dev.get('date_utc', '')}, commit {dev.get('git_commit')}, "
        f"{'SMOKE (tiny sizes) ' if results['smoke'] else ''}"
        f"command `{results['command']}`, {results['elapsed_s']:.0f} s of the "
        f"{results['budget_s']:.0f} s budget.\n",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in (dev.get("versions") or {}).items()),
    ]
    for key in ("platform_version", "nvidia_smi", "memory_limit_gib"):
        if key in dev:
            lines.append(f"\n{key}: `{dev[key]}`")
    tests = results.get("tests") or {}
    if "counts" in tests:
        lines += [
            "\n## Tests on the device\n",
            f"`pytest -m accelerator` over {', '.join(tests['files'])}: {tests['counts']}"
            + (" — TIMED OUT" if tests["timed_out"] else ""),
        ]
        if tests["failed"]:
            lines.append("\nFailed: " + ", ".join(tests["failed"]))
        if "rerun_highest_precision" in tests:
            r = tests["rerun_highest_precision"]
            lines.append(f"\nRerun with JAX_DEFAULT_MATMUL_PRECISION=highest: {r['counts']}")
    lines += ["\n## Targets\n", "| target | where | value | ok |", "|---|---|---|---|"]
    for c in results.get("targets") or []:
        value = c["value"]
        shown = "–" if value is None else (f"{value:.1%}" if "%" in c["target"] else f"{value:.2f}")
        lines.append(f"| {c['target']} | {c['where']} | {shown} | {_mark(c['ok'])} |")
    lines += ["\n## Step time"] + _report_speed(results) + _report_training(results)
    lines += ["\n## Phases\n", "| phase | seconds | outcome |", "|---|---|---|"]
    for name, p in (results.get("phases") or {}).items():
        lines.append(f"| {name} | {p['wall_s']:.1f} | {p['outcome']} |")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: str, results: dict[str, Any]) -> None:
    results["targets"] = check_targets(results)
    with open(os.path.join(out_dir, "check.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown_report(results))
