r"""Teacher / adversarial parameter perturbations, as pure functions of pytrees.

One function, :func:`perturbation`, forms every gradient-based perturbation the
project uses; :func:`layer_teachers` forms SADT's T2 "layer" teachers. Both the
optax transformation (:func:`sadt_jax.sam`) and the training step
(:func:`sadt_jax.sadt_update`) call them, so the maths lives in one place.

The perturbation is

.. math::

   \epsilon = \rho \, (d + \sigma \xi)  \quad (\text{noise\_mode}=\text{"direction"})
   \qquad\text{or}\qquad
   \epsilon = \rho \, d + \sigma \xi     \quad (\text{noise\_mode}=\text{"additive"}),

with :math:`\xi \sim N(0, I)` on the leaves selected by ``noise_mask`` (zero
elsewhere) and the direction :math:`d` one of

* unbounded (``normalize=False``): :math:`d = g` — SADT-T1 as released;
* bounded (``normalize=True``): :math:`d = g / (\|g\|_2 + \varepsilon)` — SAM;
* adaptive (``adaptive=True``, ASAM): :math:`d = T^2 g / (\|T g\|_2 + \varepsilon)`
  with :math:`T = |w| + \eta` element-wise (or :math:`T^2 g` when unbounded).

How the paper's teachers are expressed:

* SAM: ``rho=0.05, normalize=True``.
* SADT-T1: ``rho=1e-3, normalize=False, noise_std=1e-4, noise_mode="direction"``
  (:math:`\epsilon = \rho (g + \sigma \xi)`).
* SADT-T3: ``rho=0, noise_std=1e-4, noise_mode="additive"``
  (:math:`\epsilon = \sigma \xi`).

References:
  Foret et al., 2021, "Sharpness-Aware Minimization for Efficiently Improving
  Generalization" (arXiv 2010.01412).
  Kwon et al., 2021, "ASAM: Adaptive Sharpness-Aware Minimization"
  (arXiv 2102.11600).
  Fahim & Boutellier, 2022, "SADT" (arXiv 2211.00310).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
NoiseMask = PyTree | Callable[[PyTree], PyTree] | None

__all__ = [
    "default_noise_mask",
    "layer_teachers",
    "param_paths",
    "perturbation",
    "tree_add",
    "tree_norm",
    "tree_scale",
]

NOISE_MODES = ("direction", "additive")


def tree_norm(tree: PyTree) -> jax.Array:
    """Global L2 norm of a pytree, accumulated in float32."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros([], jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    """Leaf-wise ``a + b``, keeping ``a``'s dtypes."""
    return jax.tree.map(lambda x, y: (x + y).astype(x.dtype), a, b)


def tree_scale(tree: PyTree, scale: jax.Array | float) -> PyTree:
    """Leaf-wise ``scale * tree``, keeping dtypes."""
    return jax.tree.map(lambda x: (scale * x).astype(x.dtype), tree)


def default_noise_mask(params: PyTree) -> PyTree:
    """The release's noise mask: Gaussian noise only on tensors of rank > 1 (kernels)."""
    return jax.tree.map(lambda x: jnp.ndim(x) > 1, params)


def _resolve_mask(noise_mask: NoiseMask, params: PyTree) -> PyTree:
    if noise_mask is None:
        return default_noise_mask(params)
    if callable(noise_mask):
        return noise_mask(params)
    return noise_mask


def _gaussian_like(key: jax.Array, tree: PyTree, mask: PyTree) -> PyTree:
    """Standard normal noise on masked leaves, zeros elsewhere; one key per leaf."""
    leaves, treedef = jax.tree.flatten(tree)
    mask_leaves = treedef.flatten_up_to(mask)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for k, leaf, on in zip(keys, leaves, mask_leaves, strict=True):
        if on:
            out.append(jax.random.normal(k, jnp.shape(leaf), jnp.result_type(leaf)))
        else:
            out.append(jnp.zeros_like(leaf))
    return jax.tree.unflatten(treedef, out)


