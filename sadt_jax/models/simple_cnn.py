"""The SADT paper's simple CNN.

Fahim & Boutellier, "SADT: Combining Sharpness-Aware Minimization with
Self-Distillation for Improved Model Generalization" (arXiv 2211.00310) report
most of their results on a small CNN: three 3x3 conv-64 layers with max-pooling
and BatchNorm, then dense 512 -> 64 -> classes. This is that network, written so
that 28x28x1 (Fashion-MNIST) and 32x32x3 (CIFAR) inputs give the same flattened
size (4x4x64 = 1024): convolutions and pooling use 'SAME' padding.

Layout (default, ``release_layout=False``)::

    3 x [conv3x3-64 (+bias) -> ReLU -> BatchNorm -> maxpool 2x2]
    -> flatten -> dense1 512 -> ReLU -> dropout -> dense2 64 -> ReLU -> dropout -> head

``release_layout=True`` reproduces the Keras model of the authors' notebook
(``clsclb`` in github.com/DeepUVaasa/SADT) layer for layer, differences
included: 'VALID' convolutions, pooling after the first two convolutions only
and before BatchNorm, dropout on the flattened features, BatchNorm after each
hidden dense layer and an extra 10-unit ReLU dense layer (10 even for 100
classes) before the output layer::

    conv1 -> ReLU -> pool -> bn1 -> conv2 -> ReLU -> pool -> bn2 -> conv3 -> ReLU -> bn3
    -> flatten -> dropout -> dense1 512 -> ReLU -> dense1_bn -> dense2 64 -> ReLU
    -> dense2_bn -> dense3 10 -> ReLU -> head

The release used dropout 0.3; the default here is 0.0. The model returns
logits (the release ends in a softmax and then applies a cross-entropy "from
logits" to it: a double softmax, not reproduced).

Parameter count at 10 classes: 634,314 on 32x32x3 and 633,162 on 28x28x1
(default layout); 635,576 on 32x32x3 and 405,048 on 28x28x1 with
``release_layout=True``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from sadt_jax.models import _layers
from sadt_jax.models._layers import Dtype

#: (output-layer bias, salient tensor) for T2 teachers. The salient tensor is the
#: second convolution's bias, index 7 of ``model.get_weights()`` in the release.
T2_TEACHER_PATHS = ("head/bias", "conv2/bias")


class SimpleCNN(nn.Module):
    """The paper's simple CNN (see the module docstring for the layout).

    Attributes:
      num_classes: number of output logits.
      dropout_rate: dropout rate (between the dense layers; on the flattened
        features with ``release_layout``). The release used 0.3.
      release_layout: reproduce the authors' Keras model exactly.
      dtype: computation dtype; parameters are float32.
      bn_axis_name: optional ``pmap`` axis for BatchNorm statistics.
      conv_impl: convolution implementation: ``'auto'`` (default: ``'matmul'`` on
        CPU, ``'xla'`` elsewhere), ``'xla'`` or ``'matmul'`` (see ``_layers.conv``).
      pool: ``'max'`` (the paper's 2x2 max-pooling) or ``'avg'`` (2x2 average pooling:
        smooth, so results do not hinge on near-ties between pooled values — used where two
        mathematically equal computations are compared, e.g. 1 vs 8 devices).
      pool_impl: max-pooling implementation: ``'auto'`` (default: ``'reshape'`` on
        CPU, ``'xla'`` elsewhere), ``'xla'`` or ``'reshape'`` (see
        ``_layers.max_pool_2x2``).
    """

    num_classes: int
    dropout_rate: float = 0.0
    release_layout: bool = False
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    conv_impl: str = "auto"
    pool: str = "max"
    pool_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """Returns logits of shape ``(batch, num_classes)``.

        Args:
          x: images, NHWC.
          train: batch statistics, running-average updates and dropout (using
            the 'dropout' rng) if True; running averages and no dropout if False.

        Returns:
          Logits in ``dtype``.
        """
        x = jnp.asarray(x, self.dtype)
        if self.release_layout:
            return self._release(x, train)

        def bn(name):
            return _layers.batch_norm(
                train, dtype=self.dtype, axis_name=self.bn_axis_name, name=name
            )

        for i in (1, 2, 3):
            x = _layers.conv(
                64, 3, use_bias=True, dtype=self.dtype, impl=self.conv_impl, name=f"conv{i}"
            )(x)
            x = bn(f"bn{i}")(nn.relu(x))
            x = self._pool(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(_layers.dense(512, dtype=self.dtype, name="dense1")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.relu(_layers.dense(64, dtype=self.dtype, name="dense2")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return _layers.dense(self.num_classes, dtype=self.dtype, name="head")(x)

    def _pool(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.pool == "avg":
            return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        if self.pool != "max":
            raise ValueError(f"pool must be 'max' or 'avg', got {self.pool!r}")
        return _layers.max_pool_2x2(x, self.pool_impl)

    def _release(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        def bn(name):
            return _layers.batch_norm(
                train, dtype=self.dtype, axis_name=self.bn_axis_name, name=name
            )

        def conv(name):
            return _layers.conv(
                64,
                3,
                padding="VALID",
                use_bias=True,
                dtype=self.dtype,
                impl=self.conv_impl,
                name=name,
            )

        def pool(y):
            return _layers.max_pool_2x2(y, self.pool_impl, padding="VALID")

        x = bn("bn1")(pool(nn.relu(conv("conv1")(x))))
        x = bn("bn2")(pool(nn.relu(conv("conv2")(x))))
        x = bn("bn3")(nn.relu(conv("conv3")(x)))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = bn("dense1_bn")(nn.relu(_layers.dense(512, dtype=self.dtype, name="dense1")(x)))
        x = bn("dense2_bn")(nn.relu(_layers.dense(64, dtype=self.dtype, name="dense2")(x)))
        x = nn.relu(_layers.dense(10, dtype=self.dtype, name="dense3")(x))
        return _layers.dense(self.num_classes, dtype=self.dtype, name="head")(x)
