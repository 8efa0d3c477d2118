"""The baselines' gradient transformations: GC per output unit and Keras' Adam.

* ``centralize_per_output_unit`` against the formula written out in plain jnp, against
  ``optax.centralize`` (which it must differ from on flax kernels), and on the real
  gradient of the project's simple CNN; the ``gc`` method must use it.
* ``keras_adam`` against a float64 numpy transcription of Keras' update (epsilon added
  before the bias correction) under the paper's continuous decay, and against
  ``optax.adam`` (which it must differ from).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import fashion_mnist
from sadt_jax import losses, models
from sadt_jax.algorithm.methods import make_optimizer
from sadt_jax.algorithm.transforms import (
    centralize_per_output_unit,
    keras_adam,
    scale_by_keras_adam,
)
from sadt_jax.train import ConfigError, validation


def _gc(grads):
    out, _ = centralize_per_output_unit().update(grads, optax.EmptyState())
    return out


def _reference_gc(g):
    """The release's GC, written out: mean over every axis but the last, for rank > 1."""
    if g.ndim <= 1:
        return g
    return g - jnp.mean(g, axis=tuple(range(g.ndim - 1)), keepdims=True)


# ---------------------------------------------------------------- GC per output unit


def test_gc_equals_the_formula_on_hwio_and_dense_kernels():
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    grads = {
        "conv": {"kernel": jax.random.normal(keys[0], (3, 3, 5, 7)) + 2.0, "bias": jnp.ones(7)},
        "dense": {"kernel": jax.random.normal(keys[1], (11, 4)) - 1.0, "bias": jnp.ones(4)},
        "bn": {"scale": jax.random.normal(keys[2], (7,))},
    }
    out = _gc(grads)
    flat_out = dict(jax.tree_util.tree_leaves_with_path(out))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        np.testing.assert_allclose(flat_out[path], _reference_gc(g), rtol=1e-6, atol=1e-6)
    # Rank <= 1 leaves pass through untouched (bit for bit).
    np.testing.assert_array_equal(out["conv"]["bias"], grads["conv"]["bias"])
    np.testing.assert_array_equal(out["bn"]["scale"], grads["bn"]["scale"])
    # Per output unit: the mean over (h, w, in) of every output channel is 0.
    np.testing.assert_allclose(out["conv"]["kernel"].mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(out["dense"]["kernel"].mean(axis=0), 0.0, atol=1e-6)


def test_gc_differs_from_optax_centralize_on_an_hwio_kernel():
    g = {"kernel": jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 8)) + jnp.arange(8.0)}
    ours = _gc(g)["kernel"]
    theirs, _ = optax.centralize().update(g, optax.EmptyState())
    assert float(jnp.max(jnp.abs(ours - theirs["kernel"]))) > 0.1
    # optax.centralize leaves a non-zero mean per output unit; ours does not.
    assert float(jnp.max(jnp.abs(theirs["kernel"].mean(axis=(0, 1, 2))))) > 0.1
    assert float(jnp.max(jnp.abs(ours.mean(axis=(0, 1, 2))))) < 1e-6


@pytest.fixture(scope="module")
def cnn_gradient():
    """``(params, grads)`` of the project's simple CNN on a random 28x28x1 batch."""
    model = models.get_model("simple_cnn", 10)
    images = jax.random.normal(jax.random.PRNGKey(2), (8, 28, 28, 1))
    labels = jnp.arange(8) % 10
    variables = model.init(jax.random.PRNGKey(3), images, train=False)

    def loss(params):
        logits, _ = model.apply(
            {**variables, "params": params},
            images,
            train=True,
            rngs={"dropout": jax.random.PRNGKey(4)},
            mutable=["batch_stats"],
        )
        return losses.cross_entropy(logits, labels)

    return variables["params"], jax.jit(jax.grad(loss))(variables["params"])


def _worst_output_unit_mean(x):
    return float(jnp.max(jnp.abs(jnp.mean(x, axis=tuple(range(x.ndim - 1))))))


def test_gc_centralizes_the_real_cnn_gradient_per_output_unit(cnn_gradient):
    _, grads = cnn_gradient
    centred = _gc(grads)
    pairs = [
        (g, c)
        for g, c in zip(jax.tree.leaves(grads), jax.tree.leaves(centred), strict=True)
        if g.ndim > 1
    ]
    assert len(pairs) >= 4  # convolutions and dense layers
    before = max(_worst_output_unit_mean(g) for g, _ in pairs)
    after = max(_worst_output_unit_mean(c) for _, c in pairs)
    assert before > 1e-4, before  # the raw gradient is not centred already
    assert after < 1e-6, after


