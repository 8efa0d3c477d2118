"""A small Inception-ResNet for 32x32 images.

Residual Inception blocks with scaled residuals, after Szegedy et al.,
"Inception-v4, Inception-ResNet and the Impact of Residual Connections on
Learning" (arXiv 1602.07261), shrunk for CIFAR. The SADT paper (arXiv 2211.00310)
evaluates "an Inception-ResNet-style" network; its release (``cir`` in
github.com/DeepUVaasa/SADT) is a three-module ad-hoc net of 305,358 parameters,
available as ``release_inception_resnet`` (:mod:`.release`). This module is a
different, larger member of the same family::

    stem: conv3x3-32, conv3x3-64, conv3x3-128                    (32x32, 128 ch)
    2 x block A: [1x1-32 | 1x1-32, 3x3-32 | 1x1-32, 3x3-48, 3x3-64] (32x32, 128 ch)
    reduction A: [maxpool | 3x3/2-64 | 1x1-48, 3x3-64, 3x3/2-64]   (16x16, 256 ch)
    2 x block B: [1x1-64 | 1x1-64, 1x7-80, 7x1-96]                 (16x16, 256 ch)
    reduction B: [maxpool | 1x1-128, 3x3/2-128 | 1x1-128, 3x3-128, 3x3/2-128]
                                                                   (8x8, 512 ch)
    2 x block C: [1x1-96 | 1x1-96, 1x3-112, 3x1-128]               (8x8, 512 ch)
    -> global average pool -> dropout -> head

Every conv is conv (no bias) + BatchNorm + ReLU. In a residual block the
branches are concatenated, projected back to the block width by a linear 1x1
convolution with bias (``up``), scaled by ``residual_scale`` (0.2 by default;
the paper recommends 0.1-0.3) and added to the input, followed by a ReLU.
Max-pooling is 3x3 with stride 2; all padding is 'SAME'.

1,820,234 parameters at 10 classes.

Parameter paths: ``stem{1,2,3}``, ``block_{a,b,c}{1,2}``, ``reduction_{a,b}``,
``head``; inside a block or reduction, ``branch{i}_conv{j}/{conv,bn}`` (numbered
from 0 and 1) and ``up``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from sadt_jax.models import _layers
from sadt_jax.models._base import Classifier, ConvBN, LayerSettings
from sadt_jax.models._layers import Dtype

#: A branch: a sequence of (features, kernel size) convolutions.
Branch = Sequence[tuple[int, int | tuple[int, int]]]

BLOCK_A: Sequence[Branch] = (((32, 1),), ((32, 1), (32, 3)), ((32, 1), (48, 3), (64, 3)))
BLOCK_B: Sequence[Branch] = (((64, 1),), ((64, 1), (80, (1, 7)), (96, (7, 1))))
BLOCK_C: Sequence[Branch] = (((96, 1),), ((96, 1), (112, (1, 3)), (128, (3, 1))))
REDUCTION_A: Sequence[Branch] = (((64, 3),), ((48, 1), (64, 3), (64, 3)))
REDUCTION_B: Sequence[Branch] = (((128, 1), (128, 3)), ((128, 1), (128, 3), (128, 3)))

#: T2 (output-layer bias, salient tensor) paths. The salient tensor is the
#: BatchNorm shift at the end of the deepest branch of the middle stage's last
#: block, by analogy with the release: there, index 49 of ``model.get_weights()``
#: is the shift (beta) of the second BatchNorm on the residual path of the middle
#: module, a trainable tensor (see ``release_inception_resnet`` in :mod:`.release`).
T2_TEACHER_PATHS = ("head/bias", "block_b2/branch1_conv3/bn/bias")


def _concat_branches(
    x: jnp.ndarray,
    branches: Sequence[Branch],
    *,
    strides: int,
    train: bool,
    dtype: Dtype,
    bn_axis_name: str | None,
    conv_impl: str,
) -> jnp.ndarray:
    """Runs parallel conv branches and concatenates them on the channel axis.

    Called from a compact method: the ``branch{i}_conv{j}`` submodules belong to
    the calling module. The last convolution of every branch has stride
    ``strides``; with ``strides > 1`` a 3x3 max-pool of the input is prepended.
    """
    outputs = []
    if strides > 1:
        outputs.append(nn.max_pool(x, (3, 3), strides=(strides, strides), padding="SAME"))
    for i, branch in enumerate(branches):
        y = x
        for j, (features, kernel_size) in enumerate(branch, start=1):
            y = ConvBN(
                features,
                kernel_size,
                strides=strides if j == len(branch) else 1,
                dtype=dtype,
                bn_axis_name=bn_axis_name,
                conv_impl=conv_impl,
                name=f"branch{i}_conv{j}",
            )(y, train)
        outputs.append(y)
    return jnp.concatenate(outputs, axis=-1)


class Reduction(LayerSettings):
    """Grid reduction: a stride-2 max-pool and stride-2 conv branches, concatenated.

    Attributes:
      branches: the conv branches (their last convolution has stride 2).
      dtype, bn_axis_name, conv_impl: see :class:`~sadt_jax.models._base.LayerSettings`.
    """

    branches: Sequence[Branch]

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        return _concat_branches(x, self.branches, strides=2, train=train, **self._settings())


class InceptionResNetBlock(LayerSettings):
    """Residual Inception block: ``relu(x + scale * up(concat(branches(x))))``.

    Attributes:
      branches: the parallel conv branches.
      residual_scale: factor on the residual before the addition.
      dtype, bn_axis_name, conv_impl: see :class:`~sadt_jax.models._base.LayerSettings`.
    """

    branches: Sequence[Branch]
    residual_scale: float = 0.2

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        y = _concat_branches(x, self.branches, strides=1, train=train, **self._settings())
        y = self._conv(x.shape[-1], 1, use_bias=True, name="up")(y)
        return nn.relu(x + self.residual_scale * y)


class InceptionResNet(Classifier):
    """Small Inception-ResNet for CIFAR (see the module docstring for the layout).

    Attributes:
      num_classes: number of output logits.
      num_blocks: residual blocks in stages A, B and C.
      residual_scale: factor on each block's residual.
      dropout_rate: dropout before the output layer.
      dtype, bn_axis_name, conv_impl: see :class:`~sadt_jax.models._base.LayerSettings`.
    """

    num_blocks: Sequence[int] = (2, 2, 2)
    residual_scale: float = 0.2
    dropout_rate: float = 0.0

    def _logits(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        kw = self._settings()
        for i, features in enumerate((32, 64, 128), start=1):
            x = ConvBN(features, 3, name=f"stem{i}", **kw)(x, train)
        stages = (("a", BLOCK_A, REDUCTION_A), ("b", BLOCK_B, REDUCTION_B), ("c", BLOCK_C, None))
        for (tag, block, reduction), n in zip(stages, self.num_blocks, strict=True):
            for i in range(1, n + 1):
                x = InceptionResNetBlock(block, self.residual_scale, name=f"block_{tag}{i}", **kw)(
                    x, train
                )
            if reduction is not None:
                x = Reduction(reduction, name=f"reduction_{tag}", **kw)(x, train)
        x = _layers.global_avg_pool(x)
        x = self._dropout(self.dropout_rate, x, train)
        return self._dense(self.num_classes, "head")(x)
