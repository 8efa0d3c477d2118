"""Image classifiers for SADT experiments (flax.linen).

The networks of the SADT paper (Fahim & Boutellier, arXiv 2211.00310) and common
CIFAR baselines, built by name:

* ``simple_cnn``: the paper's 3-conv CNN (:mod:`.simple_cnn`), 634,314 parameters;
* ``vgg16_bn``: narrow VGG16-BN, 32-256 channels (:mod:`.vgg`), 4,083,690;
* ``inception_resnet``: small Inception-ResNet (:mod:`.inception_resnet`), 1,820,234;
* ``resnet56``: CIFAR ResNet-56 with option-A shortcuts (:mod:`.resnet`), 853,018;
* ``resnet18``: CIFAR ResNet-18 (:mod:`.resnet`), 11,173,962;
* ``wrn28_10``: Wide ResNet 28-10 (:mod:`.wide_resnet`), 36,479,194.

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

from collections.abc import Callable
from typing import Any

import flax.linen as nn

from sadt_jax.models import inception_resnet, resnet, simple_cnn, vgg, wide_resnet
from sadt_jax.models.inception_resnet import InceptionResNet
from sadt_jax.models.resnet import ResNet, ResNet18, ResNet56
from sadt_jax.models.simple_cnn import SimpleCNN
from sadt_jax.models.vgg import VGG16BN
from sadt_jax.models.wide_resnet import WideResNet

# name -> (constructor taking num_classes and keyword arguments, T2 teacher paths)
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], tuple[str, str]]] = {
    "simple_cnn": (SimpleCNN, simple_cnn.T2_TEACHER_PATHS),
    "vgg16_bn": (VGG16BN, vgg.T2_TEACHER_PATHS),
    "inception_resnet": (InceptionResNet, inception_resnet.T2_TEACHER_PATHS),
    "resnet56": (ResNet56, resnet.RESNET56_T2_TEACHER_PATHS),
    "resnet18": (ResNet18, resnet.RESNET18_T2_TEACHER_PATHS),
    "wrn28_10": (WideResNet, wide_resnet.T2_TEACHER_PATHS),
}

#: Names accepted by :func:`get_model` and :func:`t2_teacher_paths`.
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _lookup(name: str) -> tuple[Callable[..., nn.Module], tuple[str, str]]:
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
        ``conv_dropout_rate`` (``vgg16_bn``), ``release_layout`` (``simple_cnn``),
        ``residual_scale`` (``inception_resnet``), ``shortcut`` (ResNets);
        ``conv_impl`` (every model: ``'auto'``, ``'xla'`` or ``'matmul'``) and
        ``pool_impl`` (``simple_cnn``, ``vgg16_bn``: ``'auto'``, ``'xla'`` or
        ``'reshape'``) choose CPU-friendly backward passes (``'auto'``: on the CPU
        backend only; same values, see ``_layers``).
        Unknown keywords raise ``TypeError``.

    Returns:
      An unbound ``flax.linen.Module`` whose ``__call__(x, train)`` returns logits.

    Raises:
      ValueError: if ``name`` is not a known model.
    """
    constructor, _ = _lookup(name)
    return constructor(num_classes=num_classes, **kwargs)


def t2_teacher_paths(name: str) -> tuple[str, str]:
    """Parameters perturbed by the two T2 ("layer") teachers of SADT.

    Teacher A multiplies the output layer's bias by N(0, 0.1^2) noise; teacher B
    adds N(0, 0.1^2) noise to one "salient" tensor. For ``simple_cnn`` that is the
    second convolution's bias, as in the authors' release; for the other models
    it is a BatchNorm shift in the middle of the network (see each model module's
    ``T2_TEACHER_PATHS`` for the choice and the reason). A conv bias would not
    do there: followed by BatchNorm in training mode it has no effect.

    Args:
      name: one of :data:`MODEL_NAMES`.

    Returns:
      ``(output_bias_path, salient_path)``: '/'-joined keys into the ``params``
      dict, e.g. ``('head/bias', 'conv2/bias')``.

    Raises:
      ValueError: if ``name`` is not a known model.
    """
    _, paths = _lookup(name)
    return paths


__all__ = [
    "MODEL_NAMES",
    "InceptionResNet",
    "ResNet",
    "ResNet18",
    "ResNet56",
    "SimpleCNN",
    "VGG16BN",
    "WideResNet",
    "get_model",
    "t2_teacher_paths",
]
