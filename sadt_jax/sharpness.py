r"""Sharpness measurements of a loss at given parameters.

Two standard measures of how sharp a minimum is, both as pure functions of a
scalar loss ``loss_fn(params)`` (close over the batch; see :func:`model_loss_fn`):

* :func:`hessian_top_eigenvalue`: the dominant eigenvalue :math:`\lambda_{\max}`
  of the Hessian :math:`H = \nabla^2 L(\theta)`, by power iteration on
  Hessian-vector products. The Hessian is never formed: each product
  :math:`Hv` is one forward-over-reverse pass,
  ``jax.jvp(jax.grad(loss_fn), (params,), (v,))``, costing about two
  gradient evaluations.
* :func:`worst_case_loss_increase`: the SAM sharpness
  :math:`\max_{\|\epsilon\|_2 \le \rho} L(\theta + \epsilon) - L(\theta)`,
  estimated by (projected) normalized gradient ascent. One step is SAM's
  first-order estimate :math:`\epsilon = \rho\, g / \|g\|`.

Both work on any pytree of floating-point parameters and are traceable: they
can be called eagerly or inside ``jax.jit`` (with ``loss_fn`` closed over).

Measure in **evaluation mode**: a loss that updates BatchNorm statistics or
draws dropout masks is not a function of the parameters alone.
:func:`model_loss_fn` builds such a loss for the models of
:mod:`sadt_jax.models` (running BatchNorm statistics, no dropout).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from sadt_jax import sharpness
  >>> loss = lambda p: 0.5 * (3.0 * p["x"] ** 2 + p["y"] ** 2)
  >>> params = {"x": jnp.array(1.0), "y": jnp.array(1.0)}
  >>> lam, info = sharpness.hessian_top_eigenvalue(loss, params, key=jax.random.key(0))
  >>> round(float(lam), 3)
  3.0
  >>> inc = sharpness.worst_case_loss_increase(loss, params, rho=0.1)

References:
  Foret et al., 2021, "Sharpness-Aware Minimization for Efficiently Improving
  Generalization" (arXiv 2010.01412), Sec. 2 (the first-order estimate of the
  worst-case perturbation).
  Keskar et al., 2017, "On Large-Batch Training for Deep Learning: Generalization
  Gap and Sharp Minima" (arXiv 1609.04836), for epsilon-sharpness.
  Pearlmutter, 1994, "Fast Exact Multiplication by the Hessian" (Neural
  Computation 6(1)), for Hessian-vector products.
  Yao et al., 2020, "PyHessian: Neural Networks Through the Lens of the Hessian"
  (arXiv 1912.07145), for power iteration on Hessian-vector products.
  Madry et al., 2018, "Towards Deep Learning Models Resistant to Adversarial
  Attacks" (arXiv 1706.06083), for projected gradient ascent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from sadt_jax import losses
from sadt_jax.algorithm.perturbation import tree_norm

PyTree = Any
LossFn = Callable[[PyTree], jax.Array]

__all__ = [
    "hessian_top_eigenvalue",
    "hessian_vector_product",
    "model_loss_fn",
    "worst_case_loss_increase",
]


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Inner product of two pytrees, accumulated in float32."""
    leaves = jax.tree.map(lambda x, y: jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32)), a, b)
    return sum(jax.tree.leaves(leaves), jnp.zeros([], jnp.float32))


def _scale(tree: PyTree, s: jax.Array) -> PyTree:
    return jax.tree.map(lambda x: (x * s).astype(x.dtype), tree)


def _normalize(tree: PyTree, eps: float) -> tuple[PyTree, jax.Array]:
    norm = tree_norm(tree)
    return _scale(tree, 1.0 / (norm + eps)), norm


