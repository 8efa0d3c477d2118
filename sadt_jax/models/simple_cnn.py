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

The release used dropout 0.3; the default here is 0.0 (``release_simple_cnn`` in
:func:`sadt_jax.models.get_model` is this layout with dropout 0.3). The model returns
logits, the pre-activation of the release's softmax output layer.

Parameter count at 10 classes: 634,314 on 32x32x3 and 633,162 on 28x28x1
(default layout); 635,576 on 32x32x3 and 405,048 on 28x28x1 with
``release_layout=True`` (non-trainable BatchNorm statistics: 384 and 1,536).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from sadt_jax.models import _fused, _layers
from sadt_jax.models._base import Classifier

#: (output-layer bias, salient tensor) for T2 teachers. The salient tensor is the
#: second convolution's bias, index 7 of ``model.get_weights()`` in the release.
T2_TEACHER_PATHS = ("head/bias", "conv2/bias")
#: ``block_impl`` values of :class:`SimpleCNN`.
BLOCK_IMPLS = ("auto", "layers", "fused")


class SimpleCNN(Classifier):
    """The paper's simple CNN (see the module docstring for the layout).

    Attributes:
      num_classes: number of output logits.
      dropout_rate: dropout rate (between the dense layers; on the flattened
        features with ``release_layout``). The release used 0.3.
      release_layout: reproduce the authors' Keras model exactly.
      pool: ``'max'`` (the paper's 2x2 max-pooling) or ``'avg'`` (2x2 average pooling:
        smooth, so results do not hinge on near-ties between pooled values — used where two
        mathematically equal computations are compared, e.g. 1 vs 8 devices).
      pool_impl: max-pooling implementation: ``'auto'`` (default: ``'reshape'`` on
        CPU, ``'xla'`` elsewhere), ``'xla'`` or ``'reshape'`` (see
        ``_layers.max_pool_2x2``).
      block_impl: how the release layout's ``pool(relu(conv))`` blocks are computed:
        ``'layers'`` (three layers), ``'fused'`` (one chunked layer,
        ``_fused.conv_relu_pool``: same parameters and values, gradients to float
        round-off; needs ``release_layout`` and ``pool='max'``) or ``'auto'`` (default:
        ``'fused'`` where the release layout runs in float32 with ``conv_impl`` and
        ``pool_impl`` resolving to ``'gemm'`` and ``'reshape'``, i.e. on CPU; else
        ``'layers'``).
      fold_bn: with fused blocks, in training, fold ``bn1`` (the BatchNorm between the two
        blocks) into ``conv2``'s kernel and bias (``_fused.BatchNormAffine`` and
        ``_fused.fold_affine``) instead of writing the normalised 13x13x64 map and
        differentiating through it: the same parameters, statistics and running-average
        updates, values and gradients to float round-off, and in one process a 15% faster
        ``bn1`` + second block forward and backward (results/conv_cpu.md). Evaluation
        applies ``bn1`` as a layer either way. No effect with ``'layers'`` blocks.
      dtype, bn_axis_name, conv_impl: see :class:`~sadt_jax.models._base.LayerSettings`.
    """

    dropout_rate: float = 0.0
    release_layout: bool = False
    pool: str = "max"
    pool_impl: str = "auto"
    block_impl: str = "auto"
    fold_bn: bool = True

    def _logits(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        fused = self._fused_blocks()  # validates block_impl for either layout
        if self.release_layout:
            return self._release(x, train, fused)
        for i in (1, 2, 3):
            x = self._conv(64, 3, use_bias=True, name=f"conv{i}")(x)
            x = self._bn(train, f"bn{i}")(nn.relu(x))
            x = self._pool(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(self._dense(512, "dense1")(x))
        x = self._dropout(self.dropout_rate, x, train)
        x = nn.relu(self._dense(64, "dense2")(x))
        x = self._dropout(self.dropout_rate, x, train)
        return self._dense(self.num_classes, "head")(x)

    def _pool(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.pool == "avg":
            return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        if self.pool != "max":
            raise ValueError(f"pool must be 'max' or 'avg', got {self.pool!r}")
        return _layers.max_pool_2x2(x, self.pool_impl)

    def _fused_blocks(self) -> bool:
        """Whether the release layout's conv-ReLU-pool blocks run as one fused layer."""
        if self.block_impl not in BLOCK_IMPLS:
            raise ValueError(f"block_impl must be one of {BLOCK_IMPLS}, got {self.block_impl!r}")
        if not isinstance(self.fold_bn, bool):
            raise ValueError(f"fold_bn must be True or False, got {self.fold_bn!r}")
        if self.block_impl == "fused" and (not self.release_layout or self.pool != "max"):
            raise ValueError(
                "block_impl='fused' needs release_layout=True and pool='max' (the default "
                "layout has BatchNorm between the ReLU and the pool); use 'auto' or 'layers'"
            )
        if self.block_impl != "auto":
            return self.block_impl == "fused"
        conv = _layers.resolve_impl(self.conv_impl, _layers.CPU_CONV_IMPL, _layers.CONV_IMPLS)
        pool = _layers.resolve_impl(self.pool_impl, _layers.CPU_POOL_IMPL, _layers.POOL_IMPLS)
        return (
            self.release_layout
            and self.pool == "max"
            and jnp.dtype(self.dtype) == jnp.float32
            and (conv, pool) == ("gemm", "reshape")
        )

    def _release(self, x: jnp.ndarray, train: bool, fused: bool) -> jnp.ndarray:
        def conv(name):
            return self._conv(64, 3, padding="VALID", use_bias=True, name=name)

        def block(name, y, affine=None):
            if fused:
                return _fused.ConvReluPool(
                    64, 3, padding="VALID", pool_padding="VALID", dtype=self.dtype, name=name
                )(y, affine)
            return _layers.max_pool_2x2(nn.relu(conv(name)(y)), self.pool_impl, padding="VALID")

        x = block("conv1", x)
        if fused and self.fold_bn and train:  # bn1 folded into conv2's kernel and bias
            bn1 = _fused.BatchNormAffine(dtype=self.dtype, axis_name=self.bn_axis_name, name="bn1")
            x = block("conv2", x, bn1(x))
        else:
            x = block("conv2", self._bn(train, "bn1")(x))
        x = self._bn(train, "bn2")(x)
        x = self._bn(train, "bn3")(nn.relu(conv("conv3")(x)))
        x = x.reshape((x.shape[0], -1))
        x = self._dropout(self.dropout_rate, x, train)
        x = self._bn(train, "dense1_bn")(nn.relu(self._dense(512, "dense1")(x)))
        x = self._bn(train, "dense2_bn")(nn.relu(self._dense(64, "dense2")(x)))
        x = nn.relu(self._dense(10, "dense3")(x))
        return self._dense(self.num_classes, "head")(x)
