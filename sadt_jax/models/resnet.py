"""CIFAR ResNets with basic blocks: ResNet-56 and ResNet-18.

He et al., "Deep Residual Learning for Image Recognition" (arXiv 1512.03385).
Both networks use post-activation basic blocks (conv3x3-BN-ReLU-conv3x3-BN, add
the shortcut, ReLU), a 3x3 stem convolution without max-pooling, global average
pooling and a dense output layer; convolutions have no bias.

* ``resnet56``: the paper's CIFAR network (Section 4.2): 3 stages of 9 blocks,
  16/32/64 channels, option-A shortcuts (identity; where the shape changes, a
  stride-2 subsample zero-padded to the new width, no parameters).
  853,018 parameters at 10 classes. (The SADT release's "resnet56" is a smaller
  net, 5 blocks per stage at 8/32/64 channels with projection shortcuts.)
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
from sadt_jax.models._layers import Dtype


class BasicBlock(nn.Module):
    """Post-activation basic residual block.

    Attributes:
      features: output channels.
      strides: stride of the first convolution (and of the shortcut).
      shortcut: 'A' (parameter-free: subsample and zero-pad channels) or 'B'
        (1x1 convolution + BatchNorm) where the shape changes; identity otherwise.
      dtype: computation dtype.
      bn_axis_name: optional ``pmap`` axis for BatchNorm statistics.
      conv_impl: convolution implementation (see ``_layers.conv``).
    """

    features: int
    strides: int = 1
    shortcut: str = "B"
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        def bn(name):
            return _layers.batch_norm(
                train, dtype=self.dtype, axis_name=self.bn_axis_name, name=name
            )

        conv = functools.partial(_layers.conv, dtype=self.dtype, impl=self.conv_impl)
        y = conv(self.features, 3, strides=self.strides, name="conv1")(x)
        y = nn.relu(bn("bn1")(y))
        y = conv(self.features, 3, name="conv2")(y)
        y = bn("bn2")(y)

        if self.strides != 1 or x.shape[-1] != self.features:
            if self.shortcut == "A":
                x = x[:, :: self.strides, :: self.strides, :]
                extra = self.features - x.shape[-1]
                x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
            elif self.shortcut == "B":
                x = conv(self.features, 1, strides=self.strides, name="shortcut_conv")(x)
                x = bn("shortcut_bn")(x)
            else:
                raise ValueError(f"shortcut must be 'A' or 'B', got {self.shortcut!r}")
        return nn.relu(x + y)


class ResNet(nn.Module):
    """CIFAR ResNet with basic blocks.

    Attributes:
      num_classes: number of output logits.
      stage_sizes: number of blocks per stage.
      widths: channels per stage; the stem has ``widths[0]`` channels.
      shortcut: 'A' or 'B', see :class:`BasicBlock`.
      dtype: computation dtype; parameters are float32.
      bn_axis_name: optional ``pmap`` axis for BatchNorm statistics.
      conv_impl: convolution implementation: ``'auto'`` (default: ``'matmul'`` on
        CPU, ``'xla'`` elsewhere), ``'xla'`` or ``'matmul'`` (see ``_layers.conv``).
    """

    num_classes: int
    stage_sizes: Sequence[int]
    widths: Sequence[int]
    shortcut: str = "B"
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """Returns logits of shape ``(batch, num_classes)``.

        Args:
          x: images, NHWC.
          train: batch statistics and running-average updates if True, running
            averages if False.

        Returns:
          Logits in ``dtype``.
        """
        x = jnp.asarray(x, self.dtype)
        x = _layers.conv(
            self.widths[0], 3, dtype=self.dtype, impl=self.conv_impl, name="stem_conv"
        )(x)
        x = _layers.batch_norm(
            train, dtype=self.dtype, axis_name=self.bn_axis_name, name="stem_bn"
        )(x)
        x = nn.relu(x)
        for s, (num_blocks, width) in enumerate(
            zip(self.stage_sizes, self.widths, strict=True), start=1
        ):
            for b in range(1, num_blocks + 1):
                x = BasicBlock(
                    width,
                    strides=2 if (s > 1 and b == 1) else 1,
                    shortcut=self.shortcut,
                    dtype=self.dtype,
                    bn_axis_name=self.bn_axis_name,
                    conv_impl=self.conv_impl,
                    name=f"stage{s}_block{b}",
                )(x, train)
        x = _layers.global_avg_pool(x)
        return _layers.dense(self.num_classes, dtype=self.dtype, name="head")(x)


#: ResNet-56 for CIFAR (He et al. 2016, Section 4.2).
ResNet56 = functools.partial(ResNet, stage_sizes=(9, 9, 9), widths=(16, 32, 64), shortcut="A")
#: CIFAR ResNet-18: 3x3 stem, no max-pooling, projection shortcuts.
ResNet18 = functools.partial(
    ResNet, stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512), shortcut="B"
)

#: T2 (output-layer bias, salient tensor) paths. The salient tensor is the shift
#: of the last BatchNorm of stage 2's last block. For ResNet-56 this is the layer
#: the release's index (109 in ``model.get_weights()`` of its CIFAR ResNet) falls
#: on, where it hits the moving variance, which has no effect in training mode;
#: for ResNet-18 it sits after the 9th of 17 convolutions, mid-network.
RESNET56_T2_TEACHER_PATHS = ("head/bias", "stage2_block9/bn2/bias")
RESNET18_T2_TEACHER_PATHS = ("head/bias", "stage2_block2/bn2/bias")