def hessian_vector_product(loss_fn: LossFn, params: PyTree, v: PyTree) -> PyTree:
    r"""The Hessian-vector product :math:`\nabla^2 L(\theta)\, v`, forward-over-reverse.

    Computed as the directional derivative of the gradient,
    ``jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]`` (Pearlmutter, 1994), at
    the cost of about two gradient evaluations and without forming the Hessian.

    Args:
      loss_fn: scalar loss as a function of ``params`` alone.
      params: the point :math:`\theta` (pytree).
      v: the vector, a pytree with the structure and dtypes of ``params``.

    Returns:
      :math:`Hv`, a pytree like ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda p: jnp.sum(p ** 3)
      >>> hessian_vector_product(loss, jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]))
      Array([ 6., 12.], dtype=float32)
    """
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def hessian_top_eigenvalue(
    loss_fn: LossFn,
    params: PyTree,
    *,
    key: jax.Array,
    num_iters: int = 20,
    tol: float = 1e-4,
    eps: float = 1e-12,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""Dominant Hessian eigenvalue by power iteration on Hessian-vector products.

    Starting from a random unit vector :math:`v_0 \sim N(0, I) / \|\cdot\|`
    (drawn from ``key``), iterates

    .. math::

       \lambda_k = v_k^\top H v_k, \qquad v_{k+1} = H v_k / \|H v_k\|_2,

    for at most ``num_iters`` Hessian-vector products, stopping early once
    :math:`|\lambda_k - \lambda_{k-1}| \le \mathrm{tol} \cdot |\lambda_k|`.
    The returned eigenvalue is the Rayleigh quotient :math:`\lambda_k`, so it
    always lies in :math:`[\lambda_{\min}, \lambda_{\max}]` and is accurate to
    second order in the error of :math:`v_k`; ``info["residual"]``
    :math:`= \|H v_k - \lambda_k v_k\|` bounds its distance to an eigenvalue of
    :math:`H` (for symmetric :math:`H`).

    Power iteration converges to the eigenvalue of largest *magnitude*, at the
    rate :math:`|\lambda_2 / \lambda_1|^k`. Near a minimum that is
    :math:`\lambda_{\max} \ge 0`; elsewhere a large negative eigenvalue may win
    (the sign of the result tells which).

    Args:
      loss_fn: scalar loss as a function of ``params`` alone (close over the
        batch; evaluate BatchNorm in inference mode, e.g. with
        :func:`model_loss_fn`).
      params: the point :math:`\theta` (pytree of floating-point arrays).
      key: PRNG key for the random start vector.
      num_iters: maximum number of Hessian-vector products (>= 1).
      tol: relative change of the eigenvalue at which to stop; 0 runs all
        ``num_iters`` iterations.
      eps: added to norms before dividing.

    Returns:
      ``(eigenvalue, info)``: a float32 scalar, and a dict of scalars
      ``num_iters`` (Hessian-vector products computed), ``converged`` (whether
      the ``tol`` criterion was met) and ``residual``
      (:math:`\|H v_k - \lambda_k v_k\|_2`).

    Raises:
      ValueError: if ``num_iters < 1``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> a = jnp.diag(jnp.array([4.0, 1.0, 0.5]))
      >>> loss = lambda p: 0.5 * p @ a @ p
      >>> lam, info = hessian_top_eigenvalue(loss, jnp.ones(3), key=jax.random.key(0))
      >>> round(float(lam), 3)
      4.0

    References:
      Pearlmutter, 1994, "Fast Exact Multiplication by the Hessian".
      Yao et al., 2020, "PyHessian" (arXiv 1912.07145).
    """
    if num_iters < 1:
        raise ValueError(f"hessian_top_eigenvalue: num_iters must be >= 1, got {num_iters}")
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))
    v0 = jax.tree.unflatten(
        treedef,
        [
            jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
            for k, x in zip(keys, leaves, strict=False)
        ],
    )
    v0, _ = _normalize(v0, eps)

    def step(v):
        hv = hessian_vector_product(loss_fn, params, v)
        lam = _vdot(v, hv)
        residual = tree_norm(jax.tree.map(lambda h, x: h - lam * x, hv, v))
        v_next, _ = _normalize(hv, eps)
        return v_next, lam, residual

    def cond(carry):
        i, _, lam, lam_prev, _ = carry
        done = jnp.abs(lam - lam_prev) <= tol * jnp.abs(lam)
        return (i < num_iters) & ~done

    def body(carry):
        i, v, lam, _, _ = carry
        v_next, lam_next, residual = step(v)
        return i + 1, v_next, lam_next, lam, residual

    inf = jnp.full([], jnp.inf, jnp.float32)
    init = (jnp.zeros([], jnp.int32), v0, inf, inf, inf)
    i, _, lam, lam_prev, residual = jax.lax.while_loop(cond, body, init)
    converged = jnp.abs(lam - lam_prev) <= tol * jnp.abs(lam)
    return lam, {"num_iters": i, "converged": converged, "residual": residual}


def worst_case_loss_increase(
    loss_fn: LossFn,
    params: PyTree,
    *,
    rho: float | jax.Array,
    num_steps: int = 1,
    step_size: float | jax.Array | None = None,
    eps: float = 1e-12,
) -> jax.Array:
    r"""Worst-case loss increase within an L2 ball of radius :math:`\rho`.

    The quantity is :math:`\max_{\|\epsilon\|_2 \le \rho} L(\theta + \epsilon) - L(\theta)`
    (the sharpness SAM minimises; Keskar et al.'s :math:`\epsilon`-sharpness up to
    normalisation). The maximum is estimated from below by normalized gradient ascent kept
    inside the ball:

    .. math::

       \epsilon_1 = \rho\, \frac{g_0}{\|g_0\|}, \qquad
       \epsilon_{k+1} = \Pi_\rho\Big(\epsilon_k + \alpha\, \frac{g_k}{\|g_k\|}\Big),
       \qquad g_k = \nabla L(\theta + \epsilon_k),

    where :math:`\Pi_\rho` projects onto :math:`\{\|\epsilon\|_2 \le \rho\}` and
    :math:`\alpha` is ``step_size``. The first step is SAM's first-order
    estimate of the worst-case perturbation (Foret et al., 2021, Eq. 2), so
    ``num_steps=1`` gives :math:`L(\theta + \rho g / \|g\|) - L(\theta)`, the
    "sharpness" SAM minimises. Every iterate lies in the ball and the largest
    increase seen is returned, so the estimate never exceeds the true maximum
    and never decreases as ``num_steps`` grows.

    Args:
      loss_fn: scalar loss as a function of ``params`` alone (evaluation mode,
        e.g. from :func:`model_loss_fn`).
      params: the point :math:`\theta` (pytree of floating-point arrays).
      rho: radius :math:`\rho \ge 0` of the ball (scalar, may be traced).
      num_steps: number of gradient evaluations (>= 1; static).
      step_size: ascent step :math:`\alpha` after the first step; default
        ``rho``.
      eps: added to gradient norms before dividing (a zero gradient gives
        :math:`\epsilon = 0`).

    Returns:
      A float32 scalar: the estimated increase (0 when ``rho == 0``; it can be
      negative only where the first-order estimate itself decreases the loss).

    Raises:
      ValueError: if ``num_steps < 1``.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda p: 0.5 * jnp.sum(p ** 2)
      >>> round(float(worst_case_loss_increase(loss, jnp.array([3.0, 4.0]), rho=1.0)), 3)
      5.5

    References:
      Foret et al., 2021, "SAM" (arXiv 2010.01412).
      Keskar et al., 2017 (arXiv 1609.04836).
      Madry et al., 2018 (arXiv 1706.06083).
    """
    if num_steps < 1:
        raise ValueError(f"worst_case_loss_increase: num_steps must be >= 1, got {num_steps}")
    alpha = rho if step_size is None else step_size
    value_and_grad = jax.value_and_grad(loss_fn)
    base_loss, g0 = value_and_grad(params)
    base_loss = base_loss.astype(jnp.float32)

    def add(e):
        return jax.tree.map(lambda p, x: (p + x).astype(p.dtype), params, e)

    direction, _ = _normalize(g0, eps)
    e1 = _scale(direction, rho)
    if num_steps == 1:
        return loss_fn(add(e1)).astype(jnp.float32) - base_loss

    def body(_, carry):
        e, best = carry
        loss, g = value_and_grad(add(e))
        best = jnp.maximum(best, loss.astype(jnp.float32) - base_loss)
        direction, _ = _normalize(g, eps)
        e = jax.tree.map(lambda x, d: x + alpha * d, e, direction)
        norm = tree_norm(e)
        e = _scale(e, jnp.minimum(1.0, rho / (norm + eps)))
        return e, best

    e, best = jax.lax.fori_loop(0, num_steps - 1, body, (e1, jnp.full([], -jnp.inf, jnp.float32)))
    return jnp.maximum(best, loss_fn(add(e)).astype(jnp.float32) - base_loss)


def model_loss_fn(
    apply_fn: Callable[..., jax.Array],
    variables_without_params: Mapping[str, PyTree],
    batch: Mapping[str, jax.Array],
    *,
    label_smoothing: float = 0.0,
) -> LossFn:
    """Cross-entropy of a flax model on a batch, as a function of its parameters.

    The model runs in **evaluation mode** (``train=False``): BatchNorm uses its
    running statistics (nothing is updated) and dropout is off, so the loss is a
    deterministic function of the parameters, as the measurements in this
    module need.

    Args:
      apply_fn: the flax ``Module.apply`` (e.g. ``state.apply_fn``), taking
        ``(variables, images, train=...)`` and returning logits.
      variables_without_params: the other collections, e.g.
        ``{"batch_stats": ...}`` (``state.model_state``); ``{}`` if none.
      batch: ``{"image": (B, ...), "label": (B,) int or (B, C) soft}``, and
        optionally ``"mask": (B,)`` per-example weights (padding).
      label_smoothing: uniform label smoothing of the cross-entropy.

    Returns:
      ``loss(params) -> scalar``, the batch-mean cross-entropy (float32).

    Example:
      >>> loss = model_loss_fn(state.apply_fn, state.model_state, batch)  # doctest: +SKIP
      >>> lam, _ = hessian_top_eigenvalue(loss, state.params, key=key)  # doctest: +SKIP
    """
    others = dict(variables_without_params)
    if "params" in others:
        raise ValueError("model_loss_fn: pass the variables without 'params'.")
    images, labels, mask = batch["image"], batch["label"], batch.get("mask")

    def loss(params: PyTree) -> jax.Array:
        logits = apply_fn({"params": params, **others}, images, train=False)
        return losses.cross_entropy(logits, labels, label_smoothing=label_smoothing, mask=mask)

    return loss
