"""Shared test fixtures: tiny flax models (with and without dropout / BatchNorm) and batches.

The whole test session, subprocesses included (they inherit the environment), shares one
persistent XLA compilation cache in a fresh temporary folder: many tests compile the same
training step again (every ``train_and_evaluate`` call builds new jitted functions), and on
2 cores compiling was about a third of the suite's time. The cache starts empty, so every
program is still compiled and run once; a cache hit runs the identical executable.
"""

from __future__ import annotations

import os
import shutil
import tempfile

# Made once, by the process that starts the session; pytest-xdist's workers inherit it.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ.update(
        JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(prefix="sadt_jax_tests_xla_cache_"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )

import flax.linen as nn  # noqa: E402  (after the cache settings, which jax reads at import)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

import sadt_jax  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):  # not an xdist worker
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


NUM_CLASSES = 4


class MLP(nn.Module):
    """Two dense layers, no dropout, no BatchNorm."""

    @nn.compact
    def __call__(self, x, train):
        x = jnp.tanh(nn.Dense(16, name="hidden")(x.reshape((x.shape[0], -1))))
        return nn.Dense(NUM_CLASSES, name="head")(x)


class CNN(nn.Module):
    """Conv, BatchNorm, conv, dense (no dropout)."""

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(4, (3, 3), use_bias=False, name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(x)
        x = nn.relu(nn.Conv(4, (3, 3), name="conv2")(nn.relu(x)))
        return nn.Dense(NUM_CLASSES, name="head")(x.mean(axis=(1, 2)))


class DropoutMLP(nn.Module):
    """Two dense layers with dropout between them (no BatchNorm)."""

    rate: float = 0.3

    @nn.compact
    def __call__(self, x, train):
        x = jnp.tanh(nn.Dense(16, name="hidden")(x.reshape((x.shape[0], -1))))
        x = nn.Dropout(self.rate, deterministic=not train)(x)
        return nn.Dense(NUM_CLASSES, name="head")(x)


class DropoutBNCNN(nn.Module):
    """Conv, BatchNorm, conv, dropout, dense: every model_state and RNG path of the step."""

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(4, (3, 3), use_bias=False, name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(x)
        x = nn.relu(nn.Conv(4, (3, 3), name="conv2")(nn.relu(x)))
        x = nn.Dropout(0.3, deterministic=not train)(x.mean(axis=(1, 2)))
        return nn.Dense(NUM_CLASSES, name="head")(x)


def make_batch(shape, seed=0):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    return {
        "image": jax.random.normal(kx, shape),
        "label": jax.random.randint(ky, (shape[0],), 0, NUM_CLASSES),
    }


def make_state(model, batch, tx, key=0, **create_kw):
    variables = model.init(jax.random.PRNGKey(1), batch["image"], train=False)
    return sadt_jax.TrainState.create(
        apply_fn=model.apply, variables=variables, tx=tx, key=jax.random.PRNGKey(key), **create_kw
    )


@pytest.fixture(scope="session")
def dropout_mlp_setup():
    """``(model, batch)``: a dropout MLP and a batch of 8 examples with 5 features."""
    return DropoutMLP(), make_batch((8, 5))


@pytest.fixture(scope="session")
def dropout_bn_cnn_setup():
    """``(model, batch)``: a dropout + BatchNorm CNN and a batch of 8 6x6x2 images."""
    return DropoutBNCNN(), make_batch((8, 6, 6, 2))
