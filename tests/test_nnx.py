"""flax.nnx models through ``sadt_jax.nnx.linen_style_apply``.

* The adapter is the model: its logits, gradients and BatchNorm statistics equal
  those of the nnx model called directly (eval and train mode, dropout included).
* An nnx CNN with BatchNorm and Dropout trains with ``sadt_update`` (SADT-T1, jitted):
  the loss falls on a fixed batch, the running statistics move, and each step
  draws a new dropout mask; it also trains with ``optax.chain(sadt_jax.sam(...), ...)``.
"""

from __future__ import annotations

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sadt_jax
from sadt_jax import losses
from sadt_jax.nnx import linen_style_apply, update_model


class TinyCNN(nnx.Module):
    """Conv -> BatchNorm -> ReLU -> mean-pool -> Dropout -> Linear(10)."""

    def __init__(self, *, dropout_rate: float = 0.5, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(dropout_rate, rngs=rngs)
        self.head = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        return self.head(self.drop(x.mean(axis=(1, 2))))


def _batch(n=16):
    images = jax.random.normal(jax.random.PRNGKey(0), (n, 8, 8, 1))
    labels = jnp.arange(n) % 10
    return {"image": images, "label": labels}


def _direct_dropout_keys(model, key):
    """The documented reseeding rule, applied to the nnx model by hand."""
    streams = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)]
    assert streams, "the model should own a dropout stream"
    for i, stream in enumerate(streams):
        stream.key.set_value(jax.random.fold_in(jax.random.wrap_key_data(key), i))
        stream.count.set_value(jnp.zeros_like(stream.count.get_value()))


def _grads_close(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_variables_are_linen_collections():
    _, variables = linen_style_apply(TinyCNN(rngs=nnx.Rngs(0)))
    assert sorted(variables) == ["batch_stats", "params"]
    assert sadt_jax.param_paths(variables["params"]) == [
        "bn/bias",
        "bn/scale",
        "conv/bias",
        "conv/kernel",
        "head/bias",
        "head/kernel",
    ]
    assert sorted(variables["batch_stats"]["bn"]) == ["mean", "var"]


def test_eval_logits_and_grads_equal_the_nnx_model():
    model = TinyCNN(rngs=nnx.Rngs(0))
    apply_fn, variables = linen_style_apply(model)
    batch = _batch()
    model.eval()
    np.testing.assert_allclose(
        apply_fn(variables, batch["image"], train=False), model(batch["image"]), rtol=1e-6
    )

    def direct_loss(m):
        return losses.cross_entropy(m(batch["image"]), batch["label"])

    def adapter_loss(params):
        logits = apply_fn({**variables, "params": params}, batch["image"], train=False)
        return losses.cross_entropy(logits, batch["label"])

    direct = nnx.to_pure_dict(nnx.grad(direct_loss)(model))
    _grads_close(jax.grad(adapter_loss)(variables["params"]), jax.tree.map(jnp.asarray, direct))


def test_train_logits_grads_and_batch_stats_equal_the_nnx_model():
    batch = _batch()
    key = jax.random.PRNGKey(7)
    apply_fn, variables = linen_style_apply(TinyCNN(rngs=nnx.Rngs(0)))
    direct_model = TinyCNN(rngs=nnx.Rngs(0))  # same init
    direct_model.train()
    _direct_dropout_keys(direct_model, key)

    def direct_loss(m):
        logits = m(batch["image"])
        return losses.cross_entropy(logits, batch["label"]), logits

    (_, direct_logits), direct_grads = nnx.value_and_grad(direct_loss, has_aux=True)(direct_model)

    def adapter_loss(params):
        logits, new_state = apply_fn(
            {**variables, "params": params},
            batch["image"],
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )
        return losses.cross_entropy(logits, batch["label"]), (logits, new_state)

    grads, (logits, new_state) = jax.grad(adapter_loss, has_aux=True)(variables["params"])
    np.testing.assert_allclose(logits, direct_logits, rtol=1e-6)
    _grads_close(grads, nnx.to_pure_dict(direct_grads))
    _grads_close(new_state["batch_stats"], nnx.to_pure_dict(nnx.state(direct_model, nnx.BatchStat)))
    # Dropout is really on: another key, other logits; and the stats moved.
    other = apply_fn(variables, batch["image"], train=True, rngs={"dropout": jax.random.PRNGKey(8)})
    assert float(jnp.max(jnp.abs(other - logits))) > 1e-3
    assert float(jnp.max(jnp.abs(new_state["batch_stats"]["bn"]["mean"]))) > 0


def test_apply_leaves_the_model_alone_and_update_model_writes_back():
    def snapshot(m):  # every variable, RNG keys as their raw data
        return [
            jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
            for x in jax.tree.leaves(nnx.state(m))
        ]

    model = TinyCNN(rngs=nnx.Rngs(0))
    before = snapshot(model)
    apply_fn, variables = linen_style_apply(model)
    _, new = apply_fn(
        variables,
        _batch()["image"],
        train=True,
        rngs={"dropout": jax.random.PRNGKey(1)},
        mutable=True,
    )
    for x, y in zip(snapshot(model), before, strict=True):
        np.testing.assert_array_equal(x, y)
    params = jax.tree.map(lambda p: p + 1.0, variables["params"])
    update_model(model, {"params": params, **new})
    model.eval()
    np.testing.assert_allclose(
        model(_batch()["image"]),
        apply_fn({"params": params, **new}, _batch()["image"], train=False),
        rtol=1e-6,
    )


def test_bad_uses_are_reported():
    apply_fn, variables = linen_style_apply(TinyCNN(rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="needs rngs"):
        apply_fn(variables, _batch()["image"], train=True)
    with pytest.raises(ValueError, match="must map 'params'"):
        linen_style_apply(TinyCNN(rngs=nnx.Rngs(0)), collections={"batch_stats": nnx.BatchStat})
    with pytest.raises(ValueError, match="belong to no collection"):
        linen_style_apply(TinyCNN(rngs=nnx.Rngs(0)), collections={"params": nnx.Param})


def _train(model, method, steps, **optimizer_kwargs):
    apply_fn, variables = linen_style_apply(model)
    state = sadt_jax.TrainState.create(
        apply_fn=apply_fn,
        variables=variables,
        tx=sadt_jax.make_optimizer(method, **optimizer_kwargs),
        key=jax.random.PRNGKey(3),
    )
    step = jax.jit(functools.partial(sadt_jax.sadt_update, config=sadt_jax.method_config(method)))
    history = []
    for _ in range(steps):
        state, metrics = step(state, _batch())
        history.append(float(metrics["ce"]))
    return state, history


def test_nnx_cnn_trains_with_sadt_update():
    model = TinyCNN(rngs=nnx.Rngs(0))
    _, variables = linen_style_apply(model)
    state, ce = _train(model, "sadt_t1", 6, learning_rate=1e-2, decay_rate=1.0)
    assert ce[-1] < ce[0] - 0.05, ce
    moved = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))),
        state.model_state["batch_stats"],
        variables["batch_stats"],
    )
    assert min(jax.tree.leaves(moved)) > 1e-3, moved
    assert all(np.isfinite(jax.tree.leaves(jax.tree.map(jnp.sum, state.params))))


