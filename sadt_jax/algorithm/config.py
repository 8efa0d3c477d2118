r"""A method as one value: :class:`Method`, built once from a :class:`SADTConfig`.

Two shapes of the same thing:

* :class:`SADTConfig` — the *description*: flat, hashable, JSON-friendly fields
  (what ``config.sadt`` on the command line overrides, what a run records);
  :func:`sadt_field_errors` is the one place that range-checks them.
* :class:`Method` — the *value* :func:`sadt_jax.sadt_update` runs: a teacher
  sampler (:mod:`sadt_jax.algorithm.teachers`), the loss of the second gradient
  (a distillation loss or the cross-entropy), whether ``g`` is kept, whether there
  are two updates, the BatchNorm and dropout policies. Every string of the
  description is resolved here, by :func:`build_method`, so nothing in the step
  branches on a name. A user may also build a ``Method`` directly, e.g. with a
  teacher of their own.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax

from sadt_jax import losses
from sadt_jax.algorithm.perturbation import NOISE_MODES
from sadt_jax.algorithm.teachers import (
    Teacher,
    identity_teacher,
    layer_teacher_pair,
    sharpness_teacher,
)

__all__ = [
    "BN_STATS",
    "KL_DIRECTIONS",
    "OBJECTIVES",
    "TEACHERS",
    "TEACHER_DROPOUT",
    "Method",
    "SADTConfig",
    "build_method",
    "cli_fields",
    "sadt_field_errors",
]

OBJECTIVES = ("base", "sam", "sadt")
TEACHERS = ("t1", "t2", "t3", "ema", "identity")
KL_DIRECTIONS = ("teacher_student", "student_teacher")
BN_STATS = ("clean", "all")
TEACHER_DROPOUT = ("fresh", "shared")

_CHOICES = {
    "objective": OBJECTIVES,
    "teachers": TEACHERS,
    "noise_mode": NOISE_MODES,
    "kl_direction": KL_DIRECTIONS,
    "bn_stats": BN_STATS,
    "teacher_dropout": TEACHER_DROPOUT,
}
# field -> (predicate, what it must be)
_RANGES = {
    "rho": (lambda v: callable(v) or v >= 0, ">= 0"),
    "noise_std": (lambda v: v >= 0, ">= 0"),
    "adaptive_eta": (lambda v: v >= 0, ">= 0"),
    "t2_std": (lambda v: v >= 0, ">= 0"),
    "temperature": (lambda v: v > 0, "> 0"),
    "kd_weight": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "kl_clip": (lambda v: 0 <= v < 1, "in [0, 1) (0 = off; Keras uses 1e-7)"),
    "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "ema_weight": (lambda v: v >= 0, ">= 0"),
    "m_sharpness": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "eps": (lambda v: v > 0, "> 0"),
}


def sadt_field_errors(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """One message per invalid value among ``values`` (``None`` values are skipped).

    The single home of the range and name checks of :class:`SADTConfig`'s fields,
    used by ``SADTConfig`` itself and by the run-config validation (with
    ``prefix="sadt."``).

    Args:
      values: field name -> value (unknown names are ignored).
      prefix: prepended to each field name in the messages.

    Returns:
      The messages, e.g. ``"sadt.rho=-1.0 is out of range: it must be >= 0"``.
    """
    errors = []
    for field, valid in _CHOICES.items():
        value = values.get(field)
        if value is not None and value not in valid:
            errors.append(
                f"{prefix}{field}={value!r} is not valid; choose one of: {', '.join(valid)}"
            )
    for field, (ok, want) in _RANGES.items():
        value = values.get(field)
        if value is not None and not ok(value):
            errors.append(f"{prefix}{field}={value!r} is out of range: it must be {want}")
    if values.get("teachers") == "ema" and values.get("ema_decay") == 0:
        errors.append(f"{prefix}teachers='ema' needs {prefix}ema_decay > 0")
    return errors


@dataclasses.dataclass(frozen=True)
class SADTConfig:
    """The description of a method (hashable); :func:`build_method` makes it a :class:`Method`.

    Attributes:
      objective: ``"base"`` (plain optimizer), ``"sam"`` (gradient at the perturbed
        point replaces ``g``) or ``"sadt"`` (``g + g_KD`` from sampled teachers).
      teachers: for ``"sadt"``: ``"t1"`` / ``"t3"`` (the sharpness teacher; T1 and T3
        differ only in the fields below), ``"t2"`` (two layer teachers), ``"ema"`` (EMA
        teacher only) or ``"identity"`` (teacher = theta', only its dropout mask
        differs: R-Drop-like).
      two_updates: the release's two optimizer updates per batch.
      rho: perturbation radius / scale (float or ``step -> rho`` schedule).
      normalize: bounded perturbation ``rho * g / (||g|| + eps)``.
      adaptive: ASAM scaling; ``adaptive_eta`` is its eta.
      noise_std: std of the Gaussian noise on rank > 1 tensors.
      noise_mode: ``"direction"`` (``rho * (d + std * xi)``) or ``"additive"``
        (``rho * d + std * xi``).
      kl_direction: ``"teacher_student"``: KL(q || p) (T1, T2);
        ``"student_teacher"``: KL(p || q) (T3).
      kl_clip: clip both distributions to ``[kl_clip, 1]`` before the KL (Keras uses
        1e-7); 0 = exact KL (default).
      t2_std: std of T2's noise; ``t2_paths``: (multiplicative, additive) leaf paths;
        the additive path may be ``None`` (teacher B = theta' unperturbed).
      temperature: distillation temperature tau (the KD term is scaled by tau^2).
      kd_weight: weight w of each KD term (1 in the release); 0 switches the teachers
        off (the second update then reuses g).
      ema_decay: > 0 keeps an EMA teacher in ``state.teacher_state``.
      ema_weight: weight of ``tau^2 KL(q_ema || p_theta)`` added to the clean loss.
      m_sharpness: if > 0, perturb per group of this many examples (per device).
      bn_stats: ``"clean"`` (default, the release's SADT: teacher passes leave the
        BatchNorm running statistics as the clean pass left them) or ``"all"`` (each
        teacher pass's update is kept, in turn; the release's SAM keeps its
        perturbed pass's update).
      teacher_dropout: ``"fresh"`` (default, as released: each teacher pass draws
        its own dropout mask) or ``"shared"`` (teacher passes reuse the clean pass's
        dropout key, hence its mask).
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
    kl_clip: float = 0.0
    t2_std: float = 0.1
    t2_paths: tuple[str, str | None] | None = None
    temperature: float = 1.0
    kd_weight: float = 1.0
    ema_decay: float = 0.0
    ema_weight: float = 0.0
    m_sharpness: int = 0
    bn_stats: str = "clean"
    teacher_dropout: str = "fresh"
    label_smoothing: float = 0.0
    eps: float = 1e-12

    def __post_init__(self):
        errors = sadt_field_errors(dataclasses.asdict(self))
        if errors:
            raise ValueError("SADTConfig: " + "; ".join(errors))

    @property
    def uses_ema(self) -> bool:
        return self.ema_decay > 0

    @property
    def second_pass(self) -> str:
        """What the second gradient differentiates: 'none', 'ce' or 'kd'."""
        return build_method(self).second_pass

    def build(self) -> Method:
        """``build_method(self)``."""
        return build_method(self)


def cli_fields() -> dict[str, type]:
    """``config.sadt``'s fields and their types, derived from :class:`SADTConfig`.

    Every field but ``eps``, with the type of its default; ``t2_paths`` becomes
    ``t2_multiplicative_path`` and ``t2_additive_path`` (strings).
    """
    out: dict[str, type] = {}
    for f in dataclasses.fields(SADTConfig):
        if f.name == "eps":
            continue
        if f.name == "t2_paths":
            out["t2_multiplicative_path"] = str
            out["t2_additive_path"] = str
        else:
            out[f.name] = type(f.default)
    return out


def _kd_loss(teacher_logits, clean_logits, labels, **kwargs):
    del labels
    return losses.distillation(teacher_logits, clean_logits, **kwargs)


def _ce_loss(teacher_logits, clean_logits, labels, *, label_smoothing):
    del clean_logits
    return losses.cross_entropy(teacher_logits, labels, label_smoothing=label_smoothing)


@dataclasses.dataclass(frozen=True)
class Method:
    """What :func:`sadt_jax.sadt_update` runs: composed values, no names.

    Attributes:
      teacher: a teacher sampler ``(params, grads, key) -> teacher pytree`` or
        ``None`` (one gradient per batch, no teacher pass).
      second_loss: ``(teacher_logits, clean_logits, labels) -> scalar``, the loss
        differentiated at every teacher (a distillation loss, or the cross-entropy
        for SAM and the equal-updates control).
      keep_grads: the second update uses ``g + sum_k grad second_loss`` (SADT);
        ``False``: the teachers' gradient alone (SAM, ``base_2x``).
      two_updates: ``theta' = theta + U(g)`` before the teachers, then a second update.
      thread_bn_stats: each teacher pass's BatchNorm statistics are kept (in turn);
        ``False``: only the clean pass updates them.
      share_dropout: teacher passes reuse the clean pass's dropout key.
      ema_decay: > 0 keeps an EMA teacher in ``state.teacher_state``.
      ema_weight: weight of ``ema_loss(ema_logits, clean_logits)`` in the clean loss.
      ema_loss: the EMA teacher's distillation loss (``None``: no EMA term).
      m_sharpness: if > 0, teachers per group of this many examples (per device).
      label_smoothing: of the clean cross-entropy (and the teachers' CE metric).
    """

    teacher: Teacher | None = None
    second_loss: Callable[..., jax.Array] | None = None
    keep_grads: bool = True
    two_updates: bool = False
    thread_bn_stats: bool = False
    share_dropout: bool = False
    ema_decay: float = 0.0
    ema_weight: float = 0.0
    ema_loss: Callable[..., jax.Array] | None = None
    m_sharpness: int = 0
    label_smoothing: float = 0.0

    @property
    def second_pass(self) -> str:
        """``'none'``, ``'kd'`` (g kept) or ``'ce'`` (replaced) — for reports."""
        if self.teacher is None:
            return "none"
        return "kd" if self.keep_grads else "ce"


def _teacher(cfg: SADTConfig) -> Teacher | None:
    """The teacher sampler a description names (``None``: no teacher pass)."""
    if cfg.objective == "base":
        return identity_teacher() if cfg.two_updates else None
    if cfg.objective == "sadt" and (cfg.teachers == "ema" or cfg.kd_weight == 0):
        return None
    if cfg.objective == "sadt" and cfg.teachers == "identity":
        return identity_teacher()
    if cfg.objective == "sadt" and cfg.teachers == "t2":
        if cfg.t2_paths is None:
            raise ValueError(
                "SADTConfig: teachers='t2' needs t2_paths=(multiplicative_path, additive_path), "
                "e.g. sadt_jax.models.t2_teacher_paths(model_name)"
            )
        return layer_teacher_pair(*cfg.t2_paths, std=cfg.t2_std)
    return sharpness_teacher(
        cfg.rho,
        normalize=cfg.normalize,
        adaptive=cfg.adaptive,
        adaptive_eta=cfg.adaptive_eta,
        noise_std=cfg.noise_std,
        noise_mode=cfg.noise_mode,
        eps=cfg.eps,
    )


@functools.lru_cache(maxsize=256)
def build_method(cfg: SADTConfig) -> Method:
    """The :class:`Method` a :class:`SADTConfig` describes (cached; built once per config).

    Raises:
      ValueError: T2 without ``t2_paths``.
    """
    kd = cfg.objective == "sadt"
    if kd:
        second_loss = functools.partial(
            _kd_loss,
            reverse=cfg.kl_direction == "student_teacher",
            temperature=cfg.temperature,
            weight=cfg.kd_weight,
            clip=cfg.kl_clip,
        )
    else:
        second_loss = functools.partial(_ce_loss, label_smoothing=cfg.label_smoothing)
    ema_loss = None
    if cfg.uses_ema and cfg.ema_weight:
        ema_loss = functools.partial(
            losses.distillation, temperature=cfg.temperature, clip=cfg.kl_clip
        )
    return Method(
        teacher=_teacher(cfg),
        second_loss=second_loss,
        keep_grads=kd,
        two_updates=cfg.two_updates,
        thread_bn_stats=cfg.bn_stats == "all",
        share_dropout=cfg.teacher_dropout == "shared",
        ema_decay=cfg.ema_decay,
        ema_weight=cfg.ema_weight,
        ema_loss=ema_loss,
        m_sharpness=cfg.m_sharpness,
        label_smoothing=cfg.label_smoothing,
    )
