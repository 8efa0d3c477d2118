"""Tests of sadt_jax.sharpness against closed forms on quadratics and a tiny flax model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sadt_jax import sharpness

DIM = 7  # {"a": (3,), "b": (2, 2)} flattened.


def _quadratic(eigenvalues, seed=0):
    """A = Q diag(eigenvalues) Q^T and L(theta) = 1/2 theta^T A theta on a 2-leaf pytree."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    a = (q * np.asarray(eigenvalues, np.float64)) @ q.T
    params = {"a": jnp.asarray(rng.normal(size=3), jnp.float32)}
    params["b"] = jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)
    _, unravel = ravel_pytree(params)
    a32 = jnp.asarray(a, jnp.float32)

    def loss(p):
        flat, _ = ravel_pytree(p)
        return 0.5 * flat @ a32 @ flat

    del unravel
    return a, params, loss


def _exact_max_increase(a, theta, rho):
    """max_{|e| <= rho} g.e + 1/2 e^T A e for PSD A (trust-region subproblem), float64."""
    g = a @ theta
    lam, q = np.linalg.eigh(a)
    gq = q.T @ g
    lo, hi = lam[-1] + 1e-12, lam[-1] + np.linalg.norm(g) / rho + 1.0
    for _ in range(200):  # Bisection on the secular equation |e(mu)| = rho.
        mu = 0.5 * (lo + hi)
        if np.linalg.norm(gq / (mu - lam)) > rho:
            lo = mu
        else:
            hi = mu
    e = q @ (gq / (hi - lam))
    return g @ e + 0.5 * e @ a @ e


EIGS = [5.0, 2.0, 1.5, 1.0, 0.5, 0.25, 0.1]


def test_hvp_matches_matrix():
    a, params, loss = _quadratic(EIGS)
    v = jax.tree.map(jnp.ones_like, params)
    hv = sharpness.hessian_vector_product(loss, params, v)
    np.testing.assert_allclose(ravel_pytree(hv)[0], a @ np.ones(DIM), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_eigenvalue_quadratic(seed):
    a, params, loss = _quadratic(EIGS, seed=seed)
    lam, info = sharpness.hessian_top_eigenvalue(
        loss, params, key=jax.random.key(seed), num_iters=50, tol=1e-7
    )
    assert abs(float(lam) - max(EIGS)) < 1e-3
    assert 1 <= int(info["num_iters"]) <= 50
    assert float(info["residual"]) < 1e-2


def test_top_eigenvalue_early_stop_and_budget():
    _, params, loss = _quadratic(EIGS)
    lam, info = sharpness.hessian_top_eigenvalue(loss, params, key=jax.random.key(0), tol=1e-3)
    assert bool(info["converged"])
    assert int(info["num_iters"]) < 20
    assert abs(float(lam) - 5.0) < 1e-2
    _, info = sharpness.hessian_top_eigenvalue(
        loss, params, key=jax.random.key(0), num_iters=3, tol=0.0
    )
    assert int(info["num_iters"]) == 3


def test_top_eigenvalue_largest_magnitude_and_rayleigh_bounds():
    eigs = [-4.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05]
    _, params, loss = _quadratic(eigs)
    lam, _ = sharpness.hessian_top_eigenvalue(
        loss, params, key=jax.random.key(0), num_iters=100, tol=0.0
    )
    assert abs(float(lam) + 4.0) < 1e-3  # Power iteration finds the largest |eigenvalue|.
    lam1, _ = sharpness.hessian_top_eigenvalue(loss, params, key=jax.random.key(3), num_iters=1)
    assert min(eigs) - 1e-5 <= float(lam1) <= max(eigs) + 1e-5  # A Rayleigh quotient.


def test_top_eigenvalue_jit_and_validation():
    _, params, loss = _quadratic(EIGS)
    f = jax.jit(lambda p, k: sharpness.hessian_top_eigenvalue(loss, p, key=k, num_iters=40)[0])
    assert abs(float(f(params, jax.random.key(1))) - 5.0) < 1e-3
    with pytest.raises(ValueError, match="num_iters"):
        sharpness.hessian_top_eigenvalue(loss, params, key=jax.random.key(0), num_iters=0)


@pytest.mark.parametrize("rho", [0.01, 0.3, 2.0])
def test_worst_case_one_step_closed_form(rho):
    a, params, loss = _quadratic(EIGS)
    theta = np.asarray(ravel_pytree(params)[0], np.float64)
    g = a @ theta
    d = g / np.linalg.norm(g)
    # For a quadratic the first-order point gives exactly rho |g| + rho^2/2 d^T A d.
    expected = rho * np.linalg.norm(g) + 0.5 * rho**2 * d @ a @ d
    got = float(sharpness.worst_case_loss_increase(loss, params, rho=rho))
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    exact = _exact_max_increase(a, theta, rho)
    assert got <= exact * (1 + 1e-5)


@pytest.mark.parametrize("rho", [0.3, 2.0])
def test_worst_case_multi_step_bounded_and_monotone(rho):
    a, params, loss = _quadratic(EIGS)
    theta = np.asarray(ravel_pytree(params)[0], np.float64)
    exact = _exact_max_increase(a, theta, rho)
    estimates = [
        float(sharpness.worst_case_loss_increase(loss, params, rho=rho, num_steps=n))
        for n in (1, 2, 5, 50)
    ]
    assert all(e <= exact * (1 + 1e-5) for e in estimates)
    assert all(b >= a_ - 1e-6 for a_, b in zip(estimates, estimates[1:], strict=False))
    np.testing.assert_allclose(estimates[-1], exact, rtol=1e-3)


def test_worst_case_zero_radius_and_zero_gradient():
    _, params, loss = _quadratic(EIGS)
    assert float(sharpness.worst_case_loss_increase(loss, params, rho=0.0)) == 0.0
    zeros = jax.tree.map(jnp.zeros_like, params)
    inc = sharpness.worst_case_loss_increase(loss, zeros, rho=1.0, num_steps=3)
    assert np.isfinite(float(inc))
    with pytest.raises(ValueError, match="num_steps"):
        sharpness.worst_case_loss_increase(loss, params, rho=0.1, num_steps=0)


class _TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(4)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
        return nn.Dense(3)(x)


def _tiny_setup(soft=False):
    model = _TinyNet()
    kx, ky, ki = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (16, 5))
    y = jax.random.randint(ky, (16,), 0, 3)
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(ki, x)
    # Non-trivial running statistics, so eval mode differs from batch statistics.
    _, updates = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": ki})
    )(variables, x)
    others = {"batch_stats": updates["batch_stats"]}
    labels = jax.nn.one_hot(y, 3) if soft else y
    return model, variables["params"], others, {"image": x, "label": labels}


