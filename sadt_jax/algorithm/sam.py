r"""``sam``: the sharpness-aware / teacher-sampling gradient transformation.

``sam(...)`` is an :class:`optax.GradientTransformationExtraArgs`. Given the
clean gradient :math:`g` at :math:`\theta`, it forms the perturbed ("teacher")
parameters :math:`\theta + \epsilon` (see
:func:`sadt_jax.algorithm.perturbation.perturbation` for every form of
:math:`\epsilon`), calls ``grad_fn`` there exactly once, and returns

* that gradient :math:`\nabla L(\theta + \epsilon)` (SAM), or
* :math:`g + \nabla L(\theta + \epsilon)` when ``keep_grads=True`` (SADT's
  :math:`g + g_{KD}`, where ``grad_fn`` differentiates the distillation loss).

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

from sadt_jax.algorithm.perturbation import NoiseMask, perturbation, tree_add

__all__ = ["SAMState", "sam"]


class SAMState(NamedTuple):
    """State of :func:`sam`.

    Attributes:
      count: number of ``update`` calls so far (int32), indexes ρ schedules and noise.
      key: base PRNG key; the step's key is ``fold_in(key, count)``.
    """

    count: jax.Array
    key: jax.Array


def sam(
    rho: float | Callable[[jax.Array], jax.Array],
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
) -> optax.GradientTransformationExtraArgs:
    r"""Sharpness-aware / teacher-sampling gradient transformation.

    Args:
      rho: perturbation radius :math:`\rho`, or an optax-style schedule
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
      keep_grads: return ``grads + grad_fn(params + eps)`` instead of
        ``grad_fn(params + eps)``.
      eps: epsilon added to norms before dividing.
      seed: seed of the noise key stored in the state.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
      ``(grads, state, params, *, grad_fn, **ignored)``; ``grad_fn(perturbed_params)``
      must return a pytree like ``params``.

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

    def init_fn(params: Any) -> SAMState:
        del params
        return SAMState(count=jnp.zeros([], jnp.int32), key=jax.random.PRNGKey(seed))

    def update_fn(updates, state: SAMState, params=None, *, grad_fn=None, **extra_args):
        del extra_args  # Unknown extras are ignored so the transform composes in chains.
        if params is None:
            raise ValueError("sadt_jax.sam: update() needs `params` to form the perturbation.")
        if grad_fn is None:
            raise ValueError(
                "sadt_jax.sam: update() needs the keyword argument grad_fn=f, "
                "where f(perturbed_params) returns a gradient pytree."
            )
        rho_t = rho(state.count) if callable(rho) else rho
        key = jax.random.fold_in(state.key, state.count)
        eps_tree = perturbation(
            updates,
            params,
            key,
            rho=rho_t,
            normalize=normalize,
            adaptive=adaptive,
            adaptive_eta=adaptive_eta,
            noise_std=noise_std,
            noise_mask=noise_mask,
            noise_mode=noise_mode,
            eps=eps,
        )
        teacher_grads = grad_fn(tree_add(params, eps_tree))
        out = tree_add(updates, teacher_grads) if keep_grads else teacher_grads
        return out, SAMState(count=optax.safe_increment(state.count), key=state.key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
