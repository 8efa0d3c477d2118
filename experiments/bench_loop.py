r"""The training loop's step rate against the bare jitted step's, in one process.

Three arms train the same run (a config of ``configs/fashion_mnist.py``, the whole in-memory
training set) from the same initial state, interleaved round by round (the order rotating) so
that a machine whose load drifts slows them alike:

* ``loop``: the real loop's epoch function (``sadt_jax.train.loop._train_epoch``), whose
  jitted step gathers and augments its batch on the device from the training set uploaded
  once and each epoch's index plan uploaded once; it also polls for preemption, reports
  progress, and at every ``log_every_steps`` step (and at the end of each round) reads the
  metric sums back and checks the state for NaN/Inf, as a run does.
* ``bare``: the same jitted train step (``steps.make_train_step``) on batches placed on the
  device before timing, dispatched back to back, one ``block_until_ready`` at the end: the
  rate the loop can at best reach.
* ``host``: the loop's previous data path for comparison: each step's batch gathered on the
  host (``protocol.local_batch``) and copied over (``jax.make_array_from_process_local_data``)
  before the same step as ``bare``.

Each round runs ``--steps`` steps per arm; the rate of a round is steps / wall time. The
report is the median over rounds of each arm's rate and of the per-round ratio ``loop / bare``
(the target: at least 0.95). The loop arm re-plans and uploads an epoch's plan whenever a round
enters a new epoch, at most once per ``--steps`` steps instead of once per epoch, so the ratio
is a slight underestimate of a run's.

Run (about three minutes on a loaded two-core CPU)::

    PYTHONPATH=. python experiments/bench_loop.py --batch_size 256 --steps 4 --rounds 15 \
        --out results/loop_vs_step.json --markdown results/loop_vs_step.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from sadt_jax import io  # noqa: E402
from sadt_jax.train import builders, loop, protocol, steps  # noqa: E402

TARGET = 0.95


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="base")
    p.add_argument("--model", default="simple_cnn")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4, help="Timed steps per arm per round.")
    p.add_argument("--rounds", type=int, default=15, help="Timed rounds (arms interleaved).")
    p.add_argument("--data_dir", default=None, help="Fashion-MNIST IDX folder (default: found).")
    p.add_argument("--out", default=None, help="Write the results as JSON to this path.")
    p.add_argument("--markdown", default=None, help="Write a markdown report to this path.")
    return p.parse_args(argv)


def _config(args) -> Any:
    from configs import fashion_mnist

    config = fashion_mnist.get_config(args.method)
    config.model.name = args.model
    config.batch_size = args.batch_size
    config.num_epochs = 1000  # long enough for every round; only steps are run
    config.data.num_validation = 0
    if args.data_dir:
        config.data.data_dir = args.data_dir
    return config


def _preprocess_kwargs(run) -> dict[str, Any]:
    mean, std = protocol.normalization(run.config, run.dataset)
    c = run.config.data
    return dict(
        augment_name=c.augment,
        mean=mean,
        std=std,
        num_classes=run.dataset.num_classes,
        cutmix_alpha=c.cutmix_alpha,
        cutmix_box=c.cutmix_box,
    )


class _LoopArm:
    """The loop's epoch functions, ``steps`` steps at a time."""

    def __init__(self, run, workdir: str):
        self.run = run
        self.ctx = loop._make_context(run, workdir, None, loop._Preemption(), False)
        self.progress = loop.Progress(state=run.init_state(), sums=run.init_metric_sums(), step=0)

    def __call__(self, num_steps: int) -> None:
        p, spe = self.progress, self.run.steps_per_epoch
        total = p.step + num_steps
        self.ctx.run = dataclasses.replace(self.run, total_steps=total)
        for epoch in range(p.step // spe, -(-total // spe)):  # the loop's own epoch iteration
            loop._train_epoch(self.ctx, p, epoch)


class _StepArm:
    """The bare jitted step on pre-placed batches, or on batches gathered on the host per step."""

    def __init__(self, run, step, *, host_gather: bool):
        self.run, self.step, self.host_gather = run, step, host_gather
        self.state, self.sums = run.init_state(), run.init_metric_sums()
        self.plan = protocol.epoch_plan(run.config, run.dataset.num_train, 0)
        self.placed = [self._batch(s) for s in range(len(self.plan))] if not host_gather else None
        self.position = 0

    def _batch(self, s: int) -> dict[str, jax.Array]:
        local = protocol.local_batch(self.run.dataset, self.plan[s])
        return {
            k: jax.make_array_from_process_local_data(self.run.data_sharding, v)
            for k, v in local.items()
        }

    def __call__(self, num_steps: int) -> None:
        for _ in range(num_steps):
            s = self.position % len(self.plan)
            batch = self._batch(s) if self.host_gather else self.placed[s]
            self.state, self.sums = self.step(self.state, self.sums, batch)
            self.position += 1
        jax.block_until_ready((self.state, self.sums))


def _timed(arm, num_steps: int) -> float:
    t0 = time.perf_counter()
    arm(num_steps)
    return num_steps / (time.perf_counter() - t0)


def measure(args) -> dict[str, Any]:
    """Compiles and warms up the three arms, then times them interleaved over the rounds."""
    run = builders.build_run(_config(args))
    step = steps.make_train_step(  # the loop's step without the gather, compiled once for both
        run.sadt_config,
        aug_key=run.aug_key,
        state_sharding=run.replicated,
        **_preprocess_kwargs(run),
    )
    with tempfile.TemporaryDirectory() as workdir:
        arms = {
            "loop": _LoopArm(run, workdir),
            "bare": _StepArm(run, step, host_gather=False),
            "host": _StepArm(run, step, host_gather=True),
        }
        t0 = time.perf_counter()
        for arm in arms.values():  # compile and warm up
            arm(2)
        warmup_s = time.perf_counter() - t0
        rates: dict[str, list[float]] = {name: [] for name in arms}
        load_before = os.getloadavg()
        names = list(arms)
        for r in range(args.rounds):  # the order rotates: no arm always follows the same one
            for name in names[r % 3 :] + names[: r % 3]:
                rates[name].append(_timed(arms[name], args.steps))
        load_after = os.getloadavg()
    ratios = [lo / b for lo, b in zip(rates["loop"], rates["bare"], strict=True)]
    host_ratios = [h / b for h, b in zip(rates["host"], rates["bare"], strict=True)]
    return {
        "steps_per_s": {k: statistics.median(v) for k, v in rates.items()},
        "loop_over_bare": statistics.median(ratios),
        "host_over_bare": statistics.median(host_ratios),
        "target": TARGET,
        "meets_target": statistics.median(ratios) >= TARGET,
        "rounds": {k: [round(x, 3) for x in v] for k, v in rates.items()},
        "round_ratios": [round(x, 4) for x in ratios],
        "warmup_s": warmup_s,
        "train_examples": run.dataset.num_train,
        "steps_per_epoch": run.steps_per_epoch,
        "load_average_1m": [load_before[0], load_after[0]],
    }


def _meta(args, argv) -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "command": "PYTHONPATH=. python experiments/bench_loop.py " + shlex.join(argv),
        "args": vars(args),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def markdown(result: dict[str, Any]) -> str:
    """A short report of :func:`measure`'s result (with ``_meta``)."""
    m, r = result["_meta"], result["steps_per_s"]
    a = m["args"]
    load = result["load_average_1m"]
    lines = [
        "# The training loop's step rate vs the bare jitted step",
        "",
        f"`{m['command']}`",
        "",
        f"{a['method']} on in-memory Fashion-MNIST ({result['train_examples']} training images, "
        f"{result['steps_per_epoch']} steps per epoch), {a['model']}, batch {a['batch_size']}; "
        f"{m['device_count']} {m['platform']} device(s) ({m['device_kind']}), "
        f"{m['cpu_count']} CPU cores, jax {m['jax']}, {m['date_utc']}. "
        f"{a['rounds']} interleaved rounds of {a['steps']} steps per arm; medians over rounds.",
        "",
        "| arm | steps/s | vs bare |",
        "|---|---:|---:|",
        f"| bare jitted step, batches pre-placed | {r['bare']:.2f} | 1.000 |",
        f"| **loop (on-device gather)** | {r['loop']:.2f} | **{result['loop_over_bare']:.3f}** |",
        f"| host gather + copy per step (previous loop) | {r['host']:.2f} | "
        f"{result['host_over_bare']:.3f} |",
        "",
        f"Target: loop >= {result['target']:.2f} x bare: "
        f"{'met' if result['meets_target'] else 'NOT met'}. Per-round loop/bare ratios: "
        f"{', '.join(f'{x:.3f}' for x in result['round_ratios'])}.",
        "",
        f"Load: 1-minute load average {load[0]:.2f} before and {load[1]:.2f} after the timed "
        f"rounds on {m['cpu_count']} cores. The bare step takes {1e3 / r['bare']:.1f} ms; the "
        f"per-round ratios spread over {min(result['round_ratios']):.3f}-"
        f"{max(result['round_ratios']):.3f}, which is the machine's noise, not the loop's cost.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    result = measure(args)
    result["_meta"] = _meta(args, argv)
    report = markdown(result)
    print(report)
    if args.out:
        io.write_json(args.out, result)
    if args.markdown:
        io.write_text(args.markdown, report)
    return result


if __name__ == "__main__":
    main()
