"""The fields and the ``__call__`` preamble shared by every model and block.

:class:`LayerSettings` holds the settings every module passes down to its layers
(computation dtype, BatchNorm ``pmap`` axis, convolution implementation) and builds
those layers through :mod:`sadt_jax.models._layers`. :class:`Classifier` adds
``num_classes`` and the one ``__call__`` of every model: cast the images to
``dtype``, then run the subclass's ``_logits``.

The settings are keyword-only, so subclasses may declare required fields (e.g.
``ResNet``'s ``stage_sizes``) after ``num_classes``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sadt_jax.models import _layers
from sadt_jax.models._layers import Dtype


class LayerSettings(nn.Module):
    """Settings shared by every model and block, and layer builders that use them.

    Attributes:
      dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters are float32.
      bn_axis_name: optional ``pmap`` axis over which BatchNorm statistics are averaged.
      conv_impl: convolution implementation: ``'auto'`` (default: ``'gemm'`` on CPU,
        ``'xla'`` elsewhere), ``'xla'``, ``'matmul'`` or ``'gemm'`` (see ``_layers.conv``).
    """

    _: dataclasses.KW_ONLY
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    conv_impl: str = "auto"

    def _settings(self) -> dict[str, Any]:
        """The settings as keyword arguments, to hand down to a child block."""
        return dict(dtype=self.dtype, bn_axis_name=self.bn_axis_name, conv_impl=self.conv_impl)

    def _bn(self, train: bool, name: str) -> nn.BatchNorm:
        """BatchNorm with Keras' momentum and epsilon (see ``_layers.batch_norm``)."""
        return _layers.batch_norm(train, dtype=self.dtype, axis_name=self.bn_axis_name, name=name)

    def _conv(self, features: int, kernel_size: Any = 3, **kwargs: Any) -> nn.Conv:
        """A convolution in this module's dtype and implementation (see ``_layers.conv``)."""
        return _layers.conv(features, kernel_size, dtype=self.dtype, impl=self.conv_impl, **kwargs)

    def _dense(self, features: int, name: str, **kwargs: Any) -> nn.Dense:
        """A dense layer in this module's dtype (see ``_layers.dense``)."""
        return _layers.dense(features, dtype=self.dtype, name=name, **kwargs)

    def _dropout(self, rate: float, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """Dropout with the ``'dropout'`` rng, active only when ``train`` is True."""
        return nn.Dropout(rate, deterministic=not train)(x)


class Classifier(LayerSettings):
    """Base class of the image classifiers: ``__call__(x, train)`` returns logits.

    Subclasses implement ``_logits(x, train)`` on images already cast to ``dtype``;
    the submodules it creates belong to ``__call__``'s compact scope.

    Attributes:
      num_classes: number of output logits.
    """

    num_classes: int

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """Returns logits of shape ``(batch, num_classes)``.

        Args:
          x: images, NHWC.
          train: batch statistics, running-average updates and dropout (using the
            ``'dropout'`` rng) if True; running averages and no dropout if False.

        Returns:
          Logits in ``dtype``.
        """
        return self._logits(jnp.asarray(x, self.dtype), train)

    def _logits(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        raise NotImplementedError(f"{type(self).__name__} must implement _logits(x, train)")


class ConvBN(LayerSettings):
    """Convolution (no bias), BatchNorm and an optional ReLU.

    Parameter paths: ``<name>/conv/kernel``, ``<name>/bn/{scale,bias}``.

    Attributes:
      features: number of output channels.
      kernel_size: an int or a (height, width) pair.
      strides: spatial stride.
      relu: apply a ReLU after the BatchNorm.
    """

    features: int
    kernel_size: int | tuple[int, int] = 3
    strides: int = 1
    relu: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        x = self._conv(self.features, self.kernel_size, strides=self.strides, name="conv")(x)
        x = self._bn(train, "bn")(x)
        return nn.relu(x) if self.relu else x