def test_gc_method_uses_the_per_output_unit_transform(cnn_gradient):
    params, grads = cnn_gradient
    tx = make_optimizer("gc")
    got, _ = tx.update(grads, tx.init(params), params)
    reference = optax.chain(
        centralize_per_output_unit(), optax.adam(optax.exponential_decay(1e-4, 1000, 0.9), eps=1e-7)
    )
    want, _ = reference.update(grads, reference.init(params), params)
    old = optax.chain(optax.centralize(), optax.adam(1e-4, eps=1e-7))
    old_updates, _ = old.update(grads, old.init(params), params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)
    diffs = [
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(old_updates), strict=True)
        if a.ndim > 1
    ]
    assert max(diffs) > 1e-6, diffs


# ---------------------------------------------------------------- Keras' Adam


def _paper_schedule(k):
    return 1e-4 * 0.9 ** (k / 1000.0)


def _keras_adam_reference(theta0, grads, b1=0.9, b2=0.999, eps=1e-7):
    """Keras' Adam in float64, as its documentation and source write it; the updates."""
    theta = np.asarray(theta0, np.float64)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    updates = []
    for k, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        t = k + 1
        lr_t = _paper_schedule(k) * np.sqrt(1 - b2**t) / (1 - b1**t)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        update = -lr_t * m / (np.sqrt(v) + eps)
        theta = theta + update
        updates.append(update)
    return updates


def _gradients(steps=5):
    """Gradients spanning 1e-8 .. 1 in magnitude, so the epsilon placement matters."""
    key = jax.random.PRNGKey(5)
    scales = jnp.logspace(-8, 0, 9)
    return [
        np.asarray(jax.random.normal(jax.random.fold_in(key, k), (9,)) * scales, np.float32)
        for k in range(steps)
    ]


def _run(tx, theta0, grads):
    """The per-step parameter updates of ``tx`` along the gradient sequence."""
    params = jnp.asarray(theta0)
    state = tx.init(params)
    out = []
    for g in grads:
        updates, state = tx.update(jnp.asarray(g), state, params)
        params = optax.apply_updates(params, updates)
        out.append(np.asarray(updates, np.float64))
    return out


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: keras_adam(optax.exponential_decay(1e-4, 1000, 0.9)),
        lambda: make_optimizer("base", adam_eps_placement="keras"),
    ],
    ids=["keras_adam", "make_optimizer"],
)
def test_keras_adam_matches_the_keras_formula(make_tx):
    theta0 = np.linspace(-1.0, 1.0, 9).astype(np.float32)
    grads = _gradients()
    want = _keras_adam_reference(theta0, grads)
    got = _run(make_tx(), theta0, grads)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        # float32 rounds 1 - 0.999**t to ~3e-5 relative at small t (Keras computes in float32
        # too); the epsilon placement changes small-gradient updates by up to 4x.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-12, err_msg=f"step {step + 1}")


def test_keras_adam_differs_from_optax_adam_at_step_one():
    theta0 = np.zeros(9, np.float32)
    grads = _gradients(1)
    keras = _run(keras_adam(1e-4), theta0, grads)[0]
    optax_adam = _run(optax.adam(1e-4, eps=1e-7), theta0, grads)[0]
    # Step 1: Keras' effective epsilon is 1e-7 / sqrt(1 - 0.999) = 3.2e-6, optax's 1e-7.
    g = grads[0].astype(np.float64)
    np.testing.assert_allclose(keras, -1e-4 * g / (np.abs(g) + 1e-7 / np.sqrt(1e-3)), rtol=1e-4)
    np.testing.assert_allclose(optax_adam, -1e-4 * g / (np.abs(g) + 1e-7), rtol=1e-4)
    small = np.abs(g) < 1e-5
    assert small.any()
    assert np.all(np.abs(keras[small]) < 0.8 * np.abs(optax_adam[small]))
    # Where |g| >> epsilon both are sign-like: -lr * sign(g).
    np.testing.assert_allclose(keras[-1], optax_adam[-1], rtol=1e-4)


def test_scale_by_keras_adam_state_is_optax_adam_state():
    params = {"w": jnp.ones(3)}
    ours = scale_by_keras_adam().init(params)
    theirs = optax.scale_by_adam().init(params)
    assert type(ours) is type(theirs)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)


def test_make_optimizer_default_is_unchanged_optax_adam():
    theta0 = np.linspace(-1.0, 1.0, 9).astype(np.float32)
    grads = _gradients()
    default = _run(make_optimizer("base"), theta0, grads)
    plain = _run(optax.adam(optax.exponential_decay(1e-4, 1000, 0.9), eps=1e-7), theta0, grads)
    for a, b in zip(default, plain, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_adam_eps_placement_is_rejected():
    with pytest.raises(ValueError, match="adam_eps_placement 'tf'.*optax, keras"):
        make_optimizer("base", adam_eps_placement="tf")
    config = fashion_mnist.get_config("base")
    assert config.optim.adam_eps_placement == "optax"
    config.optim.adam_eps_placement = "tf"
    with pytest.raises(ConfigError, match="optim.adam_eps_placement='tf' is not valid"):
        validation.validate_config(config)