def test_tiny_flax_model():
    model, params, others, batch = _tiny_setup()
    loss = jax.jit(sharpness.model_loss_fn(model.apply, others, batch))
    # Eval mode: deterministic, and equal to a direct inference-mode call.
    logits = model.apply({"params": params, **others}, batch["image"], train=False)
    direct = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None], 1))
    np.testing.assert_allclose(float(loss(params)), float(direct), rtol=1e-6)
    # Soft one-hot labels give the same loss.
    _, _, _, soft_batch = _tiny_setup(soft=True)
    soft_loss = sharpness.model_loss_fn(model.apply, others, soft_batch)
    np.testing.assert_allclose(float(soft_loss(params)), float(loss(params)), rtol=1e-6)

    # Top eigenvalue against the dense Hessian.
    flat, unravel = ravel_pytree(params)
    hess = np.asarray(jax.jit(jax.hessian(lambda f: loss(unravel(f))))(flat), np.float64)
    eigs = np.linalg.eigvalsh(0.5 * (hess + hess.T))
    dominant = eigs[np.argmax(np.abs(eigs))]
    lam, _ = jax.jit(
        lambda p: sharpness.hessian_top_eigenvalue(
            loss, p, key=jax.random.key(1), num_iters=300, tol=1e-6
        )
    )(params)
    assert eigs[0] - 1e-4 <= float(lam) <= eigs[-1] + 1e-4
    np.testing.assert_allclose(float(lam), dominant, rtol=1e-2)

    worst = jax.jit(
        lambda p, n: sharpness.worst_case_loss_increase(loss, p, rho=0.05, num_steps=n),
        static_argnums=1,
    )
    one, many = float(worst(params, 1)), float(worst(params, 10))
    assert one > 0
    assert many >= one - 1e-6
    # The first-order estimate agrees with the increase at rho g / |g| computed by hand.
    g = jax.grad(loss)(params)
    gnorm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
    moved = jax.tree.map(lambda p, x: p + 0.05 * x / gnorm, params, g)
    np.testing.assert_allclose(one, float(loss(moved) - loss(params)), rtol=1e-4, atol=1e-7)