def test_each_step_draws_a_new_dropout_mask():
    # With a zero learning rate the parameters never change and train-mode BatchNorm
    # uses batch statistics, so step-to-step changes of the clean loss are the masks'.
    frozen = {"optimizer": "sgd", "learning_rate": 0.0, "decay_rate": 1.0}
    _, with_dropout = _train(TinyCNN(rngs=nnx.Rngs(0)), "base", 3, **frozen)
    _, without = _train(TinyCNN(dropout_rate=0.0, rngs=nnx.Rngs(0)), "base", 3, **frozen)
    assert len(set(with_dropout)) == 3, with_dropout
    assert len(set(without)) == 1, without


def test_nnx_cnn_trains_with_the_sam_transformation():
    model = TinyCNN(rngs=nnx.Rngs(0))
    apply_fn, variables = linen_style_apply(model)
    batch = _batch()
    tx = optax.chain(sadt_jax.sam(0.05), optax.sgd(0.1))

    def loss(params, batch_stats, key):
        logits, new = apply_fn(
            {"params": params, "batch_stats": batch_stats},
            batch["image"],
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )
        return losses.cross_entropy(logits, batch["label"]), new["batch_stats"]

    @jax.jit
    def step(params, batch_stats, opt_state, key):
        k_clean, k_perturbed = jax.random.split(key)
        (ce, new_stats), grads = jax.value_and_grad(loss, has_aux=True)(
            params, batch_stats, k_clean
        )

        def grad_fn(p):
            return jax.grad(lambda q: loss(q, batch_stats, k_perturbed)[0])(p)

        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), new_stats, opt_state, ce

    params, stats, opt_state = (
        variables["params"],
        variables["batch_stats"],
        tx.init(variables["params"]),
    )
    history = []
    for i in range(6):
        params, stats, opt_state, ce = step(params, stats, opt_state, jax.random.PRNGKey(i))
        history.append(float(ce))
    assert history[-1] < history[0] - 0.05, history


def test_m_sharpness_vmaps_the_adapter():
    model = TinyCNN(rngs=nnx.Rngs(0))
    apply_fn, variables = linen_style_apply(model)
    state = sadt_jax.TrainState.create(
        apply_fn=apply_fn,
        variables=variables,
        tx=sadt_jax.make_optimizer("sadt_t1"),
        key=jax.random.PRNGKey(3),
    )
    config = sadt_jax.method_config("sadt_t1", m_sharpness=8)
    state, metrics = jax.jit(functools.partial(sadt_jax.sadt_update, config=config))(
        state, _batch()
    )
    assert np.isfinite(float(metrics["loss"])) and float(metrics["perturbation_norm"]) > 0


def test_docs_nnx_example_runs(capsys):
    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
    with open(os.path.join(docs, "nnx.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert blocks, "docs/nnx.md has no python block"
    namespace: dict = {}
    exec(compile("\n".join(blocks), "docs/nnx.md", "exec"), namespace)
    assert int(namespace["state"].step) == 3
    assert 0.0 <= float(namespace["accuracy"]) <= 1.0
    assert "sam ce" in capsys.readouterr().out
