r"""Teachers as values: samplers ``(params, grads, key) -> teacher pytree``.

A *teacher sampler* maps the parameters :math:`\theta'` the teachers start from,
the clean gradient :math:`g` and a PRNG key to a **teacher pytree**: a pytree like
``params`` whose every leaf has a leading *teacher axis* of size :math:`K` (one
slice per teacher). :func:`sadt_jax.sam` evaluates a gradient function at every
slice, so a method's teachers are one value that can be swapped or written anew::

  teacher = sharpness_teacher(1e-3, normalize=False, noise_std=1e-4)   # SADT-T1
  teachers = teacher(params, grads, key)     # leaves of shape (1, *leaf.shape)

Every sampler also accepts ``count=`` (the step, for :math:`\rho` schedules) and
offers ``sample(params, grads, key, count=0) -> (teachers, norms)`` with the
:math:`K` perturbation norms :math:`\|\theta_k - \theta'\|` used as a metric.

===========================  ==========================================================
sampler                       teachers (K)
===========================  ==========================================================
``sharpness_teacher``         :math:`\theta' + \epsilon` (1): SAM's bounded direction,
                              SADT-T1's unbounded one, optional ASAM scaling and noise
``noise_teacher``             :math:`\theta' + \sigma\xi`, :math:`\xi` on rank > 1 leaves (1):
                              SADT-T3
``layer_teacher_pair``        SADT-T2's two layer teachers (2)
``identity_teacher``          :math:`\theta'` itself (1): only a fresh dropout mask differs
                              (R-Drop-like); also the equal-updates control's second pass
``ema_teacher(ema_params)``   the EMA of the parameters (1)
===========================  ==========================================================

References:
  Foret et al., 2021 (arXiv 2010.01412); Kwon et al., 2021 (arXiv 2102.11600);
  Fahim & Boutellier, 2022, "SADT" (arXiv 2211.00310); Liang et al., 2021,
  "R-Drop" (arXiv 2106.14448); Tarvainen & Valpola, 2017 (arXiv 1703.01780).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sadt_jax.algorithm.perturbation import (
    NOISE_MODES,
    NoiseMask,
    layer_teachers,
    perturbation,
    tree_add,
    tree_norm,
)

PyTree = Any
Teacher = Callable[..., PyTree]

__all__ = [
    "Teacher",
    "ema_teacher",
    "identity_teacher",
    "layer_teacher_pair",
    "noise_teacher",
    "num_teachers",
    "sample_teachers",
    "sharpness_teacher",
]


def _stack(*trees: PyTree) -> PyTree:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def num_teachers(teachers: PyTree) -> int:
    """The size K of a teacher pytree's leading axis."""
    return jax.tree.leaves(teachers)[0].shape[0]


class _Sampler:
    """Base: ``__call__`` is ``sample(...)[0]``."""

    def sample(self, params, grads, key, count=0):  # pragma: no cover - overridden
        raise NotImplementedError

    def __call__(self, params: PyTree, grads: PyTree, key: jax.Array, *, count=0) -> PyTree:
        return self.sample(params, grads, key, count)[0]


def sample_teachers(teacher: Teacher, params, grads, key, count=0) -> tuple[PyTree, jax.Array]:
    """``(teachers, norms)`` for any sampler; norms of plain callables are measured."""
    if isinstance(teacher, _Sampler):
        return teacher.sample(params, grads, key, count)
    teachers = teacher(params, grads, key)
    norms = jax.vmap(lambda t: tree_norm(jax.tree.map(jnp.subtract, t, params)))(teachers)
    return teachers, norms


