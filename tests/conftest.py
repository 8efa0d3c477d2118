"""Shared test fixtures: tiny flax models (with and without dropout / BatchNorm) and batches."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import sadt_jax

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
