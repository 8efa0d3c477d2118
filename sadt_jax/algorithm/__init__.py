"""The SADT algorithm: perturbations, the ``sam`` transformation, the state and the step."""

from sadt_jax.algorithm.methods import METHODS, make_optimizer, method_config
from sadt_jax.algorithm.perturbation import layer_teachers, param_paths, perturbation, tree_norm
from sadt_jax.algorithm.sam import SAMState, sam
from sadt_jax.algorithm.state import TrainState
from sadt_jax.algorithm.step import SADTConfig, sadt_update

__all__ = [
    "METHODS",
    "SADTConfig",
    "SAMState",
    "TrainState",
    "layer_teachers",
    "make_optimizer",
    "method_config",
    "param_paths",
    "perturbation",
    "sadt_update",
    "sam",
    "tree_norm",
]
