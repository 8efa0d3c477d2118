"""The SADT algorithm: teachers, the ``sam`` and ``sadt`` transformations, state and step."""

from sadt_jax.algorithm.config import Method, SADTConfig, build_method
from sadt_jax.algorithm.methods import METHODS, make_optimizer, method_config
from sadt_jax.algorithm.perturbation import layer_teachers, param_paths, perturbation, tree_norm
from sadt_jax.algorithm.sam import SAMState, TeacherGrads, sam, teacher_gradients
from sadt_jax.algorithm.state import TrainState
from sadt_jax.algorithm.step import sadt_update, sadt_update_sharded, step_keys
from sadt_jax.algorithm.teachers import (
    ema_teacher,
    identity_teacher,
    layer_teacher_pair,
    noise_teacher,
    sharpness_teacher,
)
from sadt_jax.algorithm.transform import SADTState, sadt, sadt_t1

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
    "make_optimizer",
    "method_config",
    "noise_teacher",
    "param_paths",
    "perturbation",
    "sadt_update",
    "sadt_update_sharded",
    "sadt",
    "sadt_t1",
    "sam",
    "sharpness_teacher",
    "step_keys",
    "teacher_gradients",
    "tree_norm",
]
