"""sadt-jax: SADT (sharpness-aware minimization + self-distillation) in JAX.

The public API:

* :func:`sam` — the teacher-sampling / sharpness-aware optax transformation, and
  the teacher samplers (:func:`sharpness_teacher`, :func:`noise_teacher`,
  :func:`layer_teacher_pair`, :func:`identity_teacher`, :func:`ema_teacher`);
* :func:`sadt` (and :func:`sadt_t1`) — SADT as an optax transformation that owns
  the base optimizer, for anyone's training loop;
* :func:`sadt_update` with :class:`SADTConfig` (or a :class:`Method`) and
  :class:`TrainState` — one pure training step for SADT and every baseline;
* :func:`method_config`, :func:`make_optimizer` — the paper's methods by name;
* :mod:`sadt_jax.losses`, :mod:`sadt_jax.sharpness`, :mod:`sadt_jax.models`.

Reference: Fahim & Boutellier, 2022, "SADT: Combining Sharpness-Aware Minimization
with Self-Distillation for Improved Model Generalization" (arXiv 2211.00310).
"""

from sadt_jax import losses
from sadt_jax.algorithm import (
    METHODS,
    Method,
    SADTConfig,
    SADTState,
    SAMState,
    TeacherGrads,
    TrainState,
    build_method,
    ema_teacher,
    identity_teacher,
    layer_teacher_pair,
    layer_teachers,
    make_optimizer,
    method_config,
    noise_teacher,
    param_paths,
    perturbation,
    sadt,
    sadt_t1,
    sadt_update,
    sadt_update_sharded,
    sam,
    sharpness_teacher,
    step_keys,
    teacher_gradients,
    tree_norm,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Method",
    "SADTConfig",
    "SADTState",
    "SAMState",
    "TeacherGrads",
    "TrainState",
    "build_method",
    "ema_teacher",
    "identity_teacher",
    "layer_teacher_pair",
    "layer_teachers",
    "losses",
    "make_optimizer",
    "method_config",
    "noise_teacher",
    "param_paths",
    "perturbation",
    "sadt",
    "sadt_t1",
    "sadt_update",
    "sadt_update_sharded",
    "sam",
    "sharpness_teacher",
    "step_keys",
    "teacher_gradients",
    "tree_norm",
]
