"""Config validation: every bad value is one line of a ConfigError, raised before any compute.

In-process calls to :func:`validate_config` / :func:`validate_against_model` for
each rule, one :func:`train_and_evaluate` call showing the order (config before
data), and CLI runs checking exit code 2, one ``error:`` line per problem, and
that nothing was loaded or written.
"""

from __future__ import annotations

import json
import os

import cli_runs
import jax
import pytest

from configs import cifar10, fashion_mnist
from sadt_jax.train import ConfigError, train_and_evaluate, validation
from sadt_jax.train.builders import resolve_sadt_config


def _config(method="sadt_t1", /, **overrides):
    config = fashion_mnist.get_config(method)
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sadt.rho": -1e-3}, "sadt.rho=-0.001 is out of range: it must be >= 0"),
        ({"sadt.noise_std": -1.0}, "sadt.noise_std=-1.0 is out of range: it must be >= 0"),
        ({"sadt.temperature": 0.0}, "sadt.temperature=0.0 is out of range: it must be > 0"),
        ({"sadt.kd_weight": 1.5}, "sadt.kd_weight=1.5 is out of range: it must be in [0, 1]"),
        ({"sadt.kd_weight": -0.1}, "sadt.kd_weight=-0.1 is out of range: it must be in [0, 1]"),
        ({"sadt.ema_decay": 1.0}, "sadt.ema_decay=1.0 is out of range: it must be in [0, 1)"),
        ({"sadt.ema_decay": -0.5}, "sadt.ema_decay=-0.5 is out of range: it must be in [0, 1)"),
        (
            {"optim.learning_rate": 0.0},
            "optim.learning_rate=0.0 is out of range: it must be > 0",
        ),
        ({"num_epochs": 0}, "num_epochs=0 is out of range: it must be >= 1"),
        ({"model.name": "resnet"}, "model.name='resnet' is not valid; choose one of: simple_cnn"),
        ({"method": "sadt_t4"}, "method='sadt_t4' is not valid; choose one of: base, gc"),
        (
            {"data.name": "cifar_10"},
            "data.name='cifar_10' is not a known dataset; choose one of: fashion_mnist",
        ),
        ({"sadt.teachers": "t9"}, "sadt.teachers='t9' is not valid; choose one of: t1, t2, t3"),
        ({"seed": -1}, "seed=-1 is out of range: it must be >= 0"),
        ({"init_seed": -2}, "init_seed=-2 is out of range: it must be >= 0"),
        (
            {"model.dropout_rate": 1.5},
            "model.dropout_rate=1.5 is out of range: it must be in [0, 1)",
        ),
        ({"optim.decay_rate": -1.0}, "optim.decay_rate=-1.0 is out of range: it must be in (0, 1]"),
        ({"optim.decay_steps": 0}, "optim.decay_steps=0 is out of range: it must be > 0"),
        ({"optim.warmup_epochs": -1.0}, "optim.warmup_epochs=-1.0 is out of range"),
        ({"optim.momentum": 1.0}, "optim.momentum=1.0 is out of range: it must be in [0, 1)"),
        ({"optim.weight_decay": -1e-4}, "optim.weight_decay=-0.0001 is out of range"),
        ({"optim.adam_eps": 0.0}, "optim.adam_eps=0.0 is out of range: it must be > 0"),
        ({"optim.agc_clip": 0.0}, "optim.agc_clip=0.0 is out of range: it must be > 0"),
        ({"accuracy_thresholds": (0.5, 90.0)}, "accuracy_thresholds=(0.5, 90.0) is out of range"),
        (
            {"model.name": "resnet18", "model.dropout_rate": 0.3},
            "model.dropout_rate=0.3: model resnet18 has no dropout; set "
            "--config.model.dropout_rate=None",
        ),
    ],
)
def test_each_bad_value_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        validation.validate_config(_config(**overrides))
    (line,) = str(e.value).splitlines()
    assert line.startswith(message), line


