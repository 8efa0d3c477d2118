"""The paper's methods (and our controls) as named presets.

A method is two things: a base optimizer (``make_optimizer``) and a
:class:`~sadt_jax.algorithm.step.SADTConfig` (``method_config``). The paper's
seven methods differ only in these; everything runs through ``sadt_update``.

=============  ==================================================================
name           what it is
=============  ==================================================================
base           Adam (lr 1e-4, decay 0.9 every 1000 steps), one update per batch
gc             gradient centralization per output unit (last axis) before Adam
agc            adaptive gradient clipping 0.01 (``optax.adaptive_grad_clip``)
sam            SAM, rho 0.05, bounded (Foret et al. 2021)
sadt_t1        SADT, sharpness-aware teacher, eps = 1e-3 (g + 1e-4 xi), KL(q||p)
sadt_t2        SADT, two layer teachers (std 0.1), KL(q||p)
sadt_t3        SADT, noise teacher eps = 1e-4 xi, KL(p||q)
base_2x        control: base with two updates per batch (equal updates to SADT)
sadt_t1_1u     SADT-T1 with one update per batch (theta' = theta)
sadt_ema       SADT with an EMA teacher (decay 0.999) beside the sampled T1 teacher
rdrop          control: teacher = theta' itself (only a fresh dropout mask differs,
               R-Drop-like), KL(q||p), two updates per batch as sadt_t1
=============  ==================================================================

Ablation switches are ``SADTConfig`` fields: ``kd_weight=0`` (teachers off, the
second update reuses g), ``teacher_dropout="shared"`` (teacher passes reuse the
clean pass's dropout mask), ``bn_stats``, ``kl_clip``.

References:
  Yong et al., 2020, "Gradient Centralization" (arXiv 2004.01461).
  Liang et al., 2021, "R-Drop: Regularized Dropout for Neural Networks"
  (arXiv 2106.14448).
  Brock et al., 2021, "High-Performance Large-Scale Image Recognition Without
  Normalization" (arXiv 2102.06171), for AGC.
"""

from __future__ import annotations

import dataclasses

import optax

from sadt_jax.algorithm.step import SADTConfig
from sadt_jax.algorithm.transforms import centralize_per_output_unit, keras_adam

__all__ = ["ADAM_EPS_PLACEMENTS", "METHODS", "OPTIMIZERS", "make_optimizer", "method_config"]

_T1 = SADTConfig(
    objective="sadt",
    teachers="t1",
    two_updates=True,
    rho=1e-3,
    normalize=False,
    noise_std=1e-4,
    noise_mode="direction",
    kl_direction="teacher_student",
)
_BASE = SADTConfig(objective="base", two_updates=False, rho=0.0, noise_std=0.0)

METHODS: dict[str, SADTConfig] = {
    "base": _BASE,
    "gc": _BASE,
    "agc": _BASE,
    "sam": SADTConfig(objective="sam", two_updates=False, rho=0.05, normalize=True, noise_std=0.0),
    "sadt_t1": _T1,
    "sadt_t2": dataclasses.replace(_T1, teachers="t2", rho=0.0, noise_std=0.0, t2_std=0.1),
    "sadt_t3": dataclasses.replace(
        _T1,
        teachers="t3",
        rho=0.0,
        noise_std=1e-4,
        noise_mode="additive",
        kl_direction="student_teacher",
    ),
    "base_2x": dataclasses.replace(_BASE, two_updates=True),
    "sadt_t1_1u": dataclasses.replace(_T1, two_updates=False),
    "sadt_ema": dataclasses.replace(_T1, ema_decay=0.999, ema_weight=1.0),
    "rdrop": dataclasses.replace(_T1, teachers="identity", rho=0.0, noise_std=0.0),
}

# Gradient transforms placed in front of the base optimizer, per method.
_PRE_TRANSFORMS = {
    "gc": lambda agc_clip: centralize_per_output_unit(),
    "agc": lambda agc_clip: optax.adaptive_grad_clip(agc_clip),
}

OPTIMIZERS = ("adam", "sgd")
ADAM_EPS_PLACEMENTS = ("optax", "keras")


def method_config(name: str, **overrides) -> SADTConfig:
    """The :class:`SADTConfig` of a named method, with optional field overrides.

    Args:
      name: one of :data:`METHODS`.
      **overrides: ``SADTConfig`` fields to replace (e.g. ``rho=2e-3``,
        ``t2_paths=("head/bias", "conv2/bias")``).

    Returns:
      The config (validated).

    Raises:
      ValueError: for an unknown method (listing the valid ones) or invalid fields.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return dataclasses.replace(METHODS[name], **overrides)


def make_optimizer(
    method: str,
    *,
    optimizer: str = "adam",
    learning_rate: float | optax.Schedule = 1e-4,
    decay_rate: float = 0.9,
    decay_steps: int = 1000,
    staircase: bool = False,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    adam_eps: float = 1e-7,
    adam_eps_placement: str = "optax",
    agc_clip: float = 0.01,
) -> optax.GradientTransformation:
    """The base optimizer ``U`` of a method.

    The paper's default is Adam with ``lr = 1e-4 * 0.9 ** (count / 1000)``
    (Keras ``ExponentialDecay``, not staircase) and Keras' ``epsilon=1e-7``. The
    schedule counts optimizer updates, so in two-update mode it decays twice per
    batch — as in the release.

    Args:
      method: the method name (``gc`` and ``agc`` prepend their transform).
      optimizer: ``"adam"`` or ``"sgd"`` (SGD with momentum).
      learning_rate: a float (then decayed by ``decay_rate`` every ``decay_steps``;
        ``decay_rate=1`` disables decay) or an optax schedule used as is.
      decay_rate, decay_steps, staircase: the exponential decay.
      momentum, nesterov: SGD's momentum.
      weight_decay: L2 weight decay added to the gradient (coupled, as in the SAM paper's
        SGD recipes); 0 disables it.
      adam_eps: Adam's epsilon.
      adam_eps_placement: ``"optax"`` (``optax.adam``: epsilon added after the bias
        correction) or ``"keras"`` (:func:`~sadt_jax.algorithm.transforms.keras_adam`:
        added before it, as in the authors' Keras release).
      agc_clip: AGC's clipping factor.

    Returns:
      An ``optax.GradientTransformation``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {optimizer!r}; valid optimizers: {', '.join(OPTIMIZERS)}"
        )
    if adam_eps_placement not in ADAM_EPS_PLACEMENTS:
        raise ValueError(
            f"unknown adam_eps_placement {adam_eps_placement!r}; "
            f"valid: {', '.join(ADAM_EPS_PLACEMENTS)}"
        )
    if callable(learning_rate):
        schedule = learning_rate
    elif decay_rate == 1.0:
        schedule = learning_rate
    else:
        schedule = optax.exponential_decay(
            learning_rate, transition_steps=decay_steps, decay_rate=decay_rate, staircase=staircase
        )
    parts = []
    if method in _PRE_TRANSFORMS:
        parts.append(_PRE_TRANSFORMS[method](agc_clip))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    if optimizer == "adam" and adam_eps_placement == "keras":
        parts.append(keras_adam(schedule, eps=adam_eps))
    elif optimizer == "adam":
        parts.append(optax.adam(schedule, eps=adam_eps))
    else:
        parts.append(optax.sgd(schedule, momentum=momentum, nesterov=nesterov))
    return optax.chain(*parts) if len(parts) > 1 else parts[0]