def perturbation(
    grads: PyTree,
    params: PyTree,
    key: jax.Array | None,
    *,
    rho: float | jax.Array,
    normalize: bool = True,
    adaptive: bool = False,
    adaptive_eta: float = 0.0,
    noise_std: float = 0.0,
    noise_mask: NoiseMask = None,
    noise_mode: str = "direction",
    eps: float = 1e-12,
) -> PyTree:
    r"""Returns the perturbation :math:`\epsilon` (a pytree like ``params``).

    Args:
      grads: the clean gradient :math:`g` (pytree like ``params``).
      params: the parameters the perturbation is added to (used by ASAM's scaling).
      key: PRNG key for the noise; may be ``None`` when ``noise_std == 0``.
      rho: radius / step size :math:`\rho` (scalar, may be traced).
      normalize: divide the direction by its global norm plus ``eps`` (SAM);
        ``False`` is SADT's "unbounded" form.
      adaptive: ASAM's element-wise scaling by :math:`|w| + \eta`.
      adaptive_eta: ASAM's :math:`\eta`.
      noise_std: :math:`\sigma`, std of the Gaussian noise; 0 disables it.
      noise_mask: pytree of bools (or a function of ``params`` returning one)
        selecting the leaves that receive noise; default: leaves of rank > 1.
      noise_mode: ``"direction"`` (noise added to the direction before scaling by
        :math:`\rho`, SADT-T1) or ``"additive"`` (noise added after, SADT-T3).
      eps: added to the norm before dividing, so a zero gradient gives a zero
        direction instead of NaN.

    Returns:
      The perturbation pytree, with the dtypes of ``params``.
    """
    if noise_mode not in NOISE_MODES:
        raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
    if noise_std and noise_mode == "additive" and isinstance(rho, int | float) and rho == 0:
        # SADT-T3's pure-noise teacher: skip the direction (its norm and scaling are
        # multiplied by a literal 0, which XLA may not fold away for floats).
        if key is None:
            raise ValueError("perturbation: noise_std > 0 needs a PRNG key.")
        noise = _gaussian_like(key, params, _resolve_mask(noise_mask, params))
        return jax.tree.map(lambda n, p: (noise_std * n).astype(p.dtype), noise, params)
    if adaptive:
        scale = jax.tree.map(lambda w: jnp.abs(w) + adaptive_eta, params)
        direction = jax.tree.map(lambda t, g: t * t * g, scale, grads)
        norm_source = jax.tree.map(lambda t, g: t * g, scale, grads)
    else:
        direction = grads
        norm_source = grads
    if normalize:
        inv = 1.0 / (tree_norm(norm_source) + eps)
        direction = jax.tree.map(lambda d: d * inv.astype(d.dtype), direction)
    if noise_std:
        if key is None:
            raise ValueError("perturbation: noise_std > 0 needs a PRNG key.")
        noise = _gaussian_like(key, params, _resolve_mask(noise_mask, params))
        noise = tree_scale(noise, noise_std)
        if noise_mode == "direction":
            return jax.tree.map(
                lambda d, n, p: (rho * (d + n)).astype(p.dtype), direction, noise, params
            )
        return jax.tree.map(lambda d, n, p: (rho * d + n).astype(p.dtype), direction, noise, params)
    return jax.tree.map(lambda d, p: (rho * d).astype(p.dtype), direction, params)


def _path_str(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def param_paths(params: PyTree) -> list[str]:
    """The '/'-joined paths of every leaf, e.g. ``['conv1/bias', 'conv1/kernel', ...]``."""
    return [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _check_path(params: PyTree, path: str) -> None:
    paths = param_paths(params)
    if path not in paths:
        raise ValueError(
            f"parameter path {path!r} does not exist in the model; available: {', '.join(paths)}"
        )


def layer_teachers(
    params: PyTree,
    key: jax.Array,
    *,
    multiplicative_path: str,
    additive_path: str | None,
    std: float = 0.1,
) -> tuple[PyTree, PyTree]:
    r"""SADT-T2's two "layer" teachers, each formed from ``params`` alone.

    * Teacher A multiplies the leaf at ``multiplicative_path`` (the output layer's
      bias in the release) element-wise by noise drawn from :math:`N(0, \text{std}^2)`.
    * Teacher B adds :math:`N(0, \text{std}^2)` noise to the leaf at
      ``additive_path`` (a per-model "salient" tensor; the release's simple CNN
      uses the second convolution's bias).

    Every other leaf is shared with ``params``. Teacher B starts from ``params``,
    not from teacher A. With ``additive_path=None`` teacher B is ``params``
    unperturbed — what the release does for models where its index of B's tensor
    falls on a non-trainable BatchNorm running variance (restored after the pass).

    Args:
      params: parameters :math:`\theta'` the teachers start from.
      key: PRNG key (split into one key per teacher).
      multiplicative_path: '/'-joined path of teacher A's leaf.
      additive_path: '/'-joined path of teacher B's leaf, or ``None`` (B = ``params``).
      std: noise standard deviation (0.1 in the release).

    Returns:
      ``(teacher_a, teacher_b)``, pytrees like ``params``.

    Raises:
      ValueError: if a path does not exist (the message lists the valid paths).
    """
    _check_path(params, multiplicative_path)
    if additive_path is not None:
        _check_path(params, additive_path)
    key_a, key_b = jax.random.split(key)

    def teacher(path: str, k: jax.Array, combine):
        def f(p, leaf):
            if _path_str(p) != path:
                return leaf
            noise = std * jax.random.normal(k, leaf.shape, leaf.dtype)
            return combine(leaf, noise).astype(leaf.dtype)

        return jax.tree_util.tree_map_with_path(f, params)

    teacher_a = teacher(multiplicative_path, key_a, lambda w, n: w * n)
    if additive_path is None:
        return teacher_a, params
    teacher_b = teacher(additive_path, key_b, lambda w, n: w + n)
    return teacher_a, teacher_b
