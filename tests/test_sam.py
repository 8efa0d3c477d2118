r"""Tests for ``sadt_jax.sam``: closed forms on a quadratic, equality with optax's SAM.

On :math:`L(\theta) = \tfrac12 \theta^\top A \theta` the gradient is :math:`A\theta`, so
every mode of ``sam`` has a closed form: bounded :math:`A(\theta + \rho A\theta/\|A\theta\|)`,
unbounded :math:`A(\theta + \rho A\theta)`, ``keep_grads`` adds :math:`A\theta`, ASAM
scales the direction by :math:`T^2 = (|\theta| + \eta)^2`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sadt_jax
from sadt_jax import losses

pytestmark = pytest.mark.accelerator  # run on the device by experiments/accelerator_check.py

DIM = 6


def _quadratic():
    m = jax.random.normal(jax.random.PRNGKey(0), (DIM, DIM))
    a = m @ m.T / DIM + jnp.eye(DIM)
    theta = jax.random.normal(jax.random.PRNGKey(1), (DIM,))
    return np.asarray(a, np.float64), {"w": theta}


def _run(tx, a, params, steps=1):
    """Applies ``tx.update`` ``steps`` times at fixed params; returns the last output."""
    a32 = jnp.asarray(a, jnp.float32)

    def grad_fn(p):
        return {"w": a32 @ p["w"]}

    state = tx.init(params)
    out = None
    for _ in range(steps):
        out, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
    return out, state


def _close(got, expected, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(got["w"], np.float64), expected, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_bounded_quadratic(rho):
    a, params = _quadratic()
    th = np.asarray(params["w"], np.float64)
    g = a @ th
    out, _ = _run(sadt_jax.sam(rho), a, params)
    _close(out, a @ (th + rho * g / np.linalg.norm(g)))


def test_unbounded_quadratic():
    a, params = _quadratic()
    th = np.asarray(params["w"], np.float64)
    rho = 0.1
    out, _ = _run(sadt_jax.sam(rho, normalize=False), a, params)
    _close(out, a @ (th + rho * a @ th))


@pytest.mark.parametrize("normalize", [True, False])
def test_keep_grads_quadratic(normalize):
    a, params = _quadratic()
    th = np.asarray(params["w"], np.float64)
    g = a @ th
    rho = 0.2
    d = g / np.linalg.norm(g) if normalize else g
    out, _ = _run(sadt_jax.sam(rho, normalize=normalize, keep_grads=True), a, params)
    _close(out, g + a @ (th + rho * d))


@pytest.mark.parametrize("normalize", [True, False])
def test_adaptive_quadratic(normalize):
    a, params = _quadratic()
    th = np.asarray(params["w"], np.float64)
    g = a @ th
    rho, eta = 0.3, 0.01
    t = np.abs(th) + eta
    d = t * t * g
    if normalize:
        d = d / np.linalg.norm(t * g)
    tx = sadt_jax.sam(rho, normalize=normalize, adaptive=True, adaptive_eta=eta)
    out, _ = _run(tx, a, params)
    _close(out, a @ (th + rho * d))


def test_rho_schedule_indexed_by_count():
    a, params = _quadratic()
    th = np.asarray(params["w"], np.float64)
    g = a @ th
    tx = sadt_jax.sam(lambda count: 0.1 * (count + 1), normalize=False)
    out, state = _run(tx, a, params, steps=2)
    _close(out, a @ (th + 0.2 * g))
    assert int(state.count) == 2


def test_zero_gradient_bounded_gives_no_nan():
    a, _ = _quadratic()
    params = {"w": jnp.zeros(DIM)}
    out, _ = _run(sadt_jax.sam(0.05), a, params)
    np.testing.assert_array_equal(out["w"], np.zeros(DIM))


# --------------------------------------------------------------------------- noise


def _noise_params():
    return {"W": jnp.zeros((128, 96)), "b": jnp.ones((96,))}


def _identity_grad(p):
    # The gradient of 1/2 ||p||^2: sam's output is then exactly params + eps.
    return p


def test_pure_noise_t3_statistics():
    sigma = 1e-4
    params = _noise_params()
    tx = sadt_jax.sam(0.0, normalize=False, noise_std=sigma, noise_mode="additive")
    out, _ = tx.update(params, tx.init(params), params, grad_fn=_identity_grad)
    xi = np.asarray(out["W"], np.float64) / sigma
    n = xi.size
    assert abs(xi.mean()) < 5 / np.sqrt(n)
    assert abs(xi.std() - 1.0) < 0.03
    # Rank-1 leaves get no noise (the release's mask) and rho = 0 adds no gradient term.
    np.testing.assert_array_equal(out["b"], params["b"])


def test_direction_noise_t1_statistics():
    # eps = rho (g + sigma xi): subtracting rho g leaves rho sigma xi on rank > 1 leaves.
    rho, sigma = 1e-3, 1e-1
    params = {"W": jnp.full((128, 96), 2.0), "b": jnp.ones((96,))}
    g = jax.tree.map(lambda x: 0.5 * x, params)
    tx = sadt_jax.sam(rho, normalize=False, noise_std=sigma)
    out, _ = tx.update(g, tx.init(params), params, grad_fn=_identity_grad)
    eps_w = np.asarray(out["W"], np.float64) - 2.0
    xi = (eps_w - rho * 1.0) / (rho * sigma)
    assert abs(xi.mean()) < 5 / np.sqrt(xi.size)
    assert abs(xi.std() - 1.0) < 0.03
    np.testing.assert_allclose(out["b"], 1.0 + rho * 0.5, rtol=1e-6)


def test_noise_mask_selects_leaves():
    params = _noise_params()
    mask = {"W": False, "b": True}
    for noise_mask in (mask, lambda p: mask):
        tx = sadt_jax.sam(0.0, noise_std=1.0, noise_mode="additive", noise_mask=noise_mask)
        out, _ = tx.update(params, tx.init(params), params, grad_fn=_identity_grad)
        np.testing.assert_array_equal(out["W"], params["W"])
        assert float(jnp.std(out["b"])) > 0.5


def test_noise_fresh_each_step_and_reproducible():
    params = _noise_params()
    tx = sadt_jax.sam(0.0, noise_std=1.0, noise_mode="additive", seed=3)
    s0 = tx.init(params)
    out0, s1 = tx.update(params, s0, params, grad_fn=_identity_grad)
    out1, _ = tx.update(params, s1, params, grad_fn=_identity_grad)
    again0, _ = tx.update(params, tx.init(params), params, grad_fn=_identity_grad)
    np.testing.assert_array_equal(out0["W"], again0["W"])
    assert not np.allclose(out0["W"], out1["W"])
    other = sadt_jax.sam(0.0, noise_std=1.0, noise_mode="additive", seed=4)
    out_other, _ = other.update(params, other.init(params), params, grad_fn=_identity_grad)
    assert not np.allclose(out0["W"], out_other["W"])


# --------------------------------------------------------------------------- API contract


def test_missing_grad_fn_raises_clear_error():
    a, params = _quadratic()
    tx = sadt_jax.sam(0.05)
    with pytest.raises(ValueError, match="grad_fn"):
        tx.update(params, tx.init(params), params)


def test_unknown_extra_args_ignored_in_chain():
    a, params = _quadratic()
    a32 = jnp.asarray(a, jnp.float32)

    def grad_fn(p):
        return {"w": a32 @ p["w"]}

    tx = optax.chain(sadt_jax.sam(0.05), optax.sgd(0.1))
    assert isinstance(sadt_jax.sam(0.05), optax.GradientTransformationExtraArgs)
    state = tx.init(params)
    g = grad_fn(params)
    u_extra, _ = tx.update(g, state, params, grad_fn=grad_fn, batch=None, step=3)
    u_plain, _ = tx.update(g, state, params, grad_fn=grad_fn)
    np.testing.assert_array_equal(u_extra["w"], u_plain["w"])


def test_grad_fn_called_exactly_once_and_no_recompilation():
    a, params = _quadratic()
    a32 = jnp.asarray(a, jnp.float32)
    calls = []

    def grad_fn(p):
        calls.append(1)  # runs at trace time only
        return {"w": a32 @ p["w"]}

    tx = optax.chain(sadt_jax.sam(0.05, noise_std=1e-4), optax.adam(1e-3))

    @jax.jit
    def step(params, state):
        updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    params, state = step(params, state)
    assert len(calls) == 2  # one clean gradient + exactly one call from sam
    params, state = step(params, state)
    assert len(calls) == 2
    assert step._cache_size() == 1


def test_rho_zero_equals_base_optimizer():
    key = jax.random.PRNGKey(5)
    params, loss = _mlp_problem(key)
    grad_fn = jax.grad(loss)
    for normalize in (True, False):
        tx = optax.chain(sadt_jax.sam(0.0, normalize=normalize), optax.adam(1e-2))
        base = optax.adam(1e-2)
        p1, s1 = params, tx.init(params)
        p2, s2 = params, base.init(params)
        for _ in range(3):
            u1, s1 = tx.update(grad_fn(p1), s1, p1, grad_fn=grad_fn)
            u2, s2 = base.update(grad_fn(p2), s2, p2)
            p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
        jax.tree.map(np.testing.assert_array_equal, p1, p2)


# --------------------------------------------------------------------------- vs optax SAM


def _mlp_problem(key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = {
        "dense1": {"kernel": jax.random.normal(k1, (5, 16)) / 2, "bias": jnp.zeros(16)},
        "dense2": {"kernel": jax.random.normal(k2, (16, 3)) / 4, "bias": jnp.zeros(3)},
    }
    x = jax.random.normal(k3, (12, 5))
    y = jax.random.randint(k4, (12,), 0, 3)

    def loss(p):
        h = jnp.tanh(x @ p["dense1"]["kernel"] + p["dense1"]["bias"])
        return losses.cross_entropy(h @ p["dense2"]["kernel"] + p["dense2"]["bias"], y)

    return params, loss


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_bounded_equals_optax_contrib_sam(rho):
    lr = 0.1
    params, loss = _mlp_problem(jax.random.PRNGKey(7))
    grad_fn = jax.grad(loss)
    ours = optax.chain(sadt_jax.sam(rho), optax.sgd(lr))
    ref = optax.contrib.sam(
        optax.sgd(lr),
        optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
        opaque_mode=True,
    )
    p1, s1 = params, ours.init(params)
    p2, s2 = params, ref.init(params)
    for _ in range(3):
        u1, s1 = ours.update(grad_fn(p1), s1, p1, grad_fn=grad_fn)
        u2, s2 = ref.update(grad_fn(p2), s2, p2, grad_fn=lambda p, i: grad_fn(p))
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    moved = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), p1, params)))
    assert moved > 1e-2  # the comparison is not vacuous
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), p1, p2)
    assert max(jax.tree.leaves(diff)) <= 1e-6, diff
