"""sadt-jax: SADT (sharpness-aware minimization + self-distillation) in JAX.

The public API:

* :func:`sam` — the teacher-sampling / sharpness-aware optax transformation;
* :func:`sadt_update` with :class:`SADTConfig` and :class:`TrainState` — one pure
  training step for SADT and every baseline of the paper;
* :func:`method_config`, :func:`make_optimizer` — the paper's methods by name;
* :mod:`sadt_jax.losses`, :mod:`sadt_jax.sharpness`, :mod:`sadt_jax.models`.

Reference: Fahim & Boutellier, 2022, "SADT: Combining Sharpness-Aware Minimization
with Self-Distillation for Improved Model Generalization" (arXiv 2211.00310).
"""

from sadt_jax import losses
from sadt_jax.algorithm import (
    METHODS,
    SADTConfig,
    SAMState,
    TrainState,
    layer_teachers,
    make_optimizer,
    method_config,
    param_paths,
    perturbation,
    sadt_update,
    sam,
    tree_norm,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "SADTConfig",
    "SAMState",
    "TrainState",
    "layer_teachers",
    "losses",
    "make_optimizer",
    "method_config",
    "param_paths",
    "perturbation",
    "sadt_update",
    "sam",
    "tree_norm",
]
