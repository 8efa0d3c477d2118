"""``sadt_update`` on 1 device vs 8 simulated CPU devices.

The 8 devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is
imported, so the comparison runs in a subprocess (``_WORKER`` below) that prints one JSON
line of maximum absolute differences; the test asserts on it.

Compared, for ``sadt_t1`` (perturbation scaled up so that the KD gradient matters) and
``sam``, one step from the same state and batch (16 examples):

* ``mesh``: ``jax.jit`` with the batch sharded over a ``Mesh`` on a ``data`` axis, on the
  tiny BatchNorm CNN. Under jit BatchNorm statistics are global, so everything (params,
  running statistics, metrics) must match the single-device step.
* ``pmap``: ``jax.pmap`` with ``axis_name`` passed to ``sadt_update``, 2 examples per device,
  on the MLP (no BatchNorm). Per-device BatchNorm statistics are *not* the global ones, so
  the BN CNN is not comparable this way; for it ``pmap_bn_replicated`` feeds every device
  the whole batch, where the per-device statistics equal the global ones and the pmean'd
  gradients, statistics and metrics must again equal the single-device step.

Per-device randomness (every method on an MLP with dropout; SADT-T1 and T2 also on a CNN
with BatchNorm *and* dropout):

* ``pmap_vs_sharded``: the ``pmap`` step (2 examples per device) equals
  ``sadt_update_sharded(..., num_shards=8)`` under ``jit`` on the same global batch, which
  draws each shard's dropout masks from the keys device ``i`` uses;
* ``pmap_dropout_replicated``: every device fed the whole batch no longer equals the
  single-device step (each device draws its own mask), the replicas still agree, and the
  step's dropout keys differ per device while its noise key does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TOL = 1e-5

_WORKER = textwrap.dedent(
    """
    import functools, json
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import sadt_jax

    assert jax.device_count() == 8, jax.devices()
    NDEV, BATCH, NUM_CLASSES = 8, 16, 4

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = jnp.tanh(nn.Dense(16, name="hidden")(x.reshape((x.shape[0], -1))))
            return nn.Dense(NUM_CLASSES, name="head")(x)

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.Conv(4, (3, 3), use_bias=False, name="conv1")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(x)
            x = nn.relu(nn.Conv(4, (3, 3), name="conv2")(nn.relu(x)))
            return nn.Dense(NUM_CLASSES, name="head")(x.mean(axis=(1, 2)))

    def setup(model, shape, method):
        kx, ky, ki = jax.random.split(jax.random.PRNGKey(0), 3)
        batch = {
            "image": jax.random.normal(kx, shape),
            "label": jax.random.randint(ky, (shape[0],), 0, NUM_CLASSES),
        }
        variables = model.init(ki, batch["image"], train=False)
        tx = sadt_jax.make_optimizer(method, learning_rate=1e-2)
        state = sadt_jax.TrainState.create(
            apply_fn=model.apply, variables=variables, tx=tx, key=jax.random.PRNGKey(5))
        return state, batch

    class DropMLP(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = jnp.tanh(nn.Dense(16, name="hidden")(x.reshape((x.shape[0], -1))))
            x = nn.Dropout(0.3, deterministic=not train)(x)
            return nn.Dense(NUM_CLASSES, name="head")(x)

    class DropCNN(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.Conv(4, (3, 3), use_bias=False, name="conv1")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(x)
            x = nn.relu(nn.Conv(4, (3, 3), name="conv2")(nn.relu(x)))
            x = nn.Dropout(0.3, deterministic=not train)(x.mean(axis=(1, 2)))
            return nn.Dense(NUM_CLASSES, name="head")(x)

    CONFIGS = {
        "sadt_t1": sadt_jax.method_config("sadt_t1", rho=0.5, noise_std=0.1),
        "sam": sadt_jax.method_config("sam"),
    }

    def diff(a, b):
        la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
        assert len(la) == len(lb) > 0
        return max(float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y))))
                   for x, y in zip(la, lb))

    def compare(one, other):
        (s1, m1), (s2, m2) = one, other
        return {
            "params": diff(s1.params, s2.params),
            "model_state": diff(s1.model_state, s2.model_state) if s1.model_state else 0.0,
            "metrics": diff(m1, m2),
            "moved": diff(s1.params, s0.params),
        }

    unstack = lambda tree: jax.tree.map(lambda x: x[0], tree)
    replicate = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * NDEV), tree)
    out = {}
    mesh = Mesh(np.array(jax.devices()), ("data",))
    for method, cfg in CONFIGS.items():
        # jit + sharded batch, BN CNN.
        s0, batch = setup(CNN(), (BATCH, 6, 6, 2), method)
        step = jax.jit(functools.partial(sadt_jax.sadt_update, config=cfg))
        single = step(s0, batch)
        sharded_batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
        assert len(sharded_batch["image"].addressable_shards) == NDEV
        assert sharded_batch["image"].addressable_shards[0].data.shape[0] == BATCH // NDEV
        sharded = step(jax.device_put(s0, NamedSharding(mesh, P())), sharded_batch)
        out[f"mesh/{method}"] = compare(single, sharded)

        # pmap with axis_name, per-device batches, MLP.
        pstep = jax.pmap(
            functools.partial(sadt_jax.sadt_update, config=cfg, axis_name="batch"),
            axis_name="batch",
        )
        s0, batch = setup(MLP(), (BATCH, 5), method)
        single = jax.jit(functools.partial(sadt_jax.sadt_update, config=cfg))(s0, batch)
        per_device = jax.tree.map(lambda x: x.reshape((NDEV, -1) + x.shape[1:]), batch)
        s8, m8 = pstep(replicate(s0), per_device)
        out[f"pmap/{method}"] = compare(single, (unstack(s8), unstack(m8)))
        # Every replica holds the same parameters after the step.
        out[f"pmap/{method}"]["replicas"] = diff(
            jax.tree.map(lambda x: x[1:], s8.params), jax.tree.map(lambda x: x[:-1], s8.params)
        )

        # pmap, BN CNN, every device sees the whole batch.
        s0, batch = setup(CNN(), (BATCH // 4, 6, 6, 2), method)
        single = jax.jit(functools.partial(sadt_jax.sadt_update, config=cfg))(s0, batch)
        s8, m8 = pstep(replicate(s0), replicate(batch))
        out[f"pmap_bn_replicated/{method}"] = compare(single, (unstack(s8), unstack(m8)))

    # Per-device randomness: every method on an MLP with dropout, two on a CNN with
    # BatchNorm and dropout (per-device BatchNorm statistics, reproduced per shard).
    CASES = [(m, DropMLP(), (BATCH, 5), ("head/bias", "hidden/bias")) for m in sadt_jax.METHODS]
    CASES += [(m + "/bn", DropCNN(), (BATCH, 6, 6, 2), ("head/bias", "conv2/bias"))
              for m in ("sadt_t1", "sadt_t2")]
    for name, model, shape, t2_paths in CASES:
        method = name.split("/")[0]
        cfg = sadt_jax.method_config(method, t2_paths=t2_paths)
        if method.startswith("sadt_t1"):
            cfg = sadt_jax.method_config(method, rho=0.5, noise_std=0.1)
        s0, batch = setup(model, shape, method)
        if cfg.uses_ema:
            s0 = s0.replace(teacher_state=s0.params)
        pstep = jax.pmap(
            functools.partial(sadt_jax.sadt_update, config=cfg, axis_name="batch"),
            axis_name="batch",
        )
        per_device = jax.tree.map(lambda x: x.reshape((NDEV, -1) + x.shape[1:]), batch)
        s8, m8 = pstep(replicate(s0), per_device)
        emulated = jax.jit(
            functools.partial(sadt_jax.sadt_update_sharded, config=cfg, num_shards=NDEV)
        )(s0, batch)
        out[f"pmap_vs_sharded/{name}"] = compare(emulated, (unstack(s8), unstack(m8)))
        if name in CONFIGS:
            single = jax.jit(functools.partial(sadt_jax.sadt_update, config=cfg))(s0, batch)
            s8, m8 = pstep(replicate(s0), replicate(batch))
            res = compare(single, (unstack(s8), unstack(m8)))
            res["replicas"] = diff(
                jax.tree.map(lambda x: x[1:], s8.params), jax.tree.map(lambda x: x[:-1], s8.params)
            )
            out[f"pmap_dropout_replicated/{name}"] = res

    keys = jax.pmap(
        lambda i: jnp.stack(
            [jax.random.key_data(k) for k in sadt_jax.step_keys(jax.random.PRNGKey(0), 3, "batch")]
        ),
        axis_name="batch",
    )(jnp.arange(NDEV))
    keys = np.asarray(keys)
    out["keys"] = {
        "distinct_clean": len({tuple(k[0]) for k in keys}),
        "distinct_teacher": len({tuple(k[1]) for k in keys}),
        "distinct_noise": len({tuple(k[2]) for k in keys}),
    }
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def parallel_results():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    # 8 host devices; optimization level 0 roughly halves XLA's CPU compile time (both sides
    # of every comparison are compiled the same way).
    flags = " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + flags).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


METHODS = ("base", "gc", "agc", "sam", "sadt_t1", "sadt_t2", "sadt_t3", "base_2x")
METHODS += ("sadt_t1_1u", "sadt_ema", "rdrop", "sadt_t1/bn", "sadt_t2/bn")


@pytest.mark.parametrize("method", METHODS)
def test_pmap_equals_jit_with_the_same_per_shard_randomness(parallel_results, method):
    res = parallel_results[f"pmap_vs_sharded/{method}"]
    assert res["moved"] > 1e-3, res
    for key in ("params", "model_state", "metrics"):
        assert res[key] <= TOL, (key, res)


@pytest.mark.parametrize("method", ["sadt_t1", "sam"])
def test_pmap_devices_draw_their_own_dropout_masks(parallel_results, method):
    res = parallel_results[f"pmap_dropout_replicated/{method}"]
    assert res["params"] > 1e-4, res  # not the single-device step's one mask
    assert res["replicas"] == 0.0, res  # yet every replica holds the same parameters
    assert parallel_results["keys"] == {
        "distinct_clean": 8,
        "distinct_teacher": 8,
        "distinct_noise": 1,
    }


@pytest.mark.parametrize("mode", ["mesh", "pmap", "pmap_bn_replicated"])
@pytest.mark.parametrize("method", ["sadt_t1", "sam"])
def test_one_vs_eight_devices(parallel_results, mode, method):
    res = parallel_results[f"{mode}/{method}"]
    assert res["moved"] > 1e-3, res  # the step did something: the comparison is not vacuous
    for key in ("params", "model_state", "metrics", "replicas"):
        assert res.get(key, 0.0) <= TOL, (key, res)
