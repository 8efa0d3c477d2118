r"""``sadt_update``: one pure training step for SADT and every baseline.

The step, for a batch :math:`(x, y)`, parameters :math:`\theta` and base
optimizer :math:`U` (the algorithm as released; API in ``docs/api.md``):

1. Clean pass: :math:`z = f(\theta; x)`, :math:`p = \mathrm{softmax}(z)` held
   constant, :math:`g = \nabla_\theta \mathrm{CE}(z, y)`.
2. First update (``two_updates=True``): :math:`\theta' = \theta + U(g)`;
   otherwise :math:`\theta' = \theta`.
3. Teachers :math:`\theta_k`, sampled from :math:`(\theta', g, \text{key})` by the
   method's teacher sampler (T1: :math:`\theta' + \rho(g + \sigma\xi)`; T2: the two
   layer teachers; T3: :math:`\theta' + \sigma \xi`; R-Drop: :math:`\theta'`).
4. :math:`g_{KD} = \sum_k \nabla_\phi\, w \tau^2\, \mathrm{KL}(\cdot)\big|_{\phi = \theta_k}`,
   with :math:`\mathrm{KL}(q_k \| p)` (T1, T2) or :math:`\mathrm{KL}(p \| q)` (T3),
   :math:`q_k = \mathrm{softmax}(f(\theta_k; x))` in training mode.
5. :math:`\theta \leftarrow \theta' + U(g + g_{KD})`.

Steps 3–4 are :func:`sadt_jax.algorithm.sam.teacher_gradients` — the function
behind the ``sam`` transformation — with the distillation gradient as its
``grad_fn``. The method is one value, a :class:`~sadt_jax.algorithm.config.Method`
(teacher sampler, second-pass loss, flags), built once from a :class:`SADTConfig`;
the same function runs the baselines: no teacher (``base``), the identity teacher
with the CE loss and ``g`` replaced (the *equal-updates control* ``base_2x``), the
sharpness teacher with the CE loss (``sam``: :math:`\nabla \mathrm{CE}(\theta' + \epsilon)`).

BatchNorm: by default (``bn_stats="clean"``) the running statistics come from the
clean pass alone — the release's SADT, which restores every weight, running
statistics included, after each teacher pass; ``bn_stats="all"`` keeps each
teacher pass's update in turn (what the release's SAM does with its perturbed pass).

Randomness: ``fold_in(state.key, state.step)`` split into the clean pass's
dropout key, the teachers' dropout keys (teacher ``k``: ``fold_in(key, k)``, or the
clean key with ``teacher_dropout="shared"``) and the perturbation noise key, so a
step is a pure function of ``(state, batch)`` (:func:`step_keys`). Under ``pmap``
the device index (``lax.axis_index``) is folded into both dropout keys, so every
device draws its own masks; the noise key is not, so every replica forms the same
teachers from the same averaged gradient. Under ``jit`` (also with the batch
sharded over a mesh) one mask is drawn for the whole batch: a different, equally
valid random stream. :func:`sadt_update_sharded` reproduces a ``pmap`` run of
``n`` devices under ``jit`` (``vmap`` over ``n`` shards with a named axis: the same
per-shard keys, per-shard BatchNorm statistics, averaged gradients).

The ``apply_fn`` contract: ``apply_fn(variables, images, train=True,
rngs={"dropout": key}, mutable=[...])`` where ``variables = {"params": ...,
**model_state}``; with a non-empty ``model_state`` (e.g. ``{"batch_stats": ...}``)
it is called with ``mutable=list(model_state)`` and must return
``(logits, new_model_state)``, else it returns the logits. flax.linen modules
whose ``__call__`` takes ``train`` and uses ``nn.Dropout``/``nn.BatchNorm``
meet it (``model.apply``).

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

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sadt_jax import losses
from sadt_jax.algorithm.config import (
    BN_STATS,
    KL_DIRECTIONS,
    OBJECTIVES,
    TEACHERS,
    Method,
    SADTConfig,
    build_method,
)
from sadt_jax.algorithm.perturbation import tree_norm
from sadt_jax.algorithm.sam import teacher_gradients
from sadt_jax.algorithm.state import TrainState

PyTree = Any

__all__ = [
    "BN_STATS",
    "KL_DIRECTIONS",
    "OBJECTIVES",
    "TEACHERS",
    "SADTConfig",
    "sadt_update",
    "sadt_update_sharded",
    "step_keys",
]


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


def _mean0(tree):
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)


def step_keys(
    key: jax.Array, step: jax.Array, axis_name: str | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(clean_dropout_key, teacher_dropout_key, noise_key)`` of a step.

    ``fold_in(key, step)`` split in three; with ``axis_name`` (``pmap`` or a named
    ``vmap``) the device / shard index is folded into the two dropout keys.
    """
    k_clean, k_teacher, k_noise = jax.random.split(jax.random.fold_in(key, step), 3)
    if axis_name is not None:
        device = jax.lax.axis_index(axis_name)
        k_clean, k_teacher = (jax.random.fold_in(k, device) for k in (k_clean, k_teacher))
    return k_clean, k_teacher, k_noise


