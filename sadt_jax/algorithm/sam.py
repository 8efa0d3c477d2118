r"""``sam``: the sharpness-aware / teacher-sampling gradient transformation.

``sam(...)`` is an :class:`optax.GradientTransformationExtraArgs`. Given the
clean gradient :math:`g` at :math:`\theta`, a *teacher sampler* (see
:mod:`sadt_jax.algorithm.teachers`; by default the sharpness teacher
:math:`\theta + \epsilon` built from ``sam``'s keyword arguments) forms
:math:`K` teacher parameters :math:`\theta_k`; ``grad_fn`` is evaluated at every
one (in turn along the static teacher axis, threading a carry such as BatchNorm
statistics, or all at once with ``parallel=True``: ``vmap``) and the
transformation returns

* :math:`\sum_k \nabla L(\theta_k)` (SAM: :math:`K = 1`), or
* :math:`g + \sum_k \nabla L(\theta_k)` when ``keep_grads=True`` (SADT's
  :math:`g + g_{KD}`, where ``grad_fn`` differentiates the distillation loss).

The pure function behind it, :func:`teacher_gradients`, is what
:func:`sadt_jax.sadt_update` calls, with a ``grad_fn`` that also threads the
model's BatchNorm statistics and returns auxiliary outputs.

Chain it in front of any optax optimizer::

  tx = optax.chain(sadt_jax.sam(0.05), optax.sgd(0.1))
  updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)

With ``normalize=True`` and no noise this equals
``optax.contrib.sam(opt, optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
opaque_mode=True)`` (up to the ``eps`` in the norm), but with a plain
single-callable ``grad_fn(params)`` and no inner optimizer state.

Noise keys are ``fold_in(key(seed), count)``: fresh every step, reproducible,
and carried in the (checkpointable) state.

References:
  Foret et al., 2021 (arXiv 2010.01412); Kwon et al., 2021 (arXiv 2102.11600);
  Fahim & Boutellier, 2022 (arXiv 2211.00310).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sadt_jax.algorithm.perturbation import NoiseMask
from sadt_jax.algorithm.teachers import Teacher, sample_teachers, sharpness_teacher

__all__ = ["SAMState", "TeacherGrads", "sam", "teacher_gradients"]

PyTree = Any


class SAMState(NamedTuple):
    """State of :func:`sam`.

    Attributes:
      count: number of ``update`` calls so far (int32), indexes ρ schedules and noise.
      key: base PRNG key; the step's key is ``fold_in(key, count)``.
      aux: with ``has_aux=True``, the auxiliary outputs of the last ``update``
        (stacked over the teacher axis); ``None`` before the first update.
    """

    count: jax.Array
    key: jax.Array
    aux: Any = None


class TeacherGrads(NamedTuple):
    r"""Output of :func:`teacher_gradients`.

    Attributes:
      grads: :math:`\sum_k \nabla L(\theta_k)` (plus ``g`` with ``keep_grads``).
      carry: the carry after the last teacher (e.g. BatchNorm statistics).
      aux: auxiliary outputs, stacked over the teacher axis K.
      perturbation_norms: :math:`\|\theta_k - \theta\|` per teacher, shape ``(K,)``.
    """

    grads: PyTree
    carry: Any
    aux: Any
    perturbation_norms: jax.Array


def teacher_gradients(
    grad_fn: Callable[[PyTree, Any, Any], tuple[PyTree, Any, Any]],
    teacher: Teacher,
    grads: PyTree,
    params: PyTree,
    key: jax.Array,
    *,
    count: jax.Array | int = 0,
    carry: Any = None,
    keep_grads: bool = False,
    parallel: bool = False,
) -> TeacherGrads:
    r"""Samples teachers from ``(params, grads, key)`` and sums ``grad_fn`` over them.

    Args:
      grad_fn: ``(teacher_params, index, carry) -> (grads, carry, aux)``; ``index`` is
        the teacher's position (an int, or an int32 scalar with ``parallel=True``),
        e.g. to fold into a dropout key.
      teacher: a sampler ``(params, grads, key) -> teacher pytree`` (leading axis K).
      grads: the clean gradient :math:`g`.
      params: the point the teachers start from.
      key: the sampler's PRNG key.
      count: the step, for :math:`\rho` schedules.
      carry: threaded from one teacher's ``grad_fn`` call to the next.
      keep_grads: add ``grads`` to the result (SADT's :math:`g + g_{KD}`).
      parallel: ``vmap`` over the teachers (the carry is then passed to every teacher
        unchanged and returned as given). Default: the teachers in turn — the
        teacher axis is static and short (1 or 2 for the paper's teachers), so it is
        unrolled at trace time; this keeps
        the step's floating-point results identical to evaluating each teacher by
        hand (``lax.scan``, even unrolled, changes the last bit on CPU).

    Returns:
      A :class:`TeacherGrads`.
    """
    teachers, norms = sample_teachers(teacher, params, grads, key, count)
    k = norms.shape[0]
    if parallel:
        index = jnp.arange(k, dtype=jnp.int32)
        g_k, _, aux = jax.vmap(grad_fn, in_axes=(0, 0, None))(teachers, index, carry)
        total = jax.tree.map(lambda x: jnp.sum(x, axis=0), g_k)
    else:
        total, auxes = None, []
        for i in range(k):
            teacher_i = jax.tree.map(lambda x, i=i: x[i], teachers)
            g_i, carry, aux_i = grad_fn(teacher_i, i, carry)
            total = g_i if total is None else jax.tree.map(jnp.add, total, g_i)
            auxes.append(aux_i)
        aux = jax.tree.map(lambda *xs: jnp.stack(xs), *auxes)
    if keep_grads:
        total = jax.tree.map(jnp.add, grads, total)
    return TeacherGrads(total, carry, aux, norms)


def sam(
    rho: float | Callable[[jax.Array], jax.Array] = 0.05,
    *,
    normalize: bool = True,
    adaptive: bool = False,
    adaptive_eta: float = 0.0,
    noise_std: float = 0.0,
    noise_mask: NoiseMask = None,
    noise_mode: str = "direction",
    keep_grads: bool = False,
    eps: float = 1e-12,
    seed: int = 0,
    teacher: Teacher | None = None,
    has_aux: bool = False,
    parallel: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Sharpness-aware / teacher-sampling gradient transformation.

    Args:
      rho: perturbation radius :math:`\rho` (>= 0), or an optax-style schedule
        ``count -> rho``.
      normalize: bounded SAM direction :math:`g / (\|g\| + \varepsilon)`;
        ``False`` gives SADT's unbounded :math:`\epsilon = \rho g`.
      adaptive: ASAM's element-wise :math:`|w| + \eta` scaling.
      adaptive_eta: ASAM's :math:`\eta`.
      noise_std: :math:`\sigma` of the Gaussian noise (0 disables it).
      noise_mask: which leaves get noise (pytree of bools or a function of the
        params); default: leaves of rank > 1, as in the release.
      noise_mode: ``"direction"``: :math:`\epsilon = \rho (d + \sigma \xi)` (SADT-T1);
        ``"additive"``: :math:`\epsilon = \rho d + \sigma \xi` — with ``rho=0`` the
        pure-noise teacher :math:`\epsilon = \sigma \xi` of SADT-T3.
      keep_grads: return ``grads + sum_k grad_fn(theta_k)`` instead of
        ``sum_k grad_fn(theta_k)``.
      eps: epsilon added to norms before dividing.
      seed: seed of the noise key stored in the state.
      teacher: a teacher sampler (:mod:`sadt_jax.algorithm.teachers`); when given,
        the perturbation arguments above are not used. Default: the sharpness
        teacher they describe.
      has_aux: ``grad_fn`` returns ``(grads, aux)``; the teachers' ``aux`` (stacked
        over the teacher axis) is stored in ``state.aux``.
      parallel: ``vmap`` over the teachers instead of evaluating them in turn.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
      ``(grads, state, params, *, grad_fn, key=None, **ignored)``;
      ``grad_fn(teacher_params)`` must return a pytree like ``params``. ``key``, if
      given, replaces the state's noise key ``fold_in(key(seed), count)`` for this call.

    Raises:
      ValueError: for a negative ``rho`` or ``noise_std`` or an unknown ``noise_mode``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sadt_jax
      >>> loss = lambda p: jnp.sum(p["w"] ** 2)
      >>> params = {"w": jnp.ones(3)}
      >>> tx = optax.chain(sadt_jax.sam(0.05), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                            grad_fn=jax.grad(loss))
      >>> params = optax.apply_updates(params, updates)
    """
    if teacher is None:
        teacher = sharpness_teacher(
            rho,
            normalize=normalize,
            adaptive=adaptive,
            adaptive_eta=adaptive_eta,
            noise_std=noise_std,
            noise_mask=noise_mask,
            noise_mode=noise_mode,
            eps=eps,
        )

    def init_fn(params: Any) -> SAMState:
        del params
        return SAMState(count=jnp.zeros([], jnp.int32), key=jax.random.PRNGKey(seed))

    def update_fn(updates, state: SAMState, params=None, *, grad_fn=None, key=None, **extra):
        del extra  # Unknown extras are ignored so the transform composes in chains.
        if params is None:
            raise ValueError("sadt_jax.sam: update() needs `params` to form the perturbation.")
        if grad_fn is None:
            raise ValueError(
                "sadt_jax.sam: update() needs the keyword argument grad_fn=f, "
                "where f(perturbed_params) returns a gradient pytree."
            )
        if key is None:
            key = jax.random.fold_in(state.key, state.count)

        def adapted(phi, index, carry):
            del index
            out = grad_fn(phi)
            g_k, aux = out if has_aux else (out, None)
            return g_k, carry, aux

        out = teacher_gradients(
            adapted,
            teacher,
            updates,
            params,
            key,
            count=state.count,
            keep_grads=keep_grads,
            parallel=parallel,
        )
        new_state = SAMState(
            count=optax.safe_increment(state.count),
            key=state.key,
            aux=out.aux if has_aux else None,
        )
        return out.grads, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
