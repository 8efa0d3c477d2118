"""Building blocks shared by the model zoo.

Every model in :mod:`sadt_jax.models` builds its layers through these helpers so
that initialisers, dtypes and BatchNorm settings are the same everywhere:

* convolution kernels use He-normal initialisation (truncated normal, fan-in,
  scale 2: Keras' ``he_normal``, as in the authors' release), dense kernels use
  Glorot-uniform (Keras' ``Dense`` default), biases start at zero;
* parameters are always stored in float32 (``param_dtype``); ``dtype`` only sets
  the computation dtype (e.g. ``jnp.bfloat16``);
* BatchNorm uses Keras' defaults as in the release (``momentum=0.99``,
  ``epsilon=1e-3``), batch statistics in training mode and the running averages
  (collection ``batch_stats``) otherwise.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

#: Keras ``he_normal``: truncated normal, variance 2 / fan_in.
conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
#: Keras ``glorot_uniform`` (the ``Dense`` default).
dense_init = nn.initializers.glorot_uniform()

#: BatchNorm momentum and epsilon: Keras' defaults, as in the authors' release.
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3


def batch_norm(
    train: bool,
    *,
    dtype: Dtype,
    axis_name: str | None = None,
    name: str | None = None,
    scale_init: nn.initializers.Initializer = nn.initializers.ones,
) -> nn.BatchNorm:
    """Returns the BatchNorm layer used by every model.

    Args:
      train: if True, normalise with batch statistics and update the running
        averages in ``batch_stats``; if False, use the running averages.
      dtype: computation dtype (parameters stay float32).
      axis_name: optional ``pmap`` axis over which batch statistics are averaged.
      name: submodule name (the key in ``params`` and ``batch_stats``).
      scale_init: initialiser of the scale (gamma).

    Returns:
      An ``nn.BatchNorm`` with momentum 0.99 and epsilon 1e-3.
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
        axis_name=axis_name,
        scale_init=scale_init,
        name=name,
    )


def conv(
    features: int,
    kernel_size: int | tuple[int, int] = 3,
    *,
    strides: int = 1,
    use_bias: bool = False,
    dtype: Dtype,
    name: str | None = None,
) -> nn.Conv:
    """Returns a 'SAME'-padded 2D convolution with He-normal kernels.

    Args:
      features: number of output channels.
      kernel_size: an int (square kernel) or a (height, width) pair.
      strides: spatial stride.
      use_bias: whether to add a bias (off by default: most convolutions are
        followed by BatchNorm, which makes a bias redundant).
      dtype: computation dtype (parameters stay float32).
      name: submodule name.

    Returns:
      An ``nn.Conv``.
    """
    if isinstance(kernel_size, int):
        kernel_size = (kernel_size, kernel_size)
    return nn.Conv(
        features,
        kernel_size,
        strides=strides,
        padding="SAME",
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_init,
        name=name,
    )


def dense(features: int, *, dtype: Dtype, name: str | None = None) -> nn.Dense:
    """Returns a dense layer with Glorot-uniform kernels and a zero bias.

    Args:
      features: number of outputs.
      dtype: computation dtype (parameters stay float32).
      name: submodule name.

    Returns:
      An ``nn.Dense``.
    """
    return nn.Dense(
        features, dtype=dtype, param_dtype=jnp.float32, kernel_init=dense_init, name=name
    )


class ConvBN(nn.Module):
    """Convolution (no bias), BatchNorm and an optional ReLU.

    Parameter paths: ``<name>/conv/kernel``, ``<name>/bn/{scale,bias}``.

    Attributes:
      features: number of output channels.
      kernel_size: an int or a (height, width) pair.
      strides: spatial stride.
      relu: apply a ReLU after the BatchNorm.
      dtype: computation dtype.
      bn_axis_name: optional ``pmap`` axis for BatchNorm statistics.
    """

    features: int
    kernel_size: int | tuple[int, int] = 3
    strides: int = 1
    relu: bool = True
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        x = conv(
            self.features, self.kernel_size, strides=self.strides, dtype=self.dtype, name="conv"
        )(x)
        x = batch_norm(train, dtype=self.dtype, axis_name=self.bn_axis_name, name="bn")(x)
        return nn.relu(x) if self.relu else x


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
    """2x2 max-pooling with stride 2 and 'SAME' padding (odd sizes round up)."""
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


def global_avg_pool(x: jnp.ndarray) -> jnp.ndarray:
    """Mean over the spatial axes of an NHWC tensor."""
    return jnp.mean(x, axis=(1, 2))
