"""A narrow VGG16 with BatchNorm for 32x32 images.

VGG16 (Simonyan & Zisserman, arXiv 1409.1556) with BatchNorm (Ioffe & Szegedy,
arXiv 1502.03167) after every convolution, at the reduced widths 32-64-128-256-256
used by the SADT paper (Fahim & Boutellier, arXiv 2211.00310) and its release
(``VGG16_BN`` in github.com/DeepUVaasa/SADT)::

    block1: 2 x conv-32   -> maxpool      block4: 3 x conv-256 -> maxpool
    block2: 2 x conv-64   -> maxpool      block5: 3 x conv-256 -> maxpool
    block3: 3 x conv-128  -> maxpool
    -> global average pool -> dense1 512 -> BN -> ReLU -> dropout
    -> dense2 512 -> BN -> ReLU -> dropout -> head

Each conv is 3x3, 'SAME', followed by BatchNorm, ReLU and (optionally) dropout.
Pooling uses 'SAME' padding, so 28x28 inputs also work. Differences from the
release: the convolutions have no bias (it is redundant before BatchNorm), and
the release's extra ``Dense(classes, relu)`` layer before the output is left out.
The release used ``conv_dropout_rate=0.1`` and ``dropout_rate=0.3``; both
default to 0.0 here.

Parameter count: 4,083,690 at 10 classes.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from sadt_jax.models import _layers
from sadt_jax.models._layers import Dtype

#: Convolution widths per block, VGG16 pattern (2, 2, 3, 3, 3 convolutions).
VGG16_BLOCKS = ((32, 32), (64, 64), (128, 128, 128), (256, 256, 256), (256, 256, 256))

#: (output-layer bias, salient tensor) for T2 teachers. The release's salient
#: index for VGG16-BN (53 in ``model.get_weights()``) falls on the BatchNorm of
#: block 4's second convolution (its moving variance, which has no effect in
#: training mode); its trainable shift, ``block4_bn2/bias``, is the analogue.
T2_TEACHER_PATHS = ("head/bias", "block4_bn2/bias")


class VGG16BN(nn.Module):
    """Narrow VGG16 with BatchNorm (see the module docstring for the layout).

    Attributes:
      num_classes: number of output logits.
      dropout_rate: dropout after each hidden dense layer (release: 0.3).
      conv_dropout_rate: dropout after each conv block unit (release: 0.1).
      dtype: computation dtype; parameters are float32.
      bn_axis_name: optional ``pmap`` axis for BatchNorm statistics.
      conv_impl: convolution implementation: ``'auto'`` (default: ``'matmul'`` on
        CPU, ``'xla'`` elsewhere), ``'xla'`` or ``'matmul'`` (see ``_layers.conv``).
      pool_impl: max-pooling implementation: ``'auto'`` (default: ``'reshape'`` on
        CPU, ``'xla'`` elsewhere), ``'xla'`` or ``'reshape'`` (see
        ``_layers.max_pool_2x2``).
    """

    num_classes: int
    dropout_rate: float = 0.0
    conv_dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    conv_impl: str = "auto"
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

        def bn(name):
            return _layers.batch_norm(
                train, dtype=self.dtype, axis_name=self.bn_axis_name, name=name
            )

        x = jnp.asarray(x, self.dtype)
        for b, widths in enumerate(VGG16_BLOCKS, start=1):
            for i, width in enumerate(widths, start=1):
                x = _layers.conv(
                    width, 3, dtype=self.dtype, impl=self.conv_impl, name=f"block{b}_conv{i}"
                )(x)
                x = nn.relu(bn(f"block{b}_bn{i}")(x))
                x = nn.Dropout(self.conv_dropout_rate, deterministic=not train)(x)
            x = _layers.max_pool_2x2(x, self.pool_impl)
        x = _layers.global_avg_pool(x)
        for i in (1, 2):
            x = _layers.dense(512, dtype=self.dtype, name=f"dense{i}")(x)
            x = nn.relu(bn(f"dense{i}_bn")(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return _layers.dense(self.num_classes, dtype=self.dtype, name="head")(x)
