"""The training state: everything needed to resume a run bit-exactly.

``TrainState`` is a :func:`flax.struct.dataclass`, i.e. a pytree: it can be
jitted, sharded, donated and checkpointed as a whole. The model's ``apply_fn``
and the optax transformation ``tx`` are static fields (not saved; rebuilt from
the config on restore).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

PyTree = Any

__all__ = ["TrainState"]


@struct.dataclass
class TrainState:
    """State carried from one :func:`sadt_jax.sadt_update` call to the next.

    Attributes:
      step: number of batches trained on (int32 scalar).
      params: model parameters (float32 master copy).
      model_state: non-trainable collections, e.g. ``{"batch_stats": ...}``; ``{}``
        for models without BatchNorm.
      opt_state: state of ``tx`` (advanced twice per batch in two-update mode).
      teacher_state: EMA teacher parameters when the EMA teacher is on, else ``{}``.
      key: base PRNG key; the step's randomness is ``fold_in(key, step)``.
      apply_fn: the flax ``Module.apply`` (static). Contract: it is called as
        ``apply_fn({"params": params, **model_state}, images, train=True,
        rngs={"dropout": key}, mutable=list(model_state))`` and returns
        ``(logits, new_model_state)`` when ``model_state`` is non-empty, else it is
        called without ``mutable=`` and returns the logits; so the model's
        ``__call__`` takes ``train``, draws dropout from the ``"dropout"`` RNG stream
        and keeps running statistics in ``model_state``'s collections.
      tx: the base optax optimizer (static).
    """

    step: jax.Array
    params: PyTree
    model_state: PyTree
    opt_state: optax.OptState
    teacher_state: PyTree
    key: jax.Array
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(
        cls,
        *,
        apply_fn: Callable,
        variables: PyTree,
        tx: optax.GradientTransformation,
        key: jax.Array,
        ema_teacher: bool = False,
    ) -> TrainState:
        """Builds the initial state from a model's initialised ``variables``.

        Args:
          apply_fn: ``model.apply``.
          variables: output of ``model.init``: ``{"params": ..., "batch_stats": ...}``.
          tx: the base optimizer (e.g. from :func:`sadt_jax.make_optimizer`).
          key: PRNG key for per-step randomness (dropout, noise, teachers).
          ema_teacher: keep an EMA copy of the parameters as a teacher (needed by
            methods with ``ema_decay > 0``, e.g. ``sadt_ema``).

        Returns:
          A ``TrainState`` at step 0.
        """
        variables = dict(variables)
        params = variables.pop("params")
        teacher_state = jax.tree.map(jnp.copy, params) if ema_teacher else {}
        return cls(
            step=jnp.zeros([], jnp.int32),
            params=params,
            model_state=variables,
            opt_state=tx.init(params),
            teacher_state=teacher_state,
            key=key,
            apply_fn=apply_fn,
            tx=tx,
        )
