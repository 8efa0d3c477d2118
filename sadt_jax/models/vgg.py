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
release (``release_vgg16_bn`` in :func:`sadt_jax.models.get_model` is the release's
network): the convolutions have no bias (it is redundant before BatchNorm), the
hidden dense layers are Glorot- rather than He-initialised, and the release's extra
``Dense(classes, relu)`` layer before the output is left out. The release used
``conv_dropout_rate=0.1`` and ``dropout_rate=0.3``; both default to 0.0 here.

Parameter count: 4,083,690 at 10 classes.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from sadt_jax.models import _layers
from sadt_jax.models._base import Classifier

#: Convolution widths per block, VGG16 pattern (2, 2, 3, 3, 3 convolutions).
VGG16_BLOCKS = ((32, 32), (64, 64), (128, 128, 128), (256, 256, 256), (256, 256, 256))

#: (output-layer bias, salient tensor) for T2 teachers. The release's salient
#: index for VGG16-BN (53 in ``model.get_weights()``) falls on the BatchNorm of
#: block 4's second convolution (its moving variance, which has no effect in
#: training mode); its trainable shift, ``block4_bn2/bias``, is the analogue.
T2_TEACHER_PATHS = ("head/bias", "block4_bn2/bias")


class VGG16BN(Classifier):
    """Narrow VGG16 with BatchNorm (see the module docstring for the layout).

    Attributes:
      num_classes: number of output logits.
      dropout_rate: dropout after each hidden dense layer (release: 0.3).
      conv_dropout_rate: dropout after each conv block unit (release: 0.1).
      pool_impl: max-pooling implementation: ``'auto'`` (default: ``'reshape'`` on
        CPU, ``'xla'`` elsewhere), ``'xla'`` or ``'reshape'`` (see
        ``_layers.max_pool_2x2``).
      dtype, bn_axis_name, conv_impl: see :class:`~sadt_jax.models._base.LayerSettings`.
    """

    dropout_rate: float = 0.0
    conv_dropout_rate: float = 0.0
    pool_impl: str = "auto"

    def _logits(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        for b, widths in enumerate(VGG16_BLOCKS, start=1):
            for i, width in enumerate(widths, start=1):
                x = self._conv(width, 3, name=f"block{b}_conv{i}")(x)
                x = nn.relu(self._bn(train, f"block{b}_bn{i}")(x))
                x = self._dropout(self.conv_dropout_rate, x, train)
            x = _layers.max_pool_2x2(x, self.pool_impl)
        x = _layers.global_avg_pool(x)
        for i in (1, 2):
            x = self._dense(512, f"dense{i}")(x)
            x = nn.relu(self._bn(train, f"dense{i}_bn")(x))
            x = self._dropout(self.dropout_rate, x, train)
        return self._dense(self.num_classes, "head")(x)
