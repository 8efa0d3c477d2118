"""Config validation and the workdir guard: fail in one line, before any compute.

:func:`validate_config` checks everything knowable from the config alone (names
of the method, model and dataset included); :func:`validate_against_model` checks
T2's parameter paths against the model's parameter tree (traced, not run), and
:func:`validate_against_data` what needs the dataset size. The first two run
before any data is read or anything is compiled. Every problem is one line of a
:class:`ConfigError` saying what is wrong and how to fix it; several problems are
reported together.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sadt_jax import io, models
from sadt_jax.algorithm.config import sadt_field_errors
from sadt_jax.algorithm.methods import ADAM_EPS_PLACEMENTS, METHODS, OPTIMIZERS
from sadt_jax.algorithm.perturbation import param_paths
from sadt_jax.data import release_order
from sadt_jax.data.augment import CUTMIX_BOXES
from sadt_jax.data.sources import NORMALIZATIONS
from sadt_jax.train import builders, protocol, steps
from sadt_jax.train.workdir import has_checkpoint

__all__ = [
    "ConfigError",
    "flag_error_message",
    "guard_workdir",
    "validate_against_data",
    "validate_against_model",
    "validate_config",
]

# The valid names live where they are used; validation only reads them.
AUGMENTS = steps.AUGMENTS
DTYPES = tuple(builders.DTYPES)
SCHEDULES = builders.SCHEDULES
# Fields that may change when resuming a workdir without --allow_config_change.
RESUMABLE_CHANGES = {"num_epochs", "num_steps", "log_every_steps", "ckpt.async_save"}
# Fields that older versions wrote to config.json and that no longer exist (they did nothing).
REMOVED_FIELDS = {"eval_every_epochs"}


class ConfigError(ValueError):
    """An invalid config; ``str(e)`` has one line per problem."""


def flag_error_message(exc: BaseException, argv: Sequence[str]) -> str:
    """One line saying why parsing ``argv`` (absl flags with ml_collections' config flag) failed.

    Shared by ``sadt_jax.main`` and the suite runner's pre-flight check
    (``experiments.suites.cells.Cell.config_problems``), so both report a bad flag in the
    same words. The cases: an absl flag error (a bad value; a config file that raises
    reaches absl as a traceback inside it, of which only the last line is kept and the
    flag is named), an override naming no field (ml_collections raises
    ``AttributeError``/``KeyError`` with the key; the override is found in ``argv``), a
    config file with a syntax error, and any other error of the file's ``get_config()``.
    """
    from absl import flags

    if isinstance(exc, flags.Error):
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        flag = re.match(r"flag (--\S+?)=", lines[0]) if lines else None
        last = re.sub(r"^[A-Za-z_.]*(Error|Exception): ", "", lines[-1]) if lines else str(exc)
        return f"{flag.group(1)}: {last}" if flag and len(lines) > 1 else last
    if isinstance(exc, (AttributeError, KeyError)):  # --config.<field> naming no field
        msg: object = exc
        while isinstance(msg, BaseException) and msg.args:
            msg = msg.args[0]
        key, *hint = str(msg).splitlines() or [""]
        key = key.strip("'\"")
        names = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        bad = [n for n in names if n.endswith(f".{key}")] or [n for n in names if f".{key}." in n]
        return (
            f"{bad[0] if bad else '--config'}: the config has no field {key!r}"
            + (f" ({' '.join(hint).strip()})" if hint else "")
            + "; unknown keys fail: check the spelling against the config file"
        )
    if isinstance(exc, SyntaxError):  # the config file does not parse
        return f"--config: {exc.filename} line {exc.lineno}: syntax error: {exc.msg}"
    return f"--config: loading the config file failed: {type(exc).__name__}: {exc}"


def _choices(value, valid, field):
    if value not in valid:
        return f"{field}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}"
    return None


def _dataset_error(name: str) -> str | None:
    """``None`` if ``name`` is Fashion-MNIST or a dataset tensorflow-datasets knows.

    Looks the name up in tfds' registry, which does not import TensorFlow (about
    a second), so a typo fails before anything is loaded.
    """
    if name == "fashion_mnist":
        return None
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        return (
            f"data.name={name!r} needs tensorflow-datasets, which is not installed: "
            "`pip install tensorflow-datasets`, or use data.name=fashion_mnist"
        )
    known = tfds.list_builders(with_community_datasets=False)
    base = name.split(":")[0].split("/")[0]
    if base in known:
        return None
    close = difflib.get_close_matches(base, known, n=3)
    suggestions = dict.fromkeys(["fashion_mnist", *close, "cifar10", "cifar100"])
    return (
        f"data.name={name!r} is not a known dataset; choose one of: {', '.join(suggestions)}, "
        "or another tensorflow-datasets name (`tfds.list_builders()` lists them)"
    )


def _model_options_error(config: Any) -> str | None:
    """``None`` if the model accepts the options in ``config.model`` (builds it; no init)."""
    try:
        builders.build_model(config, num_classes=10)
    except TypeError as e:
        if "dropout_rate" in str(e):
            return (
                f"model.dropout_rate={config.model.dropout_rate!r}: model {config.model.name} "
                "has no dropout; set --config.model.dropout_rate=None"
            )
        return f"model {config.model.name} does not take the options in config.model ({e})"
    return None


def validate_config(config: Any) -> None:
    """Checks ranges and names in ``config``; raises :class:`ConfigError` listing each problem."""
    errors: list[str | None] = []
    s = config.sadt

    def rng(value, ok, field, want):
        if value is not None and not ok(value):
            errors.append(f"{field}={value!r} is out of range: it must be {want}")

    errors.append(_choices(config.method, tuple(METHODS), "method"))
    errors.append(_choices(config.model.name, models.MODEL_NAMES, "model.name"))
    if config.model.name in models.MODEL_NAMES and config.model.dtype in DTYPES:
        errors.append(_model_options_error(config))
    errors.append(_dataset_error(config.data.name))
    errors.append(_choices(config.model.dtype, DTYPES, "model.dtype"))
    if config.model.get("pool") is not None:
        errors.append(_choices(config.model.pool, ("max", "avg"), "model.pool"))
    errors.append(_choices(config.data.augment, AUGMENTS, "data.augment"))
    errors.append(_choices(config.optim.optimizer, OPTIMIZERS, "optim.optimizer"))
    errors.append(_choices(config.optim.schedule, SCHEDULES, "optim.schedule"))
    errors.append(
        _choices(
            config.optim.get("adam_eps_placement", "optax"),
            ADAM_EPS_PLACEMENTS,
            "optim.adam_eps_placement",
        )
    )
    errors.extend(sadt_field_errors(s, prefix="sadt."))  # the one home of these checks
    rng(config.optim.learning_rate, lambda v: v > 0, "optim.learning_rate", "> 0")
    errors += _run_range_errors(config)
    rng(config.num_epochs, lambda v: v >= 1, "num_epochs", ">= 1")
    rng(config.get("num_steps"), lambda v: v >= 1, "num_steps", ">= 1")
    rng(config.batch_size, lambda v: v >= 1, "batch_size", ">= 1")
    rng(config.eval_batch_size, lambda v: v >= 1, "eval_batch_size", ">= 1")
    rng(config.teacher_every, lambda v: v >= 1, "teacher_every", ">= 1")
    rng(config.log_every_steps, lambda v: v >= 1, "log_every_steps", ">= 1")
    rng(config.data.cutmix_alpha, lambda v: v > 0, "data.cutmix_alpha", "> 0")
    rng(config.data.num_validation, lambda v: v >= 0, "data.num_validation", ">= 0")
    rng(config.data.get("max_train_examples"), lambda v: v >= 1, "data.max_train_examples", ">= 1")
    rng(config.data.get("max_test_examples"), lambda v: v >= 1, "data.max_test_examples", ">= 1")
    rng(config.ckpt.max_to_keep, lambda v: v >= 1, "ckpt.max_to_keep", ">= 1")
    rng(config.ckpt.every_epochs, lambda v: v >= 1, "ckpt.every_epochs", ">= 1")
    n_dev = jax.device_count()
    for field in ("batch_size", "eval_batch_size"):
        value = config[field]
        if value >= 1 and value % n_dev:
            errors.append(
                f"{field}={value} is not divisible by the {n_dev} devices; "
                f"use a multiple of {n_dev}"
            )
    m = s.get("m_sharpness")
    if m and config.batch_size % n_dev == 0:
        per_device = config.batch_size // n_dev
        if per_device % m:
            errors.append(
                f"sadt.m_sharpness={m} does not divide the per-device batch {per_device} "
                f"(batch_size {config.batch_size} / {n_dev} devices); "
                f"pick a divisor of {per_device}"
            )
    errors += _protocol_errors(config)
    errors = [e for e in errors if e]
    if errors:
        raise ConfigError("\n".join(errors))


def _protocol_errors(config: Any) -> list[str]:
    """Problems of the training protocol's fields (``apply_release`` sets them to the release's)."""
    errors = []
    for section, name, valid, default in (
        ("data", "normalization", NORMALIZATIONS, "standardize"),
        ("data", "order", release_order.ORDERS, "permutation"),
        ("data", "cutmix_partner", protocol.CUTMIX_PARTNERS, "batch"),
        ("data", "cutmix_box", CUTMIX_BOXES, "reference"),
        ("selection", "loss", protocol.SELECTION_LOSSES, "full"),
    ):
        value = protocol.field(config, section, name, default)
        if value not in valid:
            errors.append(
                f"{section}.{name}={value!r} is not valid; choose one of: {', '.join(valid)}"
            )
    integers = (("data", "shuffle_buffer", 1024), ("selection", "first_epoch", 1))
    for section, name, default in integers:
        value = protocol.field(config, section, name, default)
        if not isinstance(value, int) or value < 1:
            errors.append(f"{section}.{name}={value!r} is out of range: it must be an integer >= 1")
    return errors


def _run_range_errors(config: Any) -> list[str]:
    """Range problems of the run's non-method fields (seeds, model, optimizer, thresholds)."""
    o = config.optim
    checks = [
        (config.seed, lambda v: v >= 0, "seed", ">= 0"),
        (config.get("init_seed"), lambda v: v >= 0, "init_seed", ">= 0 (or None = seed)"),
        (config.model.get("dropout_rate"), lambda v: 0 <= v < 1, "model.dropout_rate", "in [0, 1)"),
        (o.decay_rate, lambda v: 0 < v <= 1, "optim.decay_rate", "in (0, 1]"),
        (o.decay_steps, lambda v: v > 0, "optim.decay_steps", "> 0"),
        (o.warmup_epochs, lambda v: v >= 0, "optim.warmup_epochs", ">= 0"),
        (o.momentum, lambda v: 0 <= v < 1, "optim.momentum", "in [0, 1)"),
        (o.weight_decay, lambda v: v >= 0, "optim.weight_decay", ">= 0"),
        (o.adam_eps, lambda v: v > 0, "optim.adam_eps", "> 0"),
        (o.agc_clip, lambda v: v > 0, "optim.agc_clip", "> 0"),
    ]
    errors = [
        f"{field}={value!r} is out of range: it must be {want}"
        for value, ok, field, want in checks
        if value is not None and not ok(value)
    ]
    bad = [t for t in config.accuracy_thresholds if not 0 < t <= 1]
    if bad:
        errors.append(
            f"accuracy_thresholds={tuple(config.accuracy_thresholds)!r} is out of range: "
            "every threshold must be in (0, 1]"
        )
    return errors


