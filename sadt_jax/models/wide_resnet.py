"""Wide ResNet (WRN-28-10) for 32x32 images.

Zagoruyko & Komodakis, "Wide Residual Networks" (arXiv 1605.07146): depth
28 = 6n + 4 with n = 4 pre-activation blocks per stage, widening factor 10
(stage widths 160/320/640 after a 16-channel stem). A block is
BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 plus the shortcut; where the shape
changes the shortcut is a 1x1 convolution of the pre-activated input (as in
the authors' code). The network ends in BN-ReLU, global average pooling and a
dense output layer. Convolutions have no bias.

36,479,194 parameters at 10 classes (the usual figure).

Parameter paths: ``stem_conv``, ``stage{s}_block{b}/{bn1,conv1,bn2,conv2,shortcut_conv}``,
``final_bn``, ``head``; stages and blocks are numbered from 1.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from sadt_jax.models import _layers
from sadt_jax.models._base import Classifier, LayerSettings

#: T2 (output-layer bias, salient tensor) paths: the shift of the last BatchNorm
#: of stage 2's last block, the same position as for the ResNets.
T2_TEACHER_PATHS = ("head/bias", "stage2_block4/bn2/bias")


class WideBasicBlock(LayerSettings):
    """Pre-activation wide basic block.

    Attributes:
      features: output channels.
      strides: stride of the first convolution (and of the shortcut).
      dropout_rate: dropout between the two convolutions.
      dtype, bn_axis_name, conv_impl: see :class:`~sadt_jax.models._base.LayerSettings`.
    """

    features: int
    strides: int = 1
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        project = self.strides != 1 or x.shape[-1] != self.features
        h = nn.relu(self._bn(train, "bn1")(x))
        if project:
            x = self._conv(self.features, 1, strides=self.strides, name="shortcut_conv")(h)
        y = self._conv(self.features, 3, strides=self.strides, name="conv1")(h)
        y = nn.relu(self._bn(train, "bn2")(y))
        y = self._dropout(self.dropout_rate, y, train)
        y = self._conv(self.features, 3, name="conv2")(y)
        return x + y


class WideResNet(Classifier):
    """Wide ResNet with pre-activation blocks.

    Attributes:
      num_classes: number of output logits.
      depth: total depth, 6n + 4.
      widen_factor: channel multiplier k (stage widths 16k, 32k, 64k).
      dropout_rate: dropout inside each block (the paper uses 0.3 on CIFAR in
        some runs); default 0.0.
      dtype, bn_axis_name, conv_impl: see :class:`~sadt_jax.models._base.LayerSettings`.
    """

    depth: int = 28
    widen_factor: int = 10
    dropout_rate: float = 0.0

    def _logits(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        if (self.depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4, got {self.depth}")
        blocks_per_stage = (self.depth - 4) // 6
        widths = [16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor]

        x = self._conv(16, 3, name="stem_conv")(x)
        for s, width in enumerate(widths, start=1):
            for b in range(1, blocks_per_stage + 1):
                x = WideBasicBlock(
                    width,
                    strides=2 if (s > 1 and b == 1) else 1,
                    dropout_rate=self.dropout_rate,
                    name=f"stage{s}_block{b}",
                    **self._settings(),
                )(x, train)
        x = self._bn(train, "final_bn")(x)
        x = _layers.global_avg_pool(nn.relu(x))
        return self._dense(self.num_classes, "head")(x)
