"""Helpers shared by the tests that check our convolution layers against XLA's own ops."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def rand(shape, seed, dtype=jnp.float32):
    """Standard-normal values from NumPy (every eager ``jax.random`` op compiles a kernel)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def assert_close(actual, expected, rtol):
    """Max abs difference within ``rtol`` times the largest magnitude of ``expected``."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    err = float(np.max(np.abs(actual - expected)))
    assert err <= rtol * scale, f"max abs diff {err:.3e} > {rtol:.0e} * {scale:.3e}"
