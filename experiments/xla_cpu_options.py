"""XLA:CPU compile options against the default, interleaved in one process.

Issue 15 lists "thread-pool and Eigen settings for 2 cores" and XLA:CPU flags among the CPU
levers. Flags set through ``XLA_FLAGS`` apply to a whole process, so comparing them means
comparing processes (noisy on a shared machine); most XLA:CPU debug options can instead be
given to one compilation (``jax.jit(f).lower(...).compile(compiler_options=...)``), so the
variants here are compiled side by side and their steps timed in alternating order, in one
process, on the release-layout simple CNN of the Keras comparison (batch 512, 28x28x1).

Each variant is ``name=json`` where the JSON maps option names to values, e.g.
``noeigen={"xla_cpu_multi_thread_eigen": false}``. Prints the median step time, the median
of the per-round ratios to the first variant and the cores busy (CPU time / wall time).

    PYTHONPATH=. python experiments/xla_cpu_options.py --methods base,sadt_t1 --rounds 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from sadt_jax.main import keep_freed_memory

DEFAULT_VARIANTS = (
    "default={}",
    'noeigen={"xla_cpu_multi_thread_eigen": false}',
    'vec512={"xla_cpu_prefer_vector_width": 512}',
    'concurrent={"xla_cpu_enable_concurrency_optimized_scheduler": true}',
)


def _parse_variant(text: str) -> tuple[str, dict]:
    name, sep, options = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"error: variant {text!r}: expected name=json, e.g. default={{}}")
    try:
        parsed = json.loads(options)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: variant {text!r}: options are not JSON ({e})") from None
    if not isinstance(parsed, dict):
        raise SystemExit(f"error: variant {text!r}: options must be a JSON object")
    return name, parsed


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    p.add_argument("--methods", default="base,sadt_t1")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="Timed steps per variant per round.")
    a = p.parse_args(argv)
    variants = dict(_parse_variant(v) for v in a.variants)
    keep_freed_memory()  # before JAX starts, as the entry points do

    from experiments import benchmark

    args = benchmark.parse_args(
        ["--batch_size", "512", "--model_kwargs", json.dumps(benchmark.KERAS_ANCHOR_MODEL)]
    )
    net, variables, batch = benchmark._setup(args)
    out = {"loadavg_start": os.getloadavg()}
    for method in a.methods.split(","):
        runners = {}
        for name, options in variants.items():
            runners[name] = benchmark._method_runner(
                method, net, variables, batch, args, compiler_options=options or None
            )
            runners[name].name = f"{method} {name}"
            runners[name].run(2)  # warm-up
        for i in range(a.rounds):
            for r in runners.values() if i % 2 == 0 else reversed(runners.values()):
                r.timed(a.steps)
        first = next(iter(runners.values()))
        for name, r in runners.items():
            row = {
                "step_ms": 1e3 * statistics.median(r.times),
                "round_ratio": r.round_ratio(first),
                "cores_busy": r.cpu_s / r.wall_s,
            }
            out[f"{method} {name}"] = row
            print(
                f"{method:8s} {name:12s} {row['step_ms']:8.1f} ms  ratio {row['round_ratio']:.3f}"
                f"  cores busy {row['cores_busy']:.2f}",
                flush=True,
            )
    out["loadavg_end"] = os.getloadavg()
    print(f"load average {out['loadavg_start'][0]:.1f} -> {out['loadavg_end'][0]:.1f}")
    return out


if __name__ == "__main__":
    main()