def test_good_configs_pass():
    for method in ("base", "sam", "sadt_t1", "sadt_t2", "sadt_t3", "sadt_ema"):
        config = _config(method)
        validation.validate_config(config)
        validation.validate_against_model(config, resolve_sadt_config(config))
    validation.validate_config(cifar10.get_config("sadt_t1"))


def test_several_problems_are_reported_together():
    config = _config(**{"sadt.rho": -1.0, "sadt.temperature": -1.0, "num_epochs": 0})
    with pytest.raises(ConfigError) as e:
        validation.validate_config(config)
    lines = str(e.value).splitlines()
    assert len(lines) == 3
    assert [line.split("=")[0] for line in lines] == ["sadt.rho", "sadt.temperature", "num_epochs"]


@pytest.mark.parametrize(
    "devices, batch, m, message",
    [
        (8, 100, None, "batch_size=100 is not divisible by the 8 devices; use a multiple of 8"),
        (8, 64, 3, "sadt.m_sharpness=3 does not divide the per-device batch 8"),
        (1, 64, 5, "sadt.m_sharpness=5 does not divide the per-device batch 64"),
    ],
)
def test_batch_must_split_over_devices_and_sharpness_groups(
    devices, batch, m, message, monkeypatch
):
    monkeypatch.setattr(jax, "device_count", lambda: devices)
    config = _config(batch_size=batch, eval_batch_size=8 * 125)
    config.sadt.m_sharpness = m
    with pytest.raises(ConfigError) as e:
        validation.validate_config(config)
    (line,) = str(e.value).splitlines()
    assert line.startswith(message), line


def test_m_sharpness_dividing_the_per_device_batch_passes(monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    config = _config(batch_size=64, eval_batch_size=1000)
    config.sadt.m_sharpness = 4
    validation.validate_config(config)


@pytest.mark.parametrize("model", ["simple_cnn", "resnet18"])
def test_unknown_t2_path_lists_the_available_ones(model):
    config = _config(
        "sadt_t2",
        **{"model.name": model, "model.dropout_rate": None, "sadt.t2_additive_path": "conv9/bias"},
    )
    validation.validate_config(config)
    with pytest.raises(ConfigError) as e:
        validation.validate_against_model(config, resolve_sadt_config(config))
    (line,) = str(e.value).splitlines()
    assert line.startswith(f"sadt.t2_additive_path='conv9/bias' does not exist in model {model}")
    assert "available paths: " in line and "/bias" in line.split("available paths: ")[1]


def test_train_and_evaluate_checks_the_config_before_the_data(tmp_path):
    # The data folder does not exist: a config error must come first, and nothing is written.
    config = _config(**{"sadt.kd_weight": 2.0, "data.data_dir": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="sadt.kd_weight"):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "config.json").exists()


def test_t2_paths_are_checked_before_the_data(tmp_path):
    config = _config(
        "sadt_t2",
        **{"sadt.t2_multiplicative_path": "out/bias", "data.data_dir": str(tmp_path / "none")},
    )
    with pytest.raises(ConfigError, match="sadt.t2_multiplicative_path='out/bias'"):
        train_and_evaluate(config, str(tmp_path / "run"))


def test_workdir_guard(tmp_path):
    config = _config()
    workdir = str(tmp_path)
    validation.guard_workdir(config, workdir)  # empty workdir: fine
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, default=str)
    other = _config(**{"sadt.rho": 2e-3})
    validation.guard_workdir(other, workdir)  # no checkpoint: nothing to resume, any config
    os.makedirs(os.path.join(workdir, "checkpoints", "8"))
    validation.guard_workdir(config, workdir)  # same config: fine
    longer = _config(num_epochs=10)
    validation.guard_workdir(longer, workdir)  # only the duration changed: fine
    with pytest.raises(ConfigError) as e:
        validation.guard_workdir(other, workdir)
    (line,) = str(e.value).splitlines()
    assert "sadt.rho: None -> 0.002" in line and "--allow_config_change" in line
    validation.guard_workdir(other, workdir, allow_change=True)