def _check(method: Method, state: TrainState, batch_size: int) -> bool:
    """Static checks; returns whether the batch is split into m-sharpness groups."""
    m = method.m_sharpness
    if m > batch_size or (0 < m < batch_size and batch_size % m):
        raise ValueError(
            f"m_sharpness={m} must divide (and not exceed) the per-device batch size {batch_size}; "
            "choose a divisor or set m_sharpness=0"
        )
    if method.ema_decay > 0 and not jax.tree.leaves(state.teacher_state):
        raise ValueError(
            "this method keeps an EMA teacher (ema_decay > 0) but state.teacher_state is empty; "
            "create the state with TrainState.create(..., ema_teacher=True)"
        )
    return 0 < m < batch_size


def sadt_update(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    config: SADTConfig | Method,
    axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    r"""One SADT (or baseline) step; pure, jittable, ``pmap``-able.

    Args:
      state: the :class:`~sadt_jax.TrainState`; ``state.apply_fn`` must meet the
        contract in this module's docstring (``train=``, the ``"dropout"`` RNG stream
        via ``rngs=``, ``mutable=`` for the ``model_state`` collections).
      batch: ``{"image": (B, ...), "label": (B,) int or (B, C) soft}``.
      config: a :class:`SADTConfig` (built into a :class:`Method` once, cached) or a
        :class:`Method` (static; bind it with ``functools.partial``).
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
    method = config if isinstance(config, Method) else build_method(config)
    images, labels = batch["image"], batch["label"]
    batch_size, m = images.shape[0], method.m_sharpness
    grouped = _check(method, state, batch_size)
    k_clean, k_teacher, k_noise = step_keys(state.key, state.step, axis_name)
    ema_logits = None
    if method.ema_loss is not None:
        ema_logits, _ = _forward(
            state.apply_fn, state.teacher_state, state.model_state, images, k_teacher
        )
        ema_logits = jax.lax.stop_gradient(ema_logits)

    # 1. Clean gradient (per m-sharpness group, if any).
    clean_loss = functools.partial(
        _clean_loss, method=method, apply_fn=state.apply_fn, model_state=state.model_state
    )
    clean_grad = jax.grad(clean_loss, has_aux=True)
    if grouped:
        groups = batch_size // m
        k_clean = jax.random.split(k_clean, groups)
        ema = None if ema_logits is None else _group(ema_logits, m)
        g_local, (logits, new_ms, ce, ema_kd) = jax.vmap(
            clean_grad, in_axes=(None, 0, 0, None if ema is None else 0, 0)
        )(state.params, _group(images, m), _group(labels, m), ema, k_clean)
        g, new_ms, ce, ema_kd = _mean0((g_local, new_ms, ce, ema_kd))
        logits = logits.reshape((batch_size,) + logits.shape[2:])
    else:
        g, (logits, new_ms, ce, ema_kd) = clean_grad(
            state.params, images, labels, ema_logits, k_clean
        )
    g, new_ms = _pmean((g, new_ms), axis_name)
    if not grouped:  # teachers from the global gradient
        g_local = g

    # 2. Optional first update.
    opt_state = state.opt_state
    if method.two_updates:
        u1, opt_state = state.tx.update(g, opt_state, state.params)
        anchor = optax.apply_updates(state.params, u1)
    else:
        anchor = state.params

    # 3-4. The teachers' gradient (the `sam` transformation's core).
    zero = jnp.zeros([], jnp.float32)
    kd, sharp, pert_norm, g2_norm, final = zero, zero, zero, zero, g
    if method.teacher is not None:
        args = (g_local, images, labels, jax.lax.stop_gradient(logits), new_ms)
        args += (k_clean, k_teacher, k_noise)
        fn = lambda *a: _second_grad(method, state, anchor, ce, *a)  # noqa: E731
        if grouped:
            grouped_args = (*(_group(x, m) for x in args[1:4]),)
            keys = (k_clean, jax.random.split(k_teacher, groups), jax.random.split(k_noise, groups))
            g2, (kd, sharp, pert_norm, ms_after) = _mean0(
                jax.vmap(fn, in_axes=(0, 0, 0, 0, None, 0, 0, 0))(
                    g_local, *grouped_args, new_ms, *keys
                )
            )
        else:
            g2, (kd, sharp, pert_norm, ms_after) = fn(*args)
        g2 = _pmean(g2, axis_name)
        if method.thread_bn_stats:
            new_ms = _pmean(ms_after, axis_name)
        g2_norm = tree_norm(g2)
        final = jax.tree.map(jnp.add, g, g2) if method.keep_grads else g2
        kd = kd if method.keep_grads else zero

    # 5. The second (or only) update.
    updates, opt_state = state.tx.update(final, opt_state, anchor)
    new_params = optax.apply_updates(anchor, updates)
    teacher_state = state.teacher_state
    if method.ema_decay > 0:
        teacher_state = optax.incremental_update(new_params, teacher_state, 1.0 - method.ema_decay)

    metrics = {
        "loss": ce + method.ema_weight * ema_kd + kd,
        "ce": ce,
        "kd": kd + method.ema_weight * ema_kd,
        "accuracy": losses.accuracy(logits, labels),
        "grad_norm": tree_norm(g),
        "teacher_grad_norm": g2_norm,
        "update_norm": tree_norm(jax.tree.map(jnp.subtract, new_params, state.params)),
        "perturbation_norm": pert_norm,
        "sharpness": sharp,
    }
    new_state = state.replace(
        step=state.step + 1,
        params=new_params,
        model_state=new_ms,
        opt_state=opt_state,
        teacher_state=teacher_state,
    )
    return new_state, _pmean(metrics, axis_name)


def sadt_update_sharded(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    config: SADTConfig | Method,
    num_shards: int,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """:func:`sadt_update` as ``pmap`` over ``num_shards`` devices would run it, under ``jit``.

    The batch is split into ``num_shards`` consecutive shards (as a per-device
    reshape does) and the step is ``vmap``-ed over them with a named axis, so every
    shard draws the dropout masks device ``i`` would, BatchNorm statistics are
    per shard and then averaged, and gradients are averaged — the ``pmap`` step's
    result on the same global batch, on one device.

    Args:
      state: the (unreplicated) state.
      batch: the global batch; its size must be divisible by ``num_shards``.
      config: as for :func:`sadt_update`.
      num_shards: the number of devices to reproduce.

    Returns:
      ``(new_state, metrics)`` as :func:`sadt_update`.
    """
    size = batch["image"].shape[0]
    if size % num_shards:
        raise ValueError(f"batch size {size} is not divisible by num_shards={num_shards}")
    shards = jax.tree.map(lambda x: x.reshape((num_shards, -1) + x.shape[1:]), batch)
    step = functools.partial(sadt_update, config=config, axis_name="shards")
    out = jax.vmap(step, in_axes=(None, 0), axis_name="shards")(state, shards)
    return jax.tree.map(lambda x: x[0], out)


def _clean_loss(params, x, y, ema_logits, key, *, method, apply_fn, model_state):
    """Clean CE (+ the EMA teacher's term); aux = (logits, model_state, ce, ema_kd)."""
    logits, new_ms = _forward(apply_fn, params, model_state, x, key)
    ce = losses.cross_entropy(logits, y, label_smoothing=method.label_smoothing)
    loss, ema_kd = ce, jnp.zeros([], jnp.float32)
    if ema_logits is not None:
        ema_kd = method.ema_loss(ema_logits, logits)
        loss = ce + method.ema_weight * ema_kd
    return loss, (logits, new_ms, ce, ema_kd)


def _second_grad(method, state, anchor, ce_clean, g, x, y, p_logits, ms, k_clean, k_drop, k_noise):
    """The teachers' summed gradient for one group: ``(g2, (kd, sharpness, eps_norm, ms))``."""

    def grad_fn(phi, index, ms_in):
        key = k_clean if method.share_dropout else jax.random.fold_in(k_drop, index)

        def loss(phi):
            t_logits, ms_out = _forward(state.apply_fn, phi, ms_in, x, key)
            t_ce = losses.cross_entropy(t_logits, y, label_smoothing=method.label_smoothing)
            value = method.second_loss(t_logits, p_logits, y)
            return value, (value, t_ce, ms_out)

        g_k, (value, t_ce, ms_out) = jax.grad(loss, has_aux=True)(phi)
        return g_k, (ms_out if method.thread_bn_stats else ms_in), (value, t_ce - ce_clean)

    out = teacher_gradients(grad_fn, method.teacher, g, anchor, k_noise, count=state.step, carry=ms)
    values, sharpness = out.aux
    return out.grads, (
        jnp.sum(values),
        jnp.mean(sharpness),
        jnp.mean(out.perturbation_norms),
        out.carry,
    )
