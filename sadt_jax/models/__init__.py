"""Image classifiers for SADT experiments (flax.linen).

The networks of the SADT paper (Fahim & Boutellier, arXiv 2211.00310) and common
CIFAR baselines, built by name:

* ``simple_cnn``: the paper's 3-conv CNN (:mod:`.simple_cnn`), 634,314 parameters;
* ``vgg16_bn``: narrow VGG16-BN, 32-256 channels (:mod:`.vgg`), 4,083,690;
* ``inception_resnet``: small Inception-ResNet (:mod:`.inception_resnet`), 1,820,234;
* ``resnet56``: CIFAR ResNet-56 with option-A shortcuts (:mod:`.resnet`), 853,018;
* ``resnet18``: CIFAR ResNet-18 (:mod:`.resnet`), 11,173,962;
* ``wrn28_10``: Wide ResNet 28-10 (:mod:`.wide_resnet`), 36,479,194.

and the four networks of the authors' release, layer for layer (:mod:`.release`),
with the release's dropout rates as defaults:

* ``release_simple_cnn``: the simple CNN as released (``SimpleCNN`` with
  ``release_layout=True``, dropout 0.3), 635,576;
* ``release_vgg16_bn``: the release's VGG16-BN (dropout 0.1 conv, 0.3 dense), 4,085,912;
* ``release_inception_resnet``: the release's three-module Inception-ResNet
  (dropout 0.2), 305,358;
* ``release_resnet``: the release's "resnet56" (8/32/64 channels, 5 blocks per
  stage, projection shortcuts, no dropout), 446,784.

(Counts at 10 classes on 32x32x3 inputs, ``params`` only, not ``batch_stats``.)

Conventions shared by every model:

* ``model.apply(variables, x, train=...)`` takes NHWC images and returns
  **logits** (no softmax).
* BatchNorm keeps running averages in the ``batch_stats`` collection: with
  ``train=True`` it normalises with batch statistics and updates them (call
  ``apply`` with ``mutable=['batch_stats']``); with ``train=False`` it uses the
  running averages. Momentum 0.99 and epsilon 1e-3 are Keras' defaults, as in the
  authors' release.
* Dropout (where a model has a nonzero rate) draws from the ``'dropout'`` rng and
  is active only with ``train=True``.
* Every model is a :class:`~sadt_jax.models._base.Classifier`: the shared fields
  (``num_classes``; keyword-only ``dtype``, ``bn_axis_name``, ``conv_impl``) and the
  ``__call__`` preamble are defined there once.
* ``dtype`` sets the computation dtype (e.g. ``jnp.bfloat16``); parameters are
  always float32.
* ``bn_axis_name`` names a ``pmap`` axis to average BatchNorm statistics over.
  Under ``jax.jit`` with a sharded batch it is not needed.

Example::

    model = get_model("simple_cnn", num_classes=10, dropout_rate=0.3)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    logits, updates = model.apply(
        variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}
    )
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from sadt_jax.models import inception_resnet, release, resnet, simple_cnn, vgg, wide_resnet
from sadt_jax.models.inception_resnet import InceptionResNet
from sadt_jax.models.release import (
    ReleaseInceptionResNet,
    ReleaseResNet,
    ReleaseVGG16BN,
    release_weight_order,
)
from sadt_jax.models.resnet import ResNet, ResNet18, ResNet56
from sadt_jax.models.simple_cnn import SimpleCNN
from sadt_jax.models.vgg import VGG16BN
from sadt_jax.models.wide_resnet import WideResNet

#: The release's simple CNN (``clsclb``): the release layout with its dropout of 0.3.
ReleaseSimpleCNN = functools.partial(SimpleCNN, release_layout=True, dropout_rate=0.3)


def _same(paths: tuple[str, str]) -> tuple[str, str | None, str]:
    return (*paths, paths[1])


# name -> (constructor taking num_classes and keyword arguments,
#          (T2 teacher A path, teacher B path or None, trainable stand-in for teacher B))
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], tuple[str, str | None, str]]] = {
    "simple_cnn": (SimpleCNN, _same(simple_cnn.T2_TEACHER_PATHS)),
    "vgg16_bn": (VGG16BN, _same(vgg.T2_TEACHER_PATHS)),
    "inception_resnet": (InceptionResNet, _same(inception_resnet.T2_TEACHER_PATHS)),
    "resnet56": (ResNet56, _same(resnet.RESNET56_T2_TEACHER_PATHS)),
    "resnet18": (ResNet18, _same(resnet.RESNET18_T2_TEACHER_PATHS)),
    "wrn28_10": (WideResNet, _same(wide_resnet.T2_TEACHER_PATHS)),
    "release_simple_cnn": (ReleaseSimpleCNN, release.RELEASE_T2_PATHS["release_simple_cnn"]),
    "release_vgg16_bn": (ReleaseVGG16BN, release.RELEASE_T2_PATHS["release_vgg16_bn"]),
    "release_inception_resnet": (
        ReleaseInceptionResNet,
        release.RELEASE_T2_PATHS["release_inception_resnet"],
    ),
    "release_resnet": (ReleaseResNet, release.RELEASE_T2_PATHS["release_resnet"]),
}

#: Names accepted by :func:`get_model` and :func:`t2_teacher_paths`.
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _lookup(name: str) -> tuple[Callable[..., nn.Module], tuple[str, str | None, str]]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}") from None


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Builds a classifier by name.

    Args:
      name: one of :data:`MODEL_NAMES`.
      num_classes: number of output logits.
      **kwargs: model attributes: ``dtype`` (computation dtype, default float32;
        parameters are always float32), ``bn_axis_name``, and model-specific ones,
        e.g. ``dropout_rate`` (all models except the ResNets),
        ``conv_dropout_rate`` (``vgg16_bn``, ``release_vgg16_bn``), ``release_layout``
        (``simple_cnn``), ``residual_scale`` (``inception_resnet``), ``shortcut``
        (``resnet56``, ``resnet18``), ``tied_kernel_init``
        (``release_inception_resnet``); ``conv_impl`` (every model: ``'auto'``,
        ``'xla'``, ``'matmul'`` or ``'gemm'``) and ``pool_impl`` (``simple_cnn``, ``vgg16_bn`` and
        the release models except ``release_resnet``: ``'auto'``, ``'xla'`` or
        ``'reshape'``) choose CPU-friendly backward passes (``'auto'``: on the CPU
        backend only; same values, see ``_layers``). The ResNets take no
        ``dropout_rate``.
        Unknown keywords raise ``TypeError``.

    Returns:
      An unbound ``flax.linen.Module`` whose ``__call__(x, train)`` returns logits.

    Raises:
      ValueError: if ``name`` is not a known model.
    """
    constructor, _ = _lookup(name)
    return constructor(num_classes=num_classes, **kwargs)