# ---- Through the CLI: exit code 2, one line per problem, nothing loaded ------------------


def _cli(tmp_path, *flags, method="base", xla_devices=None):
    workdir = str(tmp_path / "run")
    extra = {}
    if xla_devices:
        extra["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={xla_devices}"
    # A data folder that does not exist: reaching the data loader would be a different error.
    args = cli_runs.cli_args(workdir, str(tmp_path / "no_data"), *flags, method=method)
    proc = cli_runs.run(args, env=cli_runs.env(**extra), timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(workdir, "config.json"))
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_cli_reports_each_config_error_on_one_line(tmp_path):
    lines = _cli(tmp_path, "--config.sadt.rho=-1", "--config.sadt.temperature=0")
    assert lines == [
        "error: sadt.rho=-1.0 is out of range: it must be >= 0",
        "error: sadt.temperature=0.0 is out of range: it must be > 0",
    ]


def test_cli_batch_not_divisible_by_devices(tmp_path):
    (line,) = _cli(tmp_path, "--config.batch_size=36", "--config.eval_batch_size=96", xla_devices=8)
    assert line == "error: batch_size=36 is not divisible by the 8 devices; use a multiple of 8"


@pytest.mark.parametrize(
    "method, flag, message",
    [
        ("sadt_t9", None, "error: --config: unknown method 'sadt_t9'; valid methods: base, gc"),
        ("base", "--config.sadt.rh=1", "error: --config.sadt.rh: the config has no field 'rh'"),
        (
            "base",
            "--config.data.name=cifar_10",
            "error: data.name='cifar_10' is not a known dataset",
        ),
        ("base", "--coordinator_address=127.0.0.1:1", "error: --coordinator_address needs"),
    ],
)
def test_cli_bad_variant_key_dataset_or_flags(method, flag, message, tmp_path):
    (line,) = _cli(tmp_path, *([flag] if flag else []), method=method)
    assert line.startswith(message), line


def test_workdir_guard_ignores_removed_fields_and_reports_a_damaged_config(tmp_path):
    config = _config()
    workdir = str(tmp_path)
    os.makedirs(os.path.join(workdir, "checkpoints", "8"))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({**config.to_dict(), "eval_every_epochs": 1}, f, default=str)  # older runs
    validation.guard_workdir(config, workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write("[1, 2")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        validation.guard_workdir(config, workdir)


def test_cli_seed_out_of_range_fails_before_compiling(tmp_path):
    (line,) = _cli(tmp_path, "--config.seed=-1")
    assert line == "error: seed=-1 is out of range: it must be >= 0"


@pytest.mark.parametrize(
    "source, message",
    [
        ("def get_config(:\n    pass\n", "line 1: syntax error: invalid syntax"),
        ("def get_config():\n    return {'method': 'base'}\n", "returned a dict, not an ml_"),
        ("def get_config():\n    raise RuntimeError('boom')\n", "failed: RuntimeError: boom"),
    ],
)
def test_cli_config_file_that_does_not_load(source, message, tmp_path):
    path = tmp_path / "bad_config.py"
    path.write_text(source)
    workdir = str(tmp_path / "run")
    args = [
        *cli_runs.cli_args(workdir, str(tmp_path))[:3],
        f"--config={path}",
        f"--workdir={workdir}",
    ]
    proc = cli_runs.run(args, env=cli_runs.env(), timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: --config: ") and message in line, line
    assert not os.path.exists(workdir)


def test_cli_unknown_t2_path(tmp_path):
    (line,) = _cli(tmp_path, "--config.sadt.t2_additive_path=conv2/kernal", method="sadt_t2")
    assert line.startswith("error: sadt.t2_additive_path='conv2/kernal' does not exist")
    assert "conv2/kernel" in line
