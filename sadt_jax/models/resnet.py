"""CIFAR ResNets with basic blocks: ResNet-56 and ResNet-18.

He et al., "Deep Residual Learning for Image Recognition" (arXiv 1512.03385).
Both networks use post-activation basic blocks (conv3x3-BN-ReLU-conv3x3-BN, add
the shortcut, ReLU), a 3x3 stem convolution without max-pooling, global average
pooling and a dense output layer; convolutions have no bias.

* ``resnet56``: the paper's CIFAR network (Section 4.2): 3 stages of 9 blocks,
  16/32/64 channels, option-A shortcuts (identity; where the shape changes, a
  stride-2 subsample zero-padded to the new width, no parameters).
  853,018 parameters at 10 classes. (The SADT release's "resnet56" is a smaller
  net, 5 blocks per stage at 8/32/64 channels with projection shortcuts:
  ``release_resnet``, :mod:`.release`.)
* ``resnet18``: the common CIFAR variant of the ImageNet ResNet-18 (3x3 stem
  with 64 channels, no max-pooling, stages [2, 2, 2, 2] at 64-128-256-512,
  option-B shortcuts: 1x1 convolution + BatchNorm where the shape changes).
  11,173,962 parameters at 10 classes.

Parameter paths: ``stem_conv``, ``stem_bn``, ``stage{s}_block{b}/{conv1,bn1,conv2,bn2}``
(and ``shortcut_conv``, ``shortcut_bn`` for projections), ``head``; stages and
blocks are numbered from 1.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from sadt_jax.models import _layers
from sadt_jax.models._base import Classifier, LayerSettings


class BasicBlock(LayerSettings):
    """Post-activation basic residual block.

    Attributes:
      features: output channels.
      strides: stride of the first convolution (and of the shortcut).
      shortcut: 'A' (parameter-free: subsample and zero-pad channels) or 'B'
        (1x1 convolution + BatchNorm) where the shape changes; identity otherwise.
      dtype, bn_axis_name, conv_impl: see :class:`~sadt_jax.models._base.LayerSettings`.
    """

    features: int
    strides: int = 1
    shortcut: str = "B"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        y = self._conv(self.features, 3, strides=self.strides, name="conv1")(x)
        y = nn.relu(self._bn(train, "bn1")(y))
        y = self._conv(self.features, 3, name="conv2")(y)
        y = self._bn(train, "bn2")(y)

        if self.strides != 1 or x.shape[-1] != self.features:
            if self.shortcut == "A":
                x = x[:, :: self.strides, :: self.strides, :]
                extra = self.features - x.shape[-1]
                x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
            elif self.shortcut == "B":
                x = self._conv(self.features, 1, strides=self.strides, name="shortcut_conv")(x)
                x = self._bn(train, "shortcut_bn")(x)
            else:
                raise ValueError(f"shortcut must be 'A' or 'B', got {self.shortcut!r}")
        return nn.relu(x + y)


class ResNet(Classifier):
    """CIFAR ResNet with basic blocks.

    Attributes:
      num_classes: number of output logits.
      stage_sizes: number of blocks per stage.
      widths: channels per stage; the stem has ``widths[0]`` channels.
      shortcut: 'A' or 'B', see :class:`BasicBlock`.
      dtype, bn_axis_name, conv_impl: see :class:`~sadt_jax.models._base.LayerSettings`.
    """

    stage_sizes: Sequence[int]
    widths: Sequence[int]
    shortcut: str = "B"

    def _logits(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        x = self._conv(self.widths[0], 3, name="stem_conv")(x)
        x = nn.relu(self._bn(train, "stem_bn")(x))
        for s, (num_blocks, width) in enumerate(
            zip(self.stage_sizes, self.widths, strict=True), start=1
        ):
            for b in range(1, num_blocks + 1):
                x = BasicBlock(
                    width,
                    strides=2 if (s > 1 and b == 1) else 1,
                    shortcut=self.shortcut,
                    name=f"stage{s}_block{b}",
                    **self._settings(),
                )(x, train)
        x = _layers.global_avg_pool(x)
        return self._dense(self.num_classes, "head")(x)


#: ResNet-56 for CIFAR (He et al. 2016, Section 4.2).
ResNet56 = functools.partial(ResNet, stage_sizes=(9, 9, 9), widths=(16, 32, 64), shortcut="A")
#: CIFAR ResNet-18: 3x3 stem, no max-pooling, projection shortcuts.
ResNet18 = functools.partial(
    ResNet, stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512), shortcut="B"
)

#: T2 (output-layer bias, salient tensor) paths. The salient tensor is the shift
#: of the last BatchNorm of stage 2's last block. In the release's smaller ResNet
#: (5 blocks per stage) the index 109 of ``model.get_weights()`` falls on the same
#: position, the BatchNorm after the second conv of stage 2's last (fifth) block,
#: but on its moving variance, which has no effect in training mode
#: (``release_resnet``); for ResNet-18 it sits after the 9th of 17 convolutions.
RESNET56_T2_TEACHER_PATHS = ("head/bias", "stage2_block9/bn2/bias")
RESNET18_T2_TEACHER_PATHS = ("head/bias", "stage2_block2/bn2/bias")
