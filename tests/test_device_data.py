"""The loop's on-device data path trains bit for bit like host-gathered batches.

The loop uploads the training set once and each epoch's index plan once, and its jitted step
gathers every batch on the device (``steps.make_gather_train_step``). The reference here is
the host path the loop used before: ``protocol.local_batch`` gathers each step's examples on
the host, ``jax.make_array_from_process_local_data`` shards them over the mesh, and
``steps.make_train_step`` trains on them. Both must end with identical parameters, model state
and metric sums (``==``, not a tolerance) after two epochs, on one device and on 8 simulated
CPU devices (each in a subprocess, since the device count is fixed when jax starts), for:

* ``project``: SADT-T1 with ``teacher_every=2`` (base steps between teacher steps), CutMix
  within the batch, the loop stopped after 8 steps and resumed mid-epoch;
* ``release``: the release's data order (1024-style buffer shuffle, here 16), CutMix partners
  from a second stream, the partial last batch kept (another shape) and the optimizer reset
  at every epoch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

VARIANTS = ("project", "release")
NUM_TRAIN = 200  # batch 32: 6 full steps, and a partial batch of 8 (divisible by 8 devices)


def _dataset():
    from sadt_jax.data import Dataset

    rng = np.random.default_rng(0)

    def split(n):
        images = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
        return images, rng.integers(0, 10, n).astype(np.int32)

    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = split(NUM_TRAIN), split(16), split(16)
    return Dataset(
        tr_x, tr_y, va_x, va_y, te_x, te_y, 10, (8, 8, 1), np.float32([120.0]), np.float32([70.0])
    )


def _config(variant: str):
    from configs import fashion_mnist

    if variant == "project":
        config = fashion_mnist.get_config("sadt_t1")
        config.teacher_every = 2
    else:
        config = fashion_mnist.get_config("base")
        config.data.order = "buffer"
        config.data.shuffle_buffer = 16
        config.data.cutmix_partner = "stream"
        config.data.drop_remainder = False
        config.optim.reset_every_epoch = True
    config.batch_size, config.num_epochs, config.log_every_steps = 32, 2, 4
    config.data.num_validation = 0
    config.data.max_test_examples = 200
    return config


def _host_path(run, num_steps: int):
    """The previous loop: host-gathered batches fed to ``make_train_step``."""
    from sadt_jax.train import builders, protocol, steps

    mean, std = protocol.normalization(run.config, run.dataset)
    kwargs = dict(
        aug_key=run.aug_key,
        state_sharding=run.replicated,
        augment_name=run.config.data.augment,
        mean=mean,
        std=std,
        num_classes=run.dataset.num_classes,
        cutmix_alpha=run.config.data.cutmix_alpha,
        cutmix_box=run.config.data.cutmix_box,
    )
    train_step = steps.make_train_step(run.sadt_config, **kwargs)
    base_step = steps.make_train_step(builders.method_config("base"), **kwargs)
    reset = protocol.make_optimizer_reset(run.config, run.replicated)
    state, sums = run.init_state(), run.init_metric_sums()
    for step in range(num_steps):
        epoch, s = divmod(step, run.steps_per_epoch)
        if s == 0 and reset is not None:
            state = reset(state)
        if s == 0:
            plan = protocol.epoch_plan(run.config, run.dataset.num_train, epoch)
            sums = run.init_metric_sums()
        batch = {
            k: jax.make_array_from_process_local_data(run.data_sharding, v)
            for k, v in protocol.local_batch(run.dataset, plan[s]).items()
        }
        fn = base_step if step % run.config.teacher_every else train_step
        state, sums = fn(state, sums, batch)
    return state, sums


def _device_path(run, num_steps: int, stop_after: int, workdir: str):
    """The loop's epoch functions, stopped after ``stop_after`` steps and resumed there."""
    from sadt_jax.train import loop

    progress = loop.Progress(state=run.init_state(), sums=run.init_metric_sums(), step=0)
    ctx = loop._make_context(run, workdir, None, loop._Preemption(), False)
    for total in (stop_after, num_steps):  # a run stopped after stop_after steps, then resumed
        ctx.run = dataclasses.replace(run, total_steps=total)
        for epoch in range(progress.step // run.steps_per_epoch, -(-total // run.steps_per_epoch)):
            if progress.step == epoch * run.steps_per_epoch and epoch:
                progress.sums = run.init_metric_sums()
            loop.on_epoch_start(ctx, progress, epoch)
            loop._train_epoch(ctx, progress, epoch)
    return progress.state, progress.sums


def compare(variant: str, workdir: str) -> dict:
    """Max |difference| between the two paths after two epochs, and how far training moved."""
    from sadt_jax.train import builders

    run = builders.build_run(_config(variant), dataset=_dataset())
    num_steps = 2 * run.steps_per_epoch
    host = _host_path(run, num_steps)
    device = _device_path(run, num_steps, stop_after=8, workdir=workdir)
    init = run.init_state()

    def max_diff(a, b):
        leaves = jax.tree.leaves(jax.tree.map(lambda x, y: np.max(np.abs(x - y)), a, b))
        return float(max(leaves))

    host, device, init = jax.device_get((host, device, init))
    return {
        "steps_per_epoch": run.steps_per_epoch,
        "step": int(device[0].step),
        "params": max_diff(host[0].params, device[0].params),
        "model_state": max_diff(host[0].model_state, device[0].model_state),
        "opt_state": max_diff(host[0].opt_state, device[0].opt_state),
        "sums": max_diff(host[1], device[1]),
        "moved": max_diff(host[0].params, init.params),
        "devices": jax.device_count(),
    }


def _check(res: dict, variant: str) -> None:
    spe = 7 if variant == "release" else 6  # the release keeps the partial batch
    assert res["steps_per_epoch"] == spe and res["step"] == 2 * spe, res
    assert res["moved"] > 1e-3, res  # training did something: the comparison is not vacuous
    for key in ("params", "model_state", "opt_state", "sums"):
        assert res[key] == 0.0, (key, res)


# 8 devices: slow; tests/test_train.py::test_eight_devices_train_like_one already trains the
# loop's device gather on 8 devices like on one, which this file checks against host batches.
@pytest.mark.parametrize("devices", [1, pytest.param(8, marks=pytest.mark.slow)])
def test_device_gather_trains_like_host_batches(devices, tmp_path):
    # A subprocess: the device count is fixed when jax starts. Optimization level 0 about
    # halves XLA's CPU compile time; both paths are compiled the same way.
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = f" --xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + flags).strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    worker = (
        "import json, sys; sys.path.insert(0, 'tests'); import test_device_data as t; "
        f"print('RESULT ' + json.dumps({{v: t.compare(v, {str(tmp_path)!r}) for v in t.VARIANTS}}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", worker],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    results = json.loads(line[len("RESULT ") :])
    for variant in VARIANTS:
        assert results[variant]["devices"] == devices
        _check(results[variant], variant)


def test_plan_blocks_stack_equal_sizes_and_split_the_partial_batch():
    from sadt_jax.data import pipeline

    plan = [{"index": np.arange(4) + 4 * s, "partner": np.arange(4)} for s in range(3)]
    plan.append({"index": np.arange(2), "partner": np.arange(2)})
    blocks = pipeline.plan_blocks(plan)
    assert [first for first, _ in blocks] == [0, 3]
    np.testing.assert_array_equal(blocks[0][1]["index"][1:], [[4, 5, 6, 7], [8, 9, 10, 11]])
    assert blocks[0][1]["index"].dtype == np.int32 and blocks[1][1]["partner"].shape == (1, 2)
    assert [first for first, _ in pipeline.plan_blocks(plan[:3])] == [0]
