r"""``sadt_update``: one pure training step for SADT and every baseline.

The step, for a batch :math:`(x, y)`, parameters :math:`\theta` and base
optimizer :math:`U` (DESIGN.md, "The algorithm, as released"):

1. Clean pass: :math:`z = f(\theta; x)`, :math:`p = \mathrm{softmax}(z)` held
   constant, :math:`g = \nabla_\theta \mathrm{CE}(z, y)`.
2. First update (``two_updates=True``): :math:`\theta' = \theta + U(g)`;
   otherwise :math:`\theta' = \theta`.
3. Teachers :math:`\theta_k = \theta' + \epsilon_k` (T1: :math:`\rho(g + \sigma\xi)`;
   T2: the two layer teachers; T3: :math:`\sigma \xi`).
4. :math:`g_{KD} = \sum_k \nabla_\phi\, w \tau^2\, \mathrm{KL}(\cdot)\big|_{\phi = \theta_k}`,
   with :math:`\mathrm{KL}(q_k \| p)` (T1, T2) or :math:`\mathrm{KL}(p \| q)` (T3),
   :math:`q_k = \mathrm{softmax}(f(\theta_k; x))` in training mode.
5. :math:`\theta \leftarrow \theta' + U(g + g_{KD})`.

The same function runs the baselines: ``objective="base"`` skips 3–4 (and with
``two_updates=True`` is the *equal-updates control*: a second CE gradient at
:math:`\theta'` and a second update), ``objective="sam"`` replaces
:math:`g + g_{KD}` by :math:`\nabla \mathrm{CE}(\theta' + \epsilon)`.

BatchNorm: by default the running statistics come from the clean pass alone
(as in google-research/sam); ``bn_stats="all"`` reproduces the release, where
every training-mode forward (clean, then each teacher) updates them in turn.

Randomness: ``fold_in(state.key, state.step)`` split into the clean pass's
dropout key, the teachers' dropout keys and the perturbation noise key, so a
step is a pure function of ``(state, batch)``.

Parallelism: under ``jax.jit`` with the batch sharded over a mesh nothing is
needed; under ``pmap`` pass ``axis_name`` and gradients, BatchNorm statistics
and metrics are averaged over it. Perturbations are always formed from the
*global* gradient (no implicit m-sharpness); explicit m-sharpness groups of
``m_sharpness`` examples are formed inside each device's batch, so they do not
depend on the device count as long as ``m_sharpness`` divides the per-device batch.

References:
  Fahim & Boutellier, 2022, "SADT" (arXiv 2211.00310).
  Foret et al., 2021, "SAM" (arXiv 2010.01412), incl. m-sharpness (Sec. 4.1).
  Tarvainen & Valpola, 2017, "Mean teachers" (arXiv 1703.01780), for the EMA teacher.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sadt_jax import losses
from sadt_jax.algorithm.perturbation import (
    NOISE_MODES,
    layer_teachers,
    perturbation,
    tree_add,
    tree_norm,
)
from sadt_jax.algorithm.state import TrainState

PyTree = Any

__all__ = ["SADTConfig", "sadt_update"]

OBJECTIVES = ("base", "sam", "sadt")
TEACHERS = ("t1", "t2", "t3", "ema")
KL_DIRECTIONS = ("teacher_student", "student_teacher")
BN_STATS = ("clean", "all")


@dataclasses.dataclass(frozen=True)
class SADTConfig:
    """Static hyperparameters of :func:`sadt_update` (hashable, bound with ``partial``).

    Attributes:
      objective: ``"base"`` (plain optimizer), ``"sam"`` (gradient at the perturbed
        point replaces ``g``) or ``"sadt"`` (``g + g_KD`` from sampled teachers).
      teachers: for ``"sadt"``: ``"t1"`` (sharpness-aware), ``"t2"`` (two layer
        teachers), ``"t3"`` (noise) or ``"ema"`` (EMA teacher only).
      two_updates: the release's two optimizer updates per batch.
      rho: perturbation radius / scale (float or ``step -> rho`` schedule).
      normalize: bounded perturbation ``rho * g / (||g|| + eps)``.
      adaptive: ASAM scaling; ``adaptive_eta`` is its eta.
      noise_std: std of the Gaussian noise on rank > 1 tensors.
      noise_mode: ``"direction"`` (``rho * (d + std * xi)``) or ``"additive"``
        (``rho * d + std * xi``).
      kl_direction: ``"teacher_student"``: KL(q || p) (T1, T2);
        ``"student_teacher"``: KL(p || q) (T3).
      t2_std: std of T2's noise; ``t2_paths``: (multiplicative, additive) leaf paths.
      temperature: distillation temperature tau (the KD term is scaled by tau^2).
      kd_weight: weight w of each KD term (1 in the release).
      ema_decay: > 0 keeps an EMA teacher in ``state.teacher_state``.
      ema_weight: weight of ``tau^2 KL(q_ema || p_theta)`` added to the clean loss.
      m_sharpness: if > 0, perturb per group of this many examples (per device).
      bn_stats: ``"clean"`` (default) or ``"all"`` (release: teachers update too).
      label_smoothing: label smoothing of the clean cross-entropy.
      eps: epsilon in norms.
    """

    objective: str = "sadt"
    teachers: str = "t1"
    two_updates: bool = True
    rho: float | Callable[[jax.Array], jax.Array] = 1e-3
    normalize: bool = False
    adaptive: bool = False
    adaptive_eta: float = 0.0
    noise_std: float = 1e-4
    noise_mode: str = "direction"
    kl_direction: str = "teacher_student"
    t2_std: float = 0.1
    t2_paths: tuple[str, str] | None = None
    temperature: float = 1.0
    kd_weight: float = 1.0
    ema_decay: float = 0.0
    ema_weight: float = 0.0
    m_sharpness: int = 0
    bn_stats: str = "clean"
    label_smoothing: float = 0.0
    eps: float = 1e-12

    def __post_init__(self):
        def check(ok, msg):
            if not ok:
                raise ValueError(f"SADTConfig: {msg}")

        check(self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}")
        check(self.teachers in TEACHERS, f"teachers must be one of {TEACHERS}")
        check(self.noise_mode in NOISE_MODES, f"noise_mode must be one of {NOISE_MODES}")
        check(self.kl_direction in KL_DIRECTIONS, f"kl_direction must be one of {KL_DIRECTIONS}")
        check(self.bn_stats in BN_STATS, f"bn_stats must be one of {BN_STATS}")
        check(callable(self.rho) or self.rho >= 0, "rho must be >= 0")
        check(self.noise_std >= 0, "noise_std must be >= 0")
        check(self.temperature > 0, "temperature must be > 0")
        check(0 <= self.kd_weight <= 1, "kd_weight must be in [0, 1]")
        check(0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)")
        check(self.m_sharpness >= 0, "m_sharpness must be >= 0")
        check(
            self.teachers != "ema" or self.ema_decay > 0,
            "teachers='ema' needs ema_decay > 0",
        )

    @property
    def uses_ema(self) -> bool:
        return self.ema_decay > 0

    @property
    def second_pass(self) -> str:
        """What the second gradient differentiates: 'none', 'ce' or 'kd'."""
        if self.objective == "sam":
            return "ce"
        if self.objective == "base":
            return "ce" if self.two_updates else "none"
        return "none" if self.teachers == "ema" else "kd"


def _forward(apply_fn, params, model_state, images, key):
    """Training-mode forward; returns (logits, updated model_state)."""
    variables = {"params": params, **model_state}
    if model_state:
        logits, new_state = apply_fn(
            variables, images, train=True, rngs={"dropout": key}, mutable=list(model_state)
        )
        return logits, new_state
    return apply_fn(variables, images, train=True, rngs={"dropout": key}), model_state


def _pmean(tree, axis_name):
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _group(x, m):
    return x.reshape((x.shape[0] // m, m) + x.shape[1:])


def sadt_update(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    config: SADTConfig,
    axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    r"""One SADT (or baseline) step; pure, jittable, ``pmap``-able.

    Args:
      state: the :class:`~sadt_jax.TrainState`.
      batch: ``{"image": (B, ...), "label": (B,) int or (B, C) soft}``.
      config: a :class:`SADTConfig` (static; bind it with ``functools.partial``).
      axis_name: the ``pmap`` axis name to average over, or ``None`` under ``jit``.

    Returns:
      ``(new_state, metrics)`` with scalar metrics ``loss`` (CE + KD terms), ``ce``,
      ``kd``, ``accuracy``, ``grad_norm`` (clean gradient), ``teacher_grad_norm``,
      ``update_norm`` (norm of the total parameter change), ``perturbation_norm``
      (mean over teachers) and ``sharpness`` (teacher CE minus clean CE, mean over
      teachers; 0 without teachers).

    Example:
      >>> import functools, jax
      >>> step = jax.jit(functools.partial(sadt_update, config=SADTConfig()),
      ...                donate_argnums=0)  # doctest: +SKIP
      >>> state, metrics = step(state, batch)  # doctest: +SKIP

    References:
      Fahim & Boutellier, 2022 (arXiv 2211.00310).
    """
    cfg = config
    if cfg.second_pass == "kd" and cfg.teachers == "t2" and cfg.t2_paths is None:
        raise ValueError(
            "SADTConfig: teachers='t2' needs t2_paths=(multiplicative_path, additive_path), "
            "e.g. sadt_jax.models.t2_teacher_paths(model_name)"
        )
    images, labels = batch["image"], batch["label"]
    batch_size = images.shape[0]
    m = cfg.m_sharpness
    grouped = 0 < m < batch_size
    if m > batch_size or (grouped and batch_size % m):
        raise ValueError(
            f"m_sharpness={m} must divide (and not exceed) the per-device batch size {batch_size}; "
            "choose a divisor or set m_sharpness=0"
        )

    step_key = jax.random.fold_in(state.key, state.step)
    k_clean, k_teacher, k_noise = jax.random.split(step_key, 3)
    tau = cfg.temperature
    rho = cfg.rho(state.step) if callable(cfg.rho) else cfg.rho

    # Teacher logits of the EMA teacher (constant), if any.
    ema_logits = None
    if cfg.uses_ema and cfg.ema_weight:
        ema_logits, _ = _forward(
            state.apply_fn, state.teacher_state, state.model_state, images, k_teacher
        )
        ema_logits = jax.lax.stop_gradient(ema_logits)

    # ---- 1. Clean pass ---------------------------------------------------------
    def clean_loss(params, x, y, ema_z, key):
        logits, new_ms = _forward(state.apply_fn, params, state.model_state, x, key)
        ce = losses.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        loss, ema_kd = ce, jnp.zeros([], jnp.float32)
        if ema_z is not None:
            ema_kd = tau**2 * losses.kl_divergence(ema_z, logits, temperature=tau)
            loss = ce + cfg.ema_weight * ema_kd
        return loss, (logits, new_ms, ce, ema_kd)

    clean_grad = jax.grad(clean_loss, has_aux=True)
    if grouped:
        g_groups, (logits, new_ms, ce, ema_kd) = _grouped_clean(
            clean_grad, state.params, images, labels, ema_logits, k_clean, m
        )
        g = jax.tree.map(lambda x: jnp.mean(x, axis=0), g_groups)
        logits = logits.reshape((batch_size,) + logits.shape[2:])
        new_ms = jax.tree.map(lambda x: jnp.mean(x, axis=0), new_ms)
        ce, ema_kd = jnp.mean(ce), jnp.mean(ema_kd)
    else:
        g, (logits, new_ms, ce, ema_kd) = clean_grad(
            state.params, images, labels, ema_logits, k_clean
        )
        g_groups = None
    g = _pmean(g, axis_name)
    new_ms = _pmean(new_ms, axis_name)
    p_logits = jax.lax.stop_gradient(logits)

    # ---- 2. First update --------------------------------------------------------
    opt_state = state.opt_state
    if cfg.two_updates:
        u1, opt_state = state.tx.update(g, opt_state, state.params)
        anchor = optax.apply_updates(state.params, u1)
    else:
        anchor = state.params

    # ---- 3-4. Teachers and the second gradient ---------------------------------
    second = cfg.second_pass
    zero = jnp.zeros([], jnp.float32)
    kd_total, sharp, pert_norm, g2_norm = zero, zero, zero, zero
    if second == "none":
        final = g
    else:

        def second_grad(g_local, x, y, z_clean, ce_clean, ms, key_drop, key_noise):
            """Second gradient for one group; returns (grad, (kd, sharpness, eps_norm, ms))."""
            if cfg.objective == "sadt" and cfg.teachers == "t2":
                mult_path, add_path = cfg.t2_paths
                teacher_params = list(
                    layer_teachers(
                        anchor,
                        key_noise,
                        multiplicative_path=mult_path,
                        additive_path=add_path,
                        std=cfg.t2_std,
                    )
                )
                eps_norms = [
                    tree_norm(jax.tree.map(jnp.subtract, t, anchor)) for t in teacher_params
                ]
            elif second == "ce" and cfg.objective == "base":
                teacher_params, eps_norms = [anchor], [zero]
            else:
                eps_tree = perturbation(
                    g_local,
                    anchor,
                    key_noise,
                    rho=rho,
                    normalize=cfg.normalize,
                    adaptive=cfg.adaptive,
                    adaptive_eta=cfg.adaptive_eta,
                    noise_std=cfg.noise_std,
                    noise_mode=cfg.noise_mode,
                    eps=cfg.eps,
                )
                teacher_params, eps_norms = [tree_add(anchor, eps_tree)], [tree_norm(eps_tree)]

            def teacher_loss(phi, ms_in, key):
                t_logits, ms_out = _forward(state.apply_fn, phi, ms_in, x, key)
                t_ce = losses.cross_entropy(t_logits, y, label_smoothing=cfg.label_smoothing)
                if second == "ce":
                    return t_ce, (t_ce, t_ce, ms_out)
                if cfg.kl_direction == "teacher_student":
                    kl = losses.kl_divergence(t_logits, z_clean, temperature=tau)
                else:
                    kl = losses.kl_divergence(z_clean, t_logits, temperature=tau)
                kd = cfg.kd_weight * tau**2 * kl
                return kd, (kd, t_ce, ms_out)

            total = None
            kd_sum, sharp_sum = zero, zero
            for i, phi in enumerate(teacher_params):
                gk, (kd, t_ce, ms_out) = jax.grad(teacher_loss, has_aux=True)(
                    phi, ms, jax.random.fold_in(key_drop, i)
                )
                if cfg.bn_stats == "all":
                    ms = ms_out
                total = gk if total is None else jax.tree.map(jnp.add, total, gk)
                if second == "kd":
                    kd_sum = kd_sum + kd
                sharp_sum = sharp_sum + (t_ce - ce_clean)
            n = len(teacher_params)
            return total, (kd_sum, sharp_sum / n, sum(eps_norms) / n, ms)

        if grouped:
            groups = batch_size // m
            g2, (kd_total, sharp, pert_norm, ms_after) = jax.vmap(
                second_grad, in_axes=(0, 0, 0, 0, None, 0, 0, 0)
            )(
                g_groups,
                _group(images, m),
                _group(labels, m),
                _group(p_logits, m),
                ce,
                jax.tree.map(lambda x: jnp.broadcast_to(x, (groups,) + x.shape), new_ms),
                jax.random.split(k_teacher, groups),
                jax.random.split(k_noise, groups),
            )
            g2 = jax.tree.map(lambda x: jnp.mean(x, axis=0), g2)
            kd_total, sharp, pert_norm = jnp.mean(kd_total), jnp.mean(sharp), jnp.mean(pert_norm)
            ms_after = jax.tree.map(lambda x: jnp.mean(x, axis=0), ms_after)
        else:
            g2, (kd_total, sharp, pert_norm, ms_after) = second_grad(
                g, images, labels, p_logits, ce, new_ms, k_teacher, k_noise
            )
        g2 = _pmean(g2, axis_name)
        if cfg.bn_stats == "all":
            new_ms = _pmean(ms_after, axis_name)
        g2_norm = tree_norm(g2)
        final = jax.tree.map(jnp.add, g, g2) if second == "kd" else g2

    # ---- 5. Second (or only) update -------------------------------------------
    updates, opt_state = state.tx.update(final, opt_state, anchor)
    new_params = optax.apply_updates(anchor, updates)

    teacher_state = state.teacher_state
    if cfg.uses_ema:
        teacher_state = optax.incremental_update(new_params, teacher_state, 1.0 - cfg.ema_decay)

    metrics = {
        "loss": ce + cfg.ema_weight * ema_kd + kd_total,
        "ce": ce,
        "kd": kd_total + cfg.ema_weight * ema_kd,
        "accuracy": losses.accuracy(logits, labels),
        "grad_norm": tree_norm(g),
        "teacher_grad_norm": g2_norm,
        "update_norm": tree_norm(jax.tree.map(jnp.subtract, new_params, state.params)),
        "perturbation_norm": pert_norm,
        "sharpness": sharp,
    }
    metrics = _pmean(metrics, axis_name)
    new_state = state.replace(
        step=state.step + 1,
        params=new_params,
        model_state=new_ms,
        opt_state=opt_state,
        teacher_state=teacher_state,
    )
    return new_state, metrics


def _grouped_clean(clean_grad, params, images, labels, ema_logits, key, m):
    """Clean gradients per m-sharpness group (vmapped); leading axis = group."""
    groups = images.shape[0] // m
    ema = None if ema_logits is None else _group(ema_logits, m)
    return jax.vmap(clean_grad, in_axes=(None, 0, 0, None if ema is None else 0, 0))(
        params, _group(images, m), _group(labels, m), ema, jax.random.split(key, groups)
    )
