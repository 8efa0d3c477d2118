"""The networks of the authors' SADT release, layer for layer.

Fahim & Boutellier's notebook (``B_SADTeachers_HITY_NIPS.ipynb`` in
github.com/DeepUVaasa/SADT) builds four Keras models. These flax modules rebuild
them with the same layers, widths, activations, dropout rates, initialisers and
BatchNorm settings, and the same trainable parameter counts (32x32x3, 10 classes):

================================  ======================  ==========  =============
name in ``get_model``             release function        trainable   BN statistics
================================  ======================  ==========  =============
``release_simple_cnn``            ``clsclb``              635,576     1,536
``release_vgg16_bn``              ``VGG16_BN``            4,085,912   6,272
``release_inception_resnet``      ``cir``                 305,358     980
``release_resnet``                ``ResNetForCIFAR10``    446,784     2,288
================================  ======================  ==========  =============

(``release_simple_cnn`` is :class:`~sadt_jax.models.simple_cnn.SimpleCNN` with
``release_layout=True`` and dropout 0.3.) Common to all four:

* BatchNorm has Keras' defaults (momentum 0.99, epsilon 1e-3, last axis, gamma 1,
  beta 0). Keras' fused 4-D BatchNorm updates its running variance with the unbiased
  batch variance (n/(n-1)), flax with the biased one; at these batch sizes the
  difference is below 1e-5 relative and is not reproduced.
* ``he_normal`` is a normal truncated at two standard deviations, fan-in, scale 2,
  with the standard deviation divided by 0.87962566103423978 (the standard
  deviation of a unit normal truncated to [-2, 2]) so that the variance is
  2 / fan_in: Keras' ``TruncatedNormal`` and flax's ``variance_scaling`` agree.
  ``glorot_uniform`` is U(+-sqrt(6 / (fan_in + fan_out))); biases start at zero.
* Every model ends in ``Dense(k, ReLU) -> Dense(num_classes)``, the release's
  bottleneck before its softmax layer: ``k = 10`` in the simple CNN (10 even for 100
  classes, as in the release) and ``k = num_classes`` in the other three. The models
  return the last layer's pre-activation (the logits of the release's softmax).
* Pooling: 2x2, stride 2. At 32x32 every pooled size is even, where 'SAME' and
  'VALID' pooling agree; the VGG pools with 'SAME' so that 28x28 inputs (where the
  release's 'VALID' pooling would shrink 1x1 to nothing) also work, and the ResNet
  ends in a global average pool, which is the release's ``AveragePooling2D(8)`` on
  its 8x8 maps and also works on 7x7 maps (28x28 inputs).

The T2 "salient" tensor of the release (``ud``, an index into Keras'
``model.get_weights()``) lands on: the second conv bias of the simple CNN (7); the
running variance of block 4's second BatchNorm in the VGG (53: not trainable); the
shift of the second BatchNorm on path b of the middle Inception-ResNet module (49);
the running variance of the second BatchNorm of stage 2's fifth ResNet block (109:
not trainable). :func:`release_weight_order` lists every variable in that Keras
order (checked against Keras in the tests).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sadt_jax.models import _layers
from sadt_jax.models._base import Classifier, LayerSettings
from sadt_jax.models.vgg import VGG16_BLOCKS

#: Keras ``he_normal``: truncated normal (at +-2 sigma), fan-in, scale 2.
he_normal = _layers.conv_init
#: Keras ``glorot_uniform`` (the default of ``Conv2D`` and ``Dense``).
glorot_uniform = _layers.dense_init


def shape_keyed(init: Callable[..., Any], key: jax.Array) -> Callable[..., Any]:
    """An initialiser that draws from a key derived from ``key`` and the shape only.

    Every parameter of one shape gets the same value, whatever the key flax passes
    (which differs per module): the behaviour of a Keras 2 initialiser created with a
    fixed seed, e.g. ``he_normal(seed=32)``, whose draws depend on the shape alone.

    Args:
      init: the underlying initialiser, ``init(key, shape, dtype)``.
      key: the base key (e.g. drawn once from the ``'params'`` rng).

    Returns:
      An initialiser with the same signature as ``init``.
    """

    def shape_keyed_init(unused_key, shape, dtype=jnp.float32):
        del unused_key
        k = jax.random.fold_in(key, len(shape))
        for dim in shape:
            k = jax.random.fold_in(k, dim)
        return init(k, shape, dtype)

    return shape_keyed_init


class ReleaseVGG16BN(Classifier):
    """The release's ``VGG16_BN``: narrow VGG16 with BatchNorm and conv biases.

    Layout (13 conv units, 'SAME' 3x3 convolutions with bias, He-normal)::

        [conv -> BN -> ReLU -> dropout(conv_dropout_rate)] x (2, 2, 3, 3, 3) at
        32, 64, 128, 256, 256 channels, a 2x2 max-pool after each group
        -> global average pool (256) -> 2 x [dense 512 (He-normal) -> BN -> ReLU
        -> dropout(dropout_rate)] -> bottleneck Dense(num_classes) -> ReLU -> head

    Parameter paths: ``block{b}_conv{i}``, ``block{b}_bn{i}``, ``dense{1,2}``,
    ``dense{1,2}_bn``, ``bottleneck``, ``head``.

    Attributes:
      num_classes: number of output logits.
      dropout_rate: dropout after each hidden dense layer (release: 0.3).
      conv_dropout_rate: dropout after each conv unit (release: 0.1).
      pool_impl: max-pooling implementation (see ``_layers.max_pool_2x2``).
      dtype, bn_axis_name, conv_impl: see :class:`~sadt_jax.models._base.LayerSettings`.
    """

    dropout_rate: float = 0.3
    conv_dropout_rate: float = 0.1
    pool_impl: str = "auto"

    def _logits(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        for b, widths in enumerate(VGG16_BLOCKS, start=1):
            for i, width in enumerate(widths, start=1):
                x = self._conv(width, 3, use_bias=True, name=f"block{b}_conv{i}")(x)
                x = nn.relu(self._bn(train, f"block{b}_bn{i}")(x))
                x = self._dropout(self.conv_dropout_rate, x, train)
            x = _layers.max_pool_2x2(x, self.pool_impl)
        x = _layers.global_avg_pool(x)
        for i in (1, 2):
            x = self._dense(512, f"dense{i}", kernel_init=he_normal)(x)
            x = nn.relu(self._bn(train, f"dense{i}_bn")(x))
            x = self._dropout(self.dropout_rate, x, train)
        x = nn.relu(self._dense(self.num_classes, "bottleneck")(x))
        return self._dense(self.num_classes, "head")(x)


class ReleaseInceptionResNetModule(LayerSettings):
    """One module of the release's ``cir`` (``InceptionResNetModule``).

    With ``n = features``, every conv 3x3 'SAME' with bias::

        a  = ELU(BN(conv n/32 (x)))                      path_a_{conv,bn}
        b  = BN(conv n (ELU(BN(conv n (x)))))             path_b_{conv1,bn1,conv2,bn2}
        s  = ELU(BN(ELU(conv n (x))))                     shortcut_{conv,bn}
        c  = ELU(BN(conv n/32 (x)))                       path_c_{conv,bn}
        out = dropout(maxpool 2x2 VALID(concat[a, ELU(s + b), c]))

    Attributes:
      features: ``n``, the width of paths b and the shortcut.
      dropout_rate: dropout after the pooling (release: 0.2).
      kernel_init: initialiser of every conv kernel.
      pool_impl: max-pooling implementation (see ``_layers.max_pool_2x2``).
      dtype, bn_axis_name, conv_impl: see :class:`~sadt_jax.models._base.LayerSettings`.
    """

    features: int
    dropout_rate: float = 0.2
    kernel_init: Callable[..., Any] = he_normal
    pool_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        n, narrow = self.features, max(self.features // 32, 1)

        def conv(features, name, y):
            return self._conv(features, 3, use_bias=True, kernel_init=self.kernel_init, name=name)(
                y
            )

        def bn(name, y):
            return self._bn(train, name)(y)

        a = nn.elu(bn("path_a_bn", conv(narrow, "path_a_conv", x)))
        b = nn.elu(bn("path_b_bn1", conv(n, "path_b_conv1", x)))
        b = bn("path_b_bn2", conv(n, "path_b_conv2", b))
        s = nn.elu(bn("shortcut_bn", nn.elu(conv(n, "shortcut_conv", x))))
        b = nn.elu(s + b)
        c = nn.elu(bn("path_c_bn", conv(narrow, "path_c_conv", x)))
        y = jnp.concatenate([a, b, c], axis=-1)
        y = _layers.max_pool_2x2(y, self.pool_impl, padding="VALID")
        return self._dropout(self.dropout_rate, y, train)


class ReleaseInceptionResNet(Classifier):
    """The release's ``cir``: a three-module Inception-ResNet.

    Layout::

        stem: conv 3x3-32 'VALID', bias, linear (no BN, no activation)   30x30x32
        module1 (n=32) -> 15x15x34, module2 (n=64) -> 7x7x68, module3 (n=64) -> 3x3x68
        -> flatten (612) -> dropout -> dense1 128 ELU -> dropout
        -> bottleneck Dense(num_classes) ReLU -> head

    Every conv kernel is He-normal; the dense layers are Glorot-uniform. The five
    dropouts share ``dropout_rate`` (release: 0.2).

    Identical kernels (``tied_kernel_init``, on by default): the release creates every
    conv initialiser as ``he_normal(seed=32)``, and a seeded Keras 2 initialiser draws
    the same values for the same shape, so all conv kernels of equal shape start
    identical: in each module path b's first conv equals the shortcut conv (and in
    module 1 also path b's second conv), path a's conv equals path c's, and the 64->64
    second convs of modules 2 and 3 are equal too. With ``tied_kernel_init`` every
    kernel is drawn from a key derived from the ``'params'`` init rng and the kernel
    shape only (:func:`shape_keyed`), which reproduces those equalities; the values
    still change with the init seed (in the release they are the same in every run).
    Biases start at zero either way. ``tied_kernel_init=False`` draws every kernel
    independently.

    Parameter paths: ``stem``, ``module{1,2,3}/...`` (see
    :class:`ReleaseInceptionResNetModule`), ``dense1``, ``bottleneck``, ``head``.

    Attributes:
      num_classes: number of output logits.
      dropout_rate: rate of all five dropouts (release: 0.2).
      module_widths: ``n`` of each module.
      tied_kernel_init: draw conv kernels of equal shape identically (see above).
      pool_impl: max-pooling implementation (see ``_layers.max_pool_2x2``).
      dtype, bn_axis_name, conv_impl: see :class:`~sadt_jax.models._base.LayerSettings`.
    """

    dropout_rate: float = 0.2
    module_widths: Sequence[int] = (32, 64, 64)
    tied_kernel_init: bool = True
    pool_impl: str = "auto"

    def _logits(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        kernel_init = he_normal
        if self.tied_kernel_init and self.is_initializing():
            kernel_init = shape_keyed(he_normal, self.make_rng("params"))
        x = self._conv(32, 3, padding="VALID", use_bias=True, kernel_init=kernel_init, name="stem")(
            x
        )
        for i, n in enumerate(self.module_widths, start=1):
            x = ReleaseInceptionResNetModule(
                n,
                self.dropout_rate,
                kernel_init,
                self.pool_impl,
                name=f"module{i}",
                **self._settings(),
            )(x, train)
        x = x.reshape((x.shape[0], -1))
        x = self._dropout(self.dropout_rate, x, train)
        x = nn.elu(self._dense(128, "dense1")(x))
        x = self._dropout(self.dropout_rate, x, train)
        x = nn.relu(self._dense(self.num_classes, "bottleneck")(x))
        return self._dense(self.num_classes, "head")(x)


class ReleaseResidualBlock(LayerSettings):
    """A block of the release's ``ResNetForCIFAR10`` (``ResidualBlock``).

    Identity: ``ReLU(x + BN(conv(ReLU(BN(conv(x))))))``. Downsampling (projection
    shortcut): ``ReLU(BN(conv1x1/2(x)) + BN(conv(ReLU(BN(conv/2(x))))))``. Convs are
    'SAME', without bias, Glorot-uniform (Keras' default).

    Attributes:
      features: output channels (the input's, for an identity block).
      downsample: stride 2 and a projection shortcut.
      dtype, bn_axis_name, conv_impl: see :class:`~sadt_jax.models._base.LayerSettings`.
    """

    features: int
    downsample: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        def conv_bn(y, kernel_size, strides, prefix, suffix=""):
            y = self._conv(
                self.features,
                kernel_size,
                strides=strides,
                kernel_init=glorot_uniform,
                name=f"{prefix}conv{suffix}",
            )(y)
            return self._bn(train, f"{prefix}bn{suffix}")(y)

        strides = 2 if self.downsample else 1
        shortcut = conv_bn(x, 1, 2, "shortcut_") if self.downsample else x
        y = nn.relu(conv_bn(x, 3, strides, "", "1"))
        y = conv_bn(y, 3, 1, "", "2")
        return nn.relu(shortcut + y)


class ReleaseResNet(Classifier):
    """The release's ``ResNetForCIFAR10`` (built there as "resnet56").

    Layout: stem conv 3x3-8 -> BN -> ReLU; stage 1: 5 identity blocks at 8
    channels; stages 2 and 3: a downsampling block to 32 (then 64) channels and 4
    identity blocks; global average pool -> bottleneck Dense(num_classes) ReLU ->
    head. Every layer is Glorot-uniform; there is no dropout. The release declares an
    L2 kernel regulariser (1e-5) on the convolutions, but its training loop never
    adds ``model.losses``, so it has no effect and is not reproduced.

    Parameter paths: ``stem_conv``, ``stem_bn``,
    ``stage{s}_block{b}/{conv1,bn1,conv2,bn2,shortcut_conv,shortcut_bn}``,
    ``bottleneck``, ``head``.

    Attributes:
      num_classes: number of output logits.
      stage_sizes: blocks per stage.
      widths: channels per stage (the stem has ``widths[0]``).
      dtype, bn_axis_name, conv_impl: see :class:`~sadt_jax.models._base.LayerSettings`.
    """

    stage_sizes: Sequence[int] = (5, 5, 5)
    widths: Sequence[int] = (8, 32, 64)

    def _logits(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        x = self._conv(self.widths[0], 3, kernel_init=glorot_uniform, name="stem_conv")(x)
        x = nn.relu(self._bn(train, "stem_bn")(x))
        for s, (num_blocks, width) in enumerate(
            zip(self.stage_sizes, self.widths, strict=True), start=1
        ):
            for b in range(1, num_blocks + 1):
                x = ReleaseResidualBlock(
                    width,
                    downsample=s > 1 and b == 1,
                    name=f"stage{s}_block{b}",
                    **self._settings(),
                )(x, train)
        x = _layers.global_avg_pool(x)
        x = nn.relu(self._dense(self.num_classes, "bottleneck")(x))
        return self._dense(self.num_classes, "head")(x)


# --- T2 salient tensors and the release's get_weights() order ------------------------------

#: The release's T2 index ``ud`` per model: an index into Keras' ``model.get_weights()``.
RELEASE_SALIENT_INDEX = {
    "release_simple_cnn": 7,
    "release_vgg16_bn": 53,
    "release_inception_resnet": 49,
    "release_resnet": 109,
}

#: (teacher A path, teacher B path, trainable stand-in for teacher B) per model, as
#: '/'-joined keys into ``params``. Teacher B's path is ``None`` where the release's
#: index hits a BatchNorm running variance (VGG16-BN, ResNet): that tensor is not
#: trainable and is not read in training mode, so the release's teacher B is theta'
#: itself with a fresh dropout mask. The stand-in there is the shift (beta) of the
#: same BatchNorm layer: the trainable tensor nearest to the release's target, and one
#: that does change the training-mode output (a conv bias before BatchNorm would not).
RELEASE_T2_PATHS: dict[str, tuple[str, str | None, str]] = {
    "release_simple_cnn": ("head/bias", "conv2/bias", "conv2/bias"),
    "release_vgg16_bn": ("head/bias", None, "block4_bn2/bias"),
    "release_inception_resnet": (
        "head/bias",
        "module2/path_b_bn2/bias",
        "module2/path_b_bn2/bias",
    ),
    "release_resnet": ("head/bias", None, "stage2_block5/bn2/bias"),
}


def _inception_module_layers(prefix: str) -> list[tuple[str, str]]:
    # Keras orders a functional model's layers by their longest distance to the output
    # (farthest first), ties by depth-first discovery from the output (inputs in the
    # order given to ``add`` / ``concatenate``); this is that order for one module.
    names = (
        "path_b_conv1",
        "path_b_bn1",
        "shortcut_conv",
        "shortcut_bn",
        "path_b_conv2",
        "path_a_conv",
        "path_b_bn2",
        "path_c_conv",
        "path_a_bn",
        "path_c_bn",
    )
    return [(f"{prefix}/{n}", "bn" if n.endswith(("bn", "bn1", "bn2")) else "conv") for n in names]


def _resnet_block_layers(prefix: str, downsample: bool) -> list[tuple[str, str]]:
    if not downsample:
        names = ("conv1", "bn1", "conv2", "bn2")
    else:  # same rule as above: the shortcut conv and BN tie with conv2 and bn2
        names = ("conv1", "bn1", "shortcut_conv", "conv2", "shortcut_bn", "bn2")
    return [(f"{prefix}/{n}", "bn" if "bn" in n else "conv_nobias") for n in names]


def _release_layers(model: nn.Module) -> list[tuple[str, str]]:
    """(layer path, kind) in Keras' layer order; kind: conv, conv_nobias, dense or bn."""
    if isinstance(model, ReleaseVGG16BN):
        layers = []
        for b, widths in enumerate(VGG16_BLOCKS, start=1):
            for i in range(1, len(widths) + 1):
                layers += [(f"block{b}_conv{i}", "conv"), (f"block{b}_bn{i}", "bn")]
        layers += [("dense1", "dense"), ("dense1_bn", "bn"), ("dense2", "dense")]
        return layers + [("dense2_bn", "bn"), ("bottleneck", "dense"), ("head", "dense")]
    if isinstance(model, ReleaseInceptionResNet):
        layers = [("stem", "conv")]
        for i in range(1, len(model.module_widths) + 1):
            layers += _inception_module_layers(f"module{i}")
        return layers + [("dense1", "dense"), ("bottleneck", "dense"), ("head", "dense")]
    if isinstance(model, ReleaseResNet):
        layers = [("stem_conv", "conv_nobias"), ("stem_bn", "bn")]
        for s, num_blocks in enumerate(model.stage_sizes, start=1):
            for b in range(1, num_blocks + 1):
                layers += _resnet_block_layers(f"stage{s}_block{b}", s > 1 and b == 1)
        return layers + [("bottleneck", "dense"), ("head", "dense")]
    if getattr(model, "release_layout", False):  # SimpleCNN(release_layout=True)
        layers = []
        for i in (1, 2, 3):
            layers += [(f"conv{i}", "conv"), (f"bn{i}", "bn")]
        layers += [("dense1", "dense"), ("dense1_bn", "bn"), ("dense2", "dense")]
        return layers + [("dense2_bn", "bn"), ("dense3", "dense"), ("head", "dense")]
    raise ValueError(
        f"{type(model).__name__} is not a release model: build one with get_model('release_...')"
    )


def release_weight_order(model: nn.Module) -> list[tuple[str, str]]:
    """Every variable of a release model in the order of Keras' ``model.get_weights()``.

    Keras lists the layers of a functional model in topological order (for the
    Inception-ResNet and the ResNet's downsampling blocks that is not the order in
    which the notebook creates them) and, within a layer, ``kernel, bias`` or
    ``gamma, beta, moving_mean, moving_variance``. This maps the release's weight
    indices, e.g. its T2 index ``ud`` (:data:`RELEASE_SALIENT_INDEX`), to flax
    variables.

    Args:
      model: a module from ``get_model('release_...')`` (any ``num_classes``).

    Returns:
      ``[(collection, path), ...]``: ``collection`` is ``'params'`` or
      ``'batch_stats'``, ``path`` a '/'-joined key into it (e.g. ``'conv2/bias'``,
      ``'block4_bn2/var'``).

    Raises:
      ValueError: if ``model`` is not a release model.
    """
    expand = {
        "conv": (("params", "kernel"), ("params", "bias")),
        "dense": (("params", "kernel"), ("params", "bias")),
        "conv_nobias": (("params", "kernel"),),
        "bn": (
            ("params", "scale"),
            ("params", "bias"),
            ("batch_stats", "mean"),
            ("batch_stats", "var"),
        ),
    }
    return [
        (collection, f"{layer}/{leaf}")
        for layer, kind in _release_layers(model)
        for collection, leaf in expand[kind]
    ]
