r"""SADT as an optax transformation, for anyone's training loop.

:func:`sadt` wraps a base optimizer :math:`U` (as ``optax.contrib.sam`` wraps
its outer optimizer) and does, per ``update`` call, what
:func:`sadt_jax.sadt_update` does per batch:

1. first update :math:`\theta' = \theta + U(g)` (the release's two updates);
2. teachers :math:`\theta_k` sampled from :math:`(\theta', g, \text{key})`;
3. :math:`g_{KD} = \sum_k` ``grad_fn``:math:`(\theta_k)`;
4. second update :math:`\theta'' = \theta' + U(g + g_{KD})`.

It returns the total update :math:`\theta'' - \theta`, so the caller applies it
once with ``optax.apply_updates``. ``grad_fn`` is the user's: the gradient of
their distillation loss at the teacher parameters (e.g. ``jax.grad`` of
:func:`sadt_jax.losses.distillation` between the teacher's logits and the clean
logits held constant).

Without ``optimizer``, :func:`sadt` is the one-update variant
(:math:`\theta = \theta'`, method ``sadt_t1_1u``), a plain chainable gradient
transformation: ``optax.chain(sadt_jax.sadt_t1(), optax.adam(1e-3))``.

References:
  Fahim & Boutellier, 2022, "SADT" (arXiv 2211.00310).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sadt_jax.algorithm.sam import sam, teacher_gradients
from sadt_jax.algorithm.teachers import Teacher, sharpness_teacher

__all__ = ["SADTState", "sadt", "sadt_t1"]


class SADTState(NamedTuple):
    """State of :func:`sadt` with a base optimizer.

    Attributes:
      inner: the base optimizer's state (advanced twice per ``update``).
      count: number of ``update`` calls (int32); indexes ρ schedules and noise.
      key: base PRNG key of the teachers' noise; the call's key is ``fold_in(key, count)``.
    """

    inner: optax.OptState
    count: jax.Array
    key: jax.Array


def sadt(
    teacher: Teacher,
    optimizer: optax.GradientTransformation | None = None,
    *,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""SADT's update as an optax transformation.

    Args:
      teacher: a teacher sampler (:mod:`sadt_jax.algorithm.teachers`), e.g.
        ``sharpness_teacher(1e-3, normalize=False, noise_std=1e-4)`` (SADT-T1).
      optimizer: the base optimizer :math:`U`. Given: the release's two updates per
        call, and the transformation returns the whole update (do not chain another
        optimizer after it). ``None``: one update, a chainable transformation that
        returns :math:`g + g_{KD}` for the optimizer that follows it.
      seed: seed of the teachers' noise key.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; its ``update`` takes
      ``(grads, state, params, *, grad_fn, key=None)``: ``grads`` is the clean
      gradient :math:`g`, ``grad_fn(teacher_params)`` the distillation gradient at
      a teacher (called once per teacher), ``key`` (optional) replaces the noise key
      of this call.

    Example:
      >>> tx = sadt_jax.sadt_t1(optax.adam(1e-3))  # doctest: +SKIP
      >>> updates, opt_state = tx.update(g, opt_state, params, grad_fn=kd_grad)  # doctest: +SKIP
      >>> params = optax.apply_updates(params, updates)  # doctest: +SKIP
    """
    if optimizer is None:
        return sam(teacher=teacher, keep_grads=True, seed=seed)

    def init_fn(params: Any) -> SADTState:
        return SADTState(
            inner=optimizer.init(params),
            count=jnp.zeros([], jnp.int32),
            key=jax.random.PRNGKey(seed),
        )

    def update_fn(grads, state: SADTState, params=None, *, grad_fn=None, key=None, **extra):
        del extra
        if params is None or grad_fn is None:
            raise ValueError(
                "sadt_jax.sadt: update() needs `params` and the keyword argument grad_fn=f, "
                "where f(teacher_params) returns the distillation gradient there."
            )
        if key is None:
            key = jax.random.fold_in(state.key, state.count)
        u1, inner = optimizer.update(grads, state.inner, params)
        anchor = optax.apply_updates(params, u1)
        out = teacher_gradients(
            lambda phi, index, carry: (grad_fn(phi), carry, None),
            teacher,
            grads,
            anchor,
            key,
            count=state.count,
            keep_grads=True,
        )
        u2, inner = optimizer.update(out.grads, inner, anchor)
        new_params = optax.apply_updates(anchor, u2)
        updates = jax.tree.map(jnp.subtract, new_params, params)
        return updates, SADTState(inner, optax.safe_increment(state.count), state.key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sadt_t1(
    optimizer: optax.GradientTransformation | None = None,
    *,
    rho: float | Callable[[jax.Array], jax.Array] = 1e-3,
    noise_std: float = 1e-4,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""SADT-T1 (teacher :math:`\theta' + \rho (g + \sigma \xi)`) as an optax transformation.

    ``sadt(sharpness_teacher(rho, normalize=False, noise_std=noise_std), optimizer)``;
    see :func:`sadt`. The defaults are the paper's.
    """
    teacher = sharpness_teacher(rho, normalize=False, noise_std=noise_std)
    return sadt(teacher, optimizer, seed=seed)