def t2_teacher_paths(name: str, stand_in: bool = False) -> tuple[str, str | None]:
    """Parameters perturbed by the two T2 ("layer") teachers of SADT.

    Teacher A multiplies the output layer's bias by N(0, 0.1^2) noise; teacher B
    adds N(0, 0.1^2) noise to one "salient" tensor. Both start from theta'.

    * ``release_*`` models: the release's tensors. Teacher B's is the tensor that the
      release's index ``ud`` into ``model.get_weights()`` lands on: the second conv
      bias (``release_simple_cnn``), the shift of path b's second BatchNorm in the
      middle module (``release_inception_resnet``). For ``release_vgg16_bn`` and
      ``release_resnet`` that index lands on a BatchNorm running variance, which is
      not trainable and not read in training mode: the release's teacher B is then
      theta' itself, evaluated with a fresh dropout mask, and the additive path is
      ``None``. ``stand_in=True`` returns a trainable stand-in there instead: the
      shift (beta) of that same BatchNorm layer.
    * Other models: the second conv bias for ``simple_cnn`` (as released); a BatchNorm
      shift in the middle of the network for the deeper ones (see each model module's
      ``T2_TEACHER_PATHS`` for the choice and the reason: a conv bias followed by
      BatchNorm in training mode has no effect). ``stand_in`` changes nothing.

    Args:
      name: one of :data:`MODEL_NAMES`.
      stand_in: return a trainable path for teacher B where the release's is not one.

    Returns:
      ``(output_bias_path, salient_path)``: '/'-joined keys into the ``params``
      dict, e.g. ``('head/bias', 'conv2/bias')``; ``salient_path`` is ``None`` for
      ``release_vgg16_bn`` and ``release_resnet`` unless ``stand_in``.

    Raises:
      ValueError: if ``name`` is not a known model.
    """
    _, (multiplicative, additive, substitute) = _lookup(name)
    return multiplicative, substitute if stand_in else additive


__all__ = [
    "MODEL_NAMES",
    "InceptionResNet",
    "ReleaseInceptionResNet",
    "ReleaseResNet",
    "ReleaseSimpleCNN",
    "ReleaseVGG16BN",
    "ResNet",
    "ResNet18",
    "ResNet56",
    "SimpleCNN",
    "VGG16BN",
    "WideResNet",
    "get_model",
    "release_weight_order",
    "t2_teacher_paths",
]