def validate_against_data(config: Any, num_train: int) -> None:
    """Checks that need the training-set size: the batch fits, and a kept partial last
    batch (``data.drop_remainder=False``) can be sharded over all devices and processes."""
    if config.batch_size > num_train:
        raise ConfigError(
            f"batch_size={config.batch_size} exceeds the {num_train} training examples; "
            "lower batch_size or raise data.max_train_examples"
        )
    drop_remainder = protocol.field(config, "data", "drop_remainder", True)
    try:
        release_order.check_partial_batch(
            num_train, config.batch_size, jax.device_count(), drop_remainder=drop_remainder
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    m = config.sadt.get("m_sharpness")
    remainder = num_train % config.batch_size
    if m and remainder and not drop_remainder:
        per_device = remainder // jax.device_count()
        if per_device % m:
            raise ConfigError(
                f"sadt.m_sharpness={m} does not divide the partial last batch's {per_device} "
                f"examples per device ({num_train} mod batch_size={config.batch_size}); set "
                "data.drop_remainder=True or pick a batch size whose remainder splits into groups"
            )


def validate_against_model(
    config: Any,
    sadt_config: Any,
    *,
    image_shape: tuple[int, ...] | None = None,
    num_classes: int = 10,
) -> None:
    """Checks T2's parameter paths against the model's parameter tree.

    The tree comes from ``jax.eval_shape`` of ``model.init`` (nothing runs). The
    names of a model's parameters do not depend on the image size or the number
    of classes, so this can run before the data is loaded, with a probe shape.

    Args:
      config: the run's config.
      sadt_config: its resolved :class:`SADTConfig`.
      image_shape: ``(H, W, C)``; default ``(28, 28, 1)`` for Fashion-MNIST, else ``(32, 32, 3)``.
      num_classes: the number of classes to build the model with.
    """
    if not (sadt_config.objective == "sadt" and sadt_config.teachers == "t2"):
        return
    names = ("sadt.t2_multiplicative_path", "sadt.t2_additive_path")
    checked = [(f, p) for f, p in zip(names, sadt_config.t2_paths, strict=True) if p is not None]
    if image_shape is None:
        image_shape = (28, 28, 1) if config.data.name == "fashion_mnist" else (32, 32, 3)
    model = builders.build_model(config, num_classes)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), train=False)
    )
    paths = param_paths(shapes["params"])
    for field, path in checked:
        if path not in paths:
            raise ConfigError(
                f"{field}={path!r} does not exist in model {config.model.name}; "
                f"available paths: {', '.join(paths)}"
            )


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def guard_workdir(config: Any, workdir: str, *, allow_change: bool = False) -> None:
    """Refuses a workdir whose checkpoints belong to a run with a different config.

    Changing only the duration or logging (``RESUMABLE_CHANGES``) is allowed, so
    a finished run can be extended. A workdir without a checkpoint (a run that
    failed before its first save) holds nothing to resume, so any config may
    start there afresh.
    """
    path = os.path.join(workdir, "config.json")
    if allow_change or not has_checkpoint(workdir):
        return
    try:
        stored = io.read_json(path)
    except io.CorruptFileError as e:
        raise ConfigError(
            f"{e}; it records the config of the checkpoints in {workdir}: restore it, or "
            "pass --allow_config_change to resume with the current config"
        ) from None
    if stored is None:
        return
    if not isinstance(stored, dict):
        raise ConfigError(
            f"{path} does not hold a config (a JSON object); restore it, or pass "
            "--allow_config_change to resume with the current config"
        )
    old = json.loads(json.dumps(_flatten(stored), default=str))
    new = _flatten(json.loads(json.dumps(config.to_dict(), default=str)))
    # A key absent on one side counts as None: a field added to the configs later, left at
    # its None default, does not change the run.
    ignored = RESUMABLE_CHANGES | REMOVED_FIELDS
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in ignored)
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:5])
        raise ConfigError(
            f"{workdir} holds a run with a different config ({shown}); use another --workdir, "
            "or pass --allow_config_change to resume it anyway"
        )
