"""Properties of ``sadt_update`` beyond the T1/T2/T3 reference: baselines, controls, options,
BatchNorm, randomness, compilation and config validation.

Steps run eagerly (op-by-op kernels are shared across tests, which is much cheaper on CPU
than compiling many whole steps); one test checks that the jitted step equals the eager one
and does not recompile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import CNN, MLP, make_batch

import sadt_jax

pytestmark = pytest.mark.accelerator  # run on the device by experiments/accelerator_check.py

BATCH = 8
_batch = make_batch


def _state(model, batch, method="sadt_t1", key=0, lr=1e-2, **create_kw):
    variables = model.init(jax.random.PRNGKey(1), batch["image"], train=False)
    tx = sadt_jax.make_optimizer(method, learning_rate=lr)
    return sadt_jax.TrainState.create(
        apply_fn=model.apply, variables=variables, tx=tx, key=jax.random.PRNGKey(key), **create_kw
    )


@pytest.fixture(scope="module")
def mlp_setup():
    batch = _batch((BATCH, 5))
    return MLP(), batch


@pytest.fixture(scope="module")
def cnn_setup():
    batch = _batch((BATCH, 6, 6, 2))
    return CNN(), batch


def _ce(logits, labels):
    """Own CE/KL (not sadt_jax.losses), so that the expectations do not share its bugs."""
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


def _kl(a_logits, b_logits):
    log_a, log_b = jax.nn.log_softmax(a_logits), jax.nn.log_softmax(b_logits)
    return jnp.mean(jnp.sum(jnp.exp(log_a) * (log_a - log_b), axis=-1))


def _max_diff(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _tree_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _optax_adam(lr):
    return optax.adam(optax.exponential_decay(lr, 1000, 0.9), eps=1e-7)


def _ce_grad(model, params, batch):
    def loss(p):
        return _ce(model.apply({"params": p}, batch["image"], train=True), batch["label"])

    return jax.grad(loss)(params)


def _opt_counts(opt_state):
    return {int(c) for _, c in optax.tree_utils.tree_get_all_with_path(opt_state, "count")}


# --------------------------------------------------------------------------- baselines


def test_base_equals_hand_written_optax_step(mlp_setup):
    model, batch = mlp_setup
    state = _state(model, batch, "base")
    cfg = sadt_jax.method_config("base")
    params = state.params
    tx = _optax_adam(1e-2)
    opt = tx.init(params)
    for _ in range(2):
        state, _ = sadt_jax.sadt_update(state, batch, config=cfg)
        upd, opt = tx.update(_ce_grad(model, params, batch), opt, params)
        params = optax.apply_updates(params, upd)
    assert _max_diff(state.params, params) <= 1e-7
    assert _opt_counts(state.opt_state) == {2}


@pytest.mark.parametrize("normalize", [True, False])
def test_rho_zero_no_noise_is_base(mlp_setup, normalize):
    model, batch = mlp_setup
    state = _state(model, batch, "base")
    base, _ = sadt_jax.sadt_update(state, batch, config=sadt_jax.method_config("base"))
    for name in ("sam", "sadt_t1_1u"):
        cfg = sadt_jax.method_config(
            name, rho=0.0, noise_std=0.0, normalize=normalize, kd_weight=0.0
        )
        got, _ = sadt_jax.sadt_update(state, batch, config=cfg)
        assert _max_diff(got.params, base.params) <= 1e-7, name
        assert _opt_counts(got.opt_state) == {1}


def test_base_2x_makes_two_updates(mlp_setup):
    model, batch = mlp_setup
    state = _state(model, batch, "base_2x")
    new, _ = sadt_jax.sadt_update(state, batch, config=sadt_jax.method_config("base_2x"))
    tx = _optax_adam(1e-2)
    params, opt = state.params, tx.init(state.params)
    for _ in range(2):  # second CE gradient at theta'
        upd, opt = tx.update(_ce_grad(model, params, batch), opt, params)
        params = optax.apply_updates(params, upd)
    assert _max_diff(new.params, params) <= 1e-7
    assert _opt_counts(new.opt_state) == {2}


def test_sam_objective_closed_form(mlp_setup):
    model, batch = mlp_setup
    state = _state(model, batch, "sam")
    new, metrics = sadt_jax.sadt_update(state, batch, config=sadt_jax.method_config("sam"))
    g = _ce_grad(model, state.params, batch)
    norm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))
    adv = jax.tree.map(lambda p, gi: p + 0.05 * gi / norm, state.params, g)
    tx = _optax_adam(1e-2)
    upd, _ = tx.update(_ce_grad(model, adv, batch), tx.init(state.params), state.params)
    assert _max_diff(new.params, optax.apply_updates(state.params, upd)) <= 1e-7
    np.testing.assert_allclose(metrics["perturbation_norm"], 0.05, rtol=1e-5)


# --------------------------------------------------------------------------- SADT options


def test_one_update_mode_uses_theta(mlp_setup):
    # sadt_t1_1u: teacher = theta + rho g (noise off here), one update U(g + g_KD) from theta.
    model, batch = mlp_setup
    cfg = sadt_jax.method_config("sadt_t1_1u", rho=0.5, noise_std=0.0)
    assert not cfg.two_updates
    state = _state(model, batch, "sadt_t1_1u")
    new, _ = sadt_jax.sadt_update(state, batch, config=cfg)
    theta = state.params
    g = _ce_grad(model, theta, batch)
    p_logits = model.apply({"params": theta}, batch["image"], train=True)
    teacher = jax.tree.map(lambda p, gi: p + 0.5 * gi, theta, g)

    def kd(phi):
        q_logits = model.apply({"params": phi}, batch["image"], train=True)
        return _kl(q_logits, p_logits)

    g_kd = jax.grad(kd)(teacher)
    tx = _optax_adam(1e-2)
    upd, _ = tx.update(jax.tree.map(jnp.add, g, g_kd), tx.init(theta), theta)
    assert _max_diff(new.params, optax.apply_updates(theta, upd)) <= 1e-7
    assert _opt_counts(new.opt_state) == {1}
    # ... and differs from the two-update preset.
    two, _ = sadt_jax.sadt_update(state, batch, config=dataclasses.replace(cfg, two_updates=True))
    assert _max_diff(two.params, new.params) > 1e-3


def test_ema_teacher_moves_toward_params(mlp_setup):
    model, batch = mlp_setup
    decay = 0.9
    cfg = sadt_jax.method_config("sadt_ema", ema_decay=decay)
    state = _state(model, batch, "sadt_ema", ema_teacher=True)
    old_teacher = state.teacher_state
    _tree_equal(old_teacher, state.params)
    s1, metrics = sadt_jax.sadt_update(state, batch, config=cfg)
    expected = jax.tree.map(lambda t, p: decay * t + (1 - decay) * p, old_teacher, s1.params)
    assert _max_diff(s1.teacher_state, expected) <= 1e-7
    s2, _ = sadt_jax.sadt_update(s1, batch, config=cfg)
    expected = jax.tree.map(lambda t, p: decay * t + (1 - decay) * p, s1.teacher_state, s2.params)
    assert _max_diff(s2.teacher_state, expected) <= 1e-7
    # The EMA teacher lags: strictly between the start and the current params.
    assert 0 < _max_diff(s2.teacher_state, old_teacher) < _max_diff(s2.params, old_teacher)
    assert np.isfinite(float(metrics["kd"]))


def test_m_sharpness_group_equal_batch_is_m_zero(mlp_setup):
    model, batch = mlp_setup
    state = _state(model, batch)
    cfg = sadt_jax.method_config("sadt_t1", rho=0.5, noise_std=0.1)
    a, ma = sadt_jax.sadt_update(state, batch, config=cfg)
    b, mb = sadt_jax.sadt_update(state, batch, config=dataclasses.replace(cfg, m_sharpness=BATCH))
    _tree_equal(a.params, b.params)
    _tree_equal(ma, mb)


def test_m_sharpness_groups_average_gradients(mlp_setup):
    # With rho = 0 the per-group perturbed gradients are per-group clean gradients, whose mean
    # is the full-batch gradient (no BatchNorm): grouping must not change the result.
    model, batch = mlp_setup
    state = _state(model, batch, "sam")
    cfg = sadt_jax.method_config("sam", rho=0.0)
    a, _ = sadt_jax.sadt_update(state, batch, config=cfg)
    b, _ = sadt_jax.sadt_update(state, batch, config=dataclasses.replace(cfg, m_sharpness=2))
    assert _max_diff(a.params, b.params) <= 1e-6
    # With rho > 0 the groups' perturbations differ from the global one.
    cfg = sadt_jax.method_config("sam", rho=0.5)
    a, _ = sadt_jax.sadt_update(state, batch, config=cfg)
    b, _ = sadt_jax.sadt_update(state, batch, config=dataclasses.replace(cfg, m_sharpness=2))
    assert _max_diff(a.params, b.params) > 1e-5
    with pytest.raises(ValueError, match="m_sharpness"):
        sadt_jax.sadt_update(state, batch, config=dataclasses.replace(cfg, m_sharpness=3))


def test_metrics(mlp_setup):
    model, batch = mlp_setup
    state = _state(model, batch)
    _, metrics = sadt_jax.sadt_update(state, batch, config=sadt_jax.method_config("sadt_t1"))
    logits = model.apply({"params": state.params}, batch["image"], train=True)
    np.testing.assert_allclose(metrics["ce"], _ce(logits, batch["label"]), rtol=1e-6)
    np.testing.assert_allclose(
        metrics["accuracy"], jnp.mean(jnp.argmax(logits, -1) == batch["label"]), rtol=1e-6
    )
    np.testing.assert_allclose(metrics["loss"], metrics["ce"] + metrics["kd"], rtol=1e-6)
    for name in ("grad_norm", "teacher_grad_norm", "update_norm", "perturbation_norm"):
        assert float(metrics[name]) > 0, name
    assert all(np.isfinite(float(v)) for v in metrics.values())


# --------------------------------------------------------------------------- BatchNorm


def test_bn_stats_clean_equals_clean_pass(cnn_setup):
    model, batch = cnn_setup
    state = _state(model, batch)
    cfg = sadt_jax.method_config("sadt_t1", rho=0.5, noise_std=0.1)
    new, _ = sadt_jax.sadt_update(state, batch, config=cfg)
    _, clean = model.apply(
        {"params": state.params, **state.model_state},
        batch["image"],
        train=True,
        mutable=["batch_stats"],
    )
    assert _max_diff(new.model_state, clean) <= 1e-7
    # The "all" mode differs (teacher passes update the statistics too; the release's SADT
    # restores them after each teacher pass, i.e. it is the "clean" mode).
    release, _ = sadt_jax.sadt_update(state, batch, config=dataclasses.replace(cfg, bn_stats="all"))
    assert _max_diff(release.model_state, clean) > 1e-5


def test_bn_stats_all_chains_clean_then_teacher(cnn_setup):
    # T3 with a huge noise: the running statistics are the clean pass's, then the teacher's
    # pass applied on top of them; the teacher is recovered from the step's documented keys.
    model, batch = cnn_setup
    sigma = 0.3
    cfg = sadt_jax.method_config("sadt_t3", noise_std=sigma, bn_stats="all", two_updates=False)
    state = _state(model, batch)
    new, _ = sadt_jax.sadt_update(state, batch, config=cfg)
    _, ms = model.apply(
        {"params": state.params, **state.model_state},
        batch["image"],
        train=True,
        mutable=["batch_stats"],
    )
    _, _, k_noise = jax.random.split(jax.random.fold_in(state.key, state.step), 3)
    leaves, treedef = jax.tree.flatten(state.params)
    keys = jax.random.split(k_noise, len(leaves))
    teacher = jax.tree.unflatten(
        treedef,
        [
            x + sigma * jax.random.normal(k, x.shape) if x.ndim > 1 else x
            for k, x in zip(keys, leaves, strict=True)
        ],
    )
    _, ms = model.apply(
        {"params": teacher, **ms}, batch["image"], train=True, mutable=["batch_stats"]
    )
    assert _max_diff(new.model_state, ms) <= 1e-6


# --------------------------------------------------------------------------- randomness


def test_same_key_bitwise_same_and_noise_changes_with_step(mlp_setup):
    model, batch = mlp_setup
    cfg = sadt_jax.method_config("sadt_t3", noise_std=0.05)
    state = _state(model, batch, key=3)
    a, ma = sadt_jax.sadt_update(state, batch, config=cfg)
    b, mb = sadt_jax.sadt_update(state, batch, config=cfg)
    _tree_equal(a, b)
    _tree_equal(ma, mb)
    # Another key: another teacher.
    c, _ = sadt_jax.sadt_update(state.replace(key=jax.random.PRNGKey(4)), batch, config=cfg)
    assert _max_diff(a.params, c.params) > 1e-6
    # Same state but step 1 instead of 0 (the learning rate follows the optimizer's own
    # count, so only the step's key changes): the noise differs.
    d, md = sadt_jax.sadt_update(state.replace(step=jnp.ones([], jnp.int32)), batch, config=cfg)
    assert _max_diff(a.params, d.params) > 1e-6
    assert float(ma["perturbation_norm"]) != float(md["perturbation_norm"])


# --------------------------------------------------------------------------- compilation


def test_jit_no_recompilation_and_equals_eager(mlp_setup):
    model, batch = mlp_setup
    traces = []

    def step(state, batch):
        traces.append(1)
        return sadt_jax.sadt_update(state, batch, config=sadt_jax.method_config("sadt_t1"))

    jitted = jax.jit(step)
    state = _state(model, batch)
    s1, _ = jitted(state, batch)
    s2, _ = jitted(s1, batch)
    assert len(traces) == 1
    assert jitted._cache_size() == 1
    e1, _ = step(state, batch)
    e2, _ = step(e1, batch)
    assert _max_diff(s2.params, e2.params) <= 1e-6
    assert int(s2.step) == 2


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "field,value",
    [
        ("rho", -0.1),
        ("temperature", 0.0),
        ("temperature", -1.0),
        ("kd_weight", -0.1),
        ("kd_weight", 1.5),
        ("ema_decay", -0.1),
        ("ema_decay", 1.0),
        ("objective", "sharp"),
        ("teachers", "t4"),
        ("noise_std", -1.0),
        ("bn_stats", "teacher"),
        ("kl_direction", "both"),
        ("m_sharpness", -1),
    ],
)
def test_config_rejects_invalid(field, value):
    with pytest.raises(ValueError, match=field):
        sadt_jax.SADTConfig(**{field: value})


def test_config_accepts_bounds():
    sadt_jax.SADTConfig(rho=0.0, kd_weight=0.0, ema_decay=0.0)
    sadt_jax.SADTConfig(kd_weight=1.0, ema_decay=0.999, rho=lambda step: 0.1)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="sadt_t1") as info:
        sadt_jax.method_config("sadt_t9")
    for name in sadt_jax.METHODS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="sadt_t2"):
        sadt_jax.make_optimizer("nope")


def test_t2_without_paths_raises(mlp_setup):
    model, batch = mlp_setup
    with pytest.raises(ValueError, match="t2_paths"):
        sadt_jax.sadt_update(_state(model, batch), batch, config=sadt_jax.method_config("sadt_t2"))


def test_t2_missing_path_lists_available(mlp_setup):
    model, batch = mlp_setup
    cfg = sadt_jax.method_config("sadt_t2", t2_paths=("head/bias", "conv9/bias"))
    with pytest.raises(ValueError, match="conv9/bias") as info:
        sadt_jax.sadt_update(_state(model, batch), batch, config=cfg)
    for path in ("head/bias", "head/kernel", "hidden/bias", "hidden/kernel"):
        assert path in str(info.value)
