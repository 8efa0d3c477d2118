"""The training loop, its jitted steps, checkpoints and config validation."""

from sadt_jax.train.loop import NonFiniteLossError, Preempted, train_and_evaluate
from sadt_jax.train.validation import ConfigError

__all__ = ["ConfigError", "NonFiniteLossError", "Preempted", "train_and_evaluate"]