@dataclasses.dataclass(frozen=True)
class sharpness_teacher(_Sampler):  # noqa: N801 - a value used like a function
    r"""One teacher :math:`\theta' + \epsilon` with :math:`\epsilon` from :func:`perturbation`.

    Attributes:
      rho: radius / scale :math:`\rho`, or a schedule ``count -> rho``.
      normalize: bounded SAM direction :math:`g/(\|g\|+\varepsilon)`; ``False``: SADT's
        unbounded :math:`\rho g`.
      adaptive, adaptive_eta: ASAM's element-wise :math:`|w| + \eta` scaling.
      noise_std: :math:`\sigma` of the Gaussian noise (0: none).
      noise_mask: leaves that get noise (default: rank > 1).
      noise_mode: ``"direction"`` (:math:`\rho(d+\sigma\xi)`) or ``"additive"``
        (:math:`\rho d + \sigma\xi`).
      eps: added to norms before dividing.
    """

    rho: float | Callable[[jax.Array], jax.Array] = 0.05
    normalize: bool = True
    adaptive: bool = False
    adaptive_eta: float = 0.0
    noise_std: float = 0.0
    noise_mask: NoiseMask = None
    noise_mode: str = "direction"
    eps: float = 1e-12

    def __post_init__(self):
        if not callable(self.rho) and self.rho < 0:
            raise ValueError(f"rho={self.rho!r} must be >= 0 (it is a radius / step size)")
        if self.noise_std < 0:
            raise ValueError(f"noise_std={self.noise_std!r} must be >= 0")
        if self.noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {self.noise_mode!r}")

    def sample(self, params, grads, key, count=0):
        rho = self.rho(count) if callable(self.rho) else self.rho
        eps_tree = perturbation(
            grads,
            params,
            key,
            rho=rho,
            normalize=self.normalize,
            adaptive=self.adaptive,
            adaptive_eta=self.adaptive_eta,
            noise_std=self.noise_std,
            noise_mask=self.noise_mask,
            noise_mode=self.noise_mode,
            eps=self.eps,
        )
        return _stack(tree_add(params, eps_tree)), jnp.stack([tree_norm(eps_tree)])


def noise_teacher(sigma: float, noise_mask: NoiseMask = None) -> sharpness_teacher:
    r"""SADT-T3's teacher :math:`\theta' + \sigma\xi` (noise on rank > 1 leaves by default)."""
    return sharpness_teacher(0.0, normalize=False, noise_std=sigma, noise_mask=noise_mask,
                             noise_mode="additive")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class layer_teacher_pair(_Sampler):  # noqa: N801
    r"""SADT-T2's two layer teachers (K = 2), both formed from :math:`\theta'`.

    Teacher A multiplies the leaf at ``multiplicative_path`` element-wise by
    :math:`N(0, \text{std}^2)` noise; teacher B adds :math:`N(0, \text{std}^2)` noise
    to the leaf at ``additive_path``. ``additive_path=None`` makes teacher B
    :math:`\theta'` unperturbed (what the release does where its index falls on a
    non-trainable BatchNorm variance). See :func:`layer_teachers`.
    """

    multiplicative_path: str
    additive_path: str | None
    std: float = 0.1

    def __post_init__(self):
        if self.std < 0:
            raise ValueError(f"t2_std={self.std!r} must be >= 0")

    def sample(self, params, grads, key, count=0):
        del grads, count
        pair = layer_teachers(
            params,
            key,
            multiplicative_path=self.multiplicative_path,
            additive_path=self.additive_path,
            std=self.std,
        )
        norms = [tree_norm(jax.tree.map(jnp.subtract, t, params)) for t in pair]
        return _stack(*pair), jnp.stack(norms)


@dataclasses.dataclass(frozen=True)
class identity_teacher(_Sampler):  # noqa: N801
    r"""The teacher :math:`\theta'` itself (K = 1): only its dropout mask differs."""

    def sample(self, params, grads, key, count=0):
        del grads, key, count
        return _stack(params), jnp.zeros([1], jnp.float32)


@dataclasses.dataclass(frozen=True)
class ema_teacher(_Sampler):  # noqa: N801
    r"""The EMA teacher (K = 1): ``ema_params``, whatever ``params`` are.

    Attributes:
      ema_params: the exponential moving average of the parameters (e.g.
        ``state.teacher_state``; update it with ``optax.incremental_update``).
    """

    ema_params: PyTree

    def sample(self, params, grads, key, count=0):
        del grads, key, count
        norm = tree_norm(jax.tree.map(jnp.subtract, self.ema_params, params))
        return _stack(self.ema_params), jnp.stack([norm])
