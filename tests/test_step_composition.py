"""The step is a composition: ties between ``sadt_update``, ``sam``, ``sadt`` and the teachers.

* ``sadt_update`` with the ``sam`` method equals ``optax.chain(sadt_jax.sam(0.05), adam)``
  driven by hand, step for step;
* the ``sadt`` optax transformation (two updates, owning Adam) equals ``sadt_update`` with
  ``sadt_t1``, and the chain form ``optax.chain(sadt_t1(), adam)`` equals ``sadt_t1_1u``;
* the ablation switches (``rdrop``, ``teacher_dropout``, ``kd_weight=0``) do what they say;
* a user-built :class:`sadt_jax.Method` and teacher samplers behave as documented.

The hand-driven loops draw the same keys as ``sadt_update``: ``fold_in(state.key, step)``
split into the clean dropout key, the teachers' dropout key (teacher k: ``fold_in(., k)``)
and the noise key.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_state

import sadt_jax
from configs import fashion_mnist
from sadt_jax import losses
from sadt_jax.train import ConfigError, builders, validation

LR = 1e-2
STEPS = 3


def _max_diff(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _keys(state_key, step):
    return jax.random.split(jax.random.fold_in(state_key, step), 3)


def _logits(model, params, x, key):
    return model.apply({"params": params}, x, train=True, rngs={"dropout": key})


def _run_update(model, batch, method, cfg, steps=STEPS):
    state = make_state(model, batch, sadt_jax.make_optimizer(method, learning_rate=LR), key=3)
    step = jax.jit(functools.partial(sadt_jax.sadt_update, config=cfg))
    params = [state.params]
    for _ in range(steps):
        state, metrics = step(state, batch)
        params.append(state.params)
    return state, params, metrics


def _hand_loop(model, batch, tx, grad_fns, steps=STEPS, pass_key=True):
    """``steps`` updates of ``tx`` from the same initial params and keys as ``_run_update``."""
    state = make_state(model, batch, optax.identity(), key=3)
    params, opt_state = state.params, tx.init(state.params)
    x, y = batch["image"], batch["label"]
    out = [params]

    @jax.jit
    def one(params, opt_state, step):
        k_clean, k_teacher, k_noise = _keys(state.key, step)
        g, grad_fn = grad_fns(params, x, y, k_clean, jax.random.fold_in(k_teacher, 0))
        extra = {"key": k_noise} if pass_key else {}
        updates, opt_state = tx.update(g, opt_state, params, grad_fn=grad_fn, **extra)
        return optax.apply_updates(params, updates), opt_state

    for i in range(steps):
        params, opt_state = one(params, opt_state, i)
        out.append(params)
    return out


def _ce_grads(model):
    def grad_fns(params, x, y, k_clean, k_teacher):
        ce = lambda p, k: losses.cross_entropy(_logits(model, p, x, k), y)  # noqa: E731
        return jax.grad(ce)(params, k_clean), lambda phi: jax.grad(ce)(phi, k_teacher)

    return grad_fns


def _kd_grads(model):
    def grad_fns(params, x, y, k_clean, k_teacher):
        def ce(p):
            logits = _logits(model, p, x, k_clean)
            return losses.cross_entropy(logits, y), logits

        g, clean_logits = jax.grad(ce, has_aux=True)(params)
        p_logits = jax.lax.stop_gradient(clean_logits)

        def kd(phi):
            return losses.distillation(_logits(model, phi, x, k_teacher), p_logits)

        return g, jax.grad(kd)

    return grad_fns


# --------------------------------------------------------------------------- ties


def test_sam_method_equals_optax_chain_step_for_step(dropout_mlp_setup):
    model, batch = dropout_mlp_setup
    _, ours, _ = _run_update(model, batch, "sam", sadt_jax.method_config("sam"))
    tx = optax.chain(sadt_jax.sam(0.05), sadt_jax.make_optimizer("sam", learning_rate=LR))
    ref = _hand_loop(model, batch, tx, _ce_grads(model), pass_key=False)
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert _max_diff(a, b) <= 1e-7, i
    assert _max_diff(ours[-1], ours[0]) > 1e-3  # the comparison is not vacuous


def test_sadt_transform_equals_sadt_update(dropout_mlp_setup):
    model, batch = dropout_mlp_setup
    cfg = sadt_jax.method_config("sadt_t1", rho=0.5, noise_std=0.1)
    _, ours, _ = _run_update(model, batch, "sadt_t1", cfg)
    tx = sadt_jax.sadt_t1(sadt_jax.make_optimizer("sadt_t1", learning_rate=LR), rho=0.5,
                          noise_std=0.1)  # fmt: skip
    ref = _hand_loop(model, batch, tx, _kd_grads(model))
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert _max_diff(a, b) <= 1e-6, i
    # The KD gradient matters here: without it the result is far from both.
    _, kd0, _ = _run_update(model, batch, "sadt_t1", sadt_jax.method_config("sadt_t1", kd_weight=0))
    assert _max_diff(kd0[-1], ours[-1]) > 1e-4


def test_sadt_chain_form_equals_one_update_method(dropout_mlp_setup):
    model, batch = dropout_mlp_setup
    cfg = sadt_jax.method_config("sadt_t1_1u", rho=0.5, noise_std=0.1)
    _, ours, _ = _run_update(model, batch, "sadt_t1_1u", cfg)
    base = sadt_jax.make_optimizer("sadt_t1_1u", learning_rate=LR)
    tx = optax.chain(sadt_jax.sadt_t1(rho=0.5, noise_std=0.1), base)
    ref = _hand_loop(model, batch, tx, _kd_grads(model))
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert _max_diff(a, b) <= 1e-6, i


# --------------------------------------------------------------------------- ablation switches


def test_kd_weight_zero_reuses_g(dropout_mlp_setup):
    model, batch = dropout_mlp_setup
    cfg = sadt_jax.method_config("sadt_t1", kd_weight=0.0)
    assert cfg.second_pass == "none"
    state, ours, metrics = _run_update(model, batch, "sadt_t1", cfg, steps=1)
    assert float(metrics["teacher_grad_norm"]) == 0.0 and float(metrics["kd"]) == 0.0
    tx = sadt_jax.make_optimizer("sadt_t1", learning_rate=LR)
    k_clean = _keys(state.key, 0)[0]
    x, y = batch["image"], batch["label"]
    g = jax.grad(lambda p: losses.cross_entropy(_logits(model, p, x, k_clean), y))(ours[0])
    params, opt = ours[0], tx.init(ours[0])
    for _ in range(2):
        upd, opt = tx.update(g, opt, params)
        params = optax.apply_updates(params, upd)
    assert _max_diff(ours[1], params) <= 1e-7


def test_rdrop_with_shared_mask_and_one_update_is_base(dropout_mlp_setup):
    # With one update rdrop's teacher is theta itself; with the clean pass's mask its
    # prediction equals p, so the KL and its gradient vanish: the step is `base`.
    model, batch = dropout_mlp_setup
    cfg = sadt_jax.method_config("rdrop", teacher_dropout="shared", two_updates=False)
    _, a, m = _run_update(model, batch, "rdrop", cfg)
    _, b, _ = _run_update(model, batch, "base", sadt_jax.method_config("base"))
    assert _max_diff(a[-1], b[-1]) <= 1e-6
    assert float(m["kd"]) <= 1e-6 and float(m["perturbation_norm"]) == 0.0
    # With a fresh mask (the default) the KD term is a real consistency loss.
    _, c, m = _run_update(model, batch, "rdrop", dataclasses.replace(cfg, teacher_dropout="fresh"))
    assert float(m["kd"]) > 1e-3
    assert _max_diff(c[-1], b[-1]) > 1e-5


def test_teacher_dropout_shared_changes_sadt_t1(dropout_mlp_setup):
    model, batch = dropout_mlp_setup
    cfg = sadt_jax.method_config("sadt_t1", rho=0.5, noise_std=0.1)
    _, fresh, mf = _run_update(model, batch, "sadt_t1", cfg, steps=1)
    shared_cfg = sadt_jax.method_config("sadt_t1", rho=0.5, noise_std=0.1, teacher_dropout="shared")
    _, shared, ms = _run_update(model, batch, "sadt_t1", shared_cfg, steps=1)
    assert _max_diff(fresh[-1], shared[-1]) > 1e-6
    assert float(ms["kd"]) < float(mf["kd"])  # same mask: only the weight perturbation differs


def test_user_built_method_with_own_teacher(dropout_mlp_setup):
    # A Method assembled by hand from values equals the preset it describes.
    model, batch = dropout_mlp_setup
    method = sadt_jax.Method(
        teacher=lambda params, grads, key: jax.tree.map(lambda x: x[None], params),
        second_loss=lambda t_logits, clean_logits, labels: losses.distillation(
            t_logits, clean_logits
        ),
        two_updates=True,
    )
    _, a, _ = _run_update(model, batch, "rdrop", method)
    _, b, _ = _run_update(model, batch, "rdrop", sadt_jax.method_config("rdrop"))
    assert _max_diff(a[-1], b[-1]) <= 1e-7


# --------------------------------------------------------------------------- clear errors


def test_ema_method_without_ema_state_is_a_clear_error(dropout_mlp_setup):
    model, batch = dropout_mlp_setup
    state = make_state(model, batch, sadt_jax.make_optimizer("sadt_ema"))
    with pytest.raises(ValueError, match="ema_teacher=True"):
        sadt_jax.sadt_update(state, batch, config=sadt_jax.method_config("sadt_ema"))


@pytest.mark.parametrize("make", [lambda: sadt_jax.sam(-0.1), lambda: sadt_jax.sadt_t1(rho=-1.0)])
def test_negative_rho_is_rejected(make):
    with pytest.raises(ValueError, match="rho=-"):
        make()


# --------------------------------------------------------------------------- teachers


def _params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {
        "hidden": {"kernel": jax.random.normal(k1, (5, 16)), "bias": jnp.ones(16)},
        "head": {"kernel": jax.random.normal(k2, (16, 4)), "bias": jnp.ones(4)},
    }


def test_teacher_pytrees_have_a_leading_teacher_axis():
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    key = jax.random.PRNGKey(1)
    pair = sadt_jax.layer_teacher_pair("head/bias", "hidden/bias", std=0.1)
    for teacher, k in [
        (sadt_jax.sharpness_teacher(0.05), 1),
        (sadt_jax.noise_teacher(1e-2), 1),
        (pair, 2),
        (sadt_jax.identity_teacher(), 1),
        (sadt_jax.ema_teacher(params), 1),
    ]:
        out = teacher(params, grads, key)
        jax.tree.map(lambda t, p, k=k: np.testing.assert_equal(t.shape, (k, *p.shape)), out, params)
    # T3's noise lands on rank > 1 leaves only.
    t3 = sadt_jax.noise_teacher(1e-2)(params, grads, key)
    np.testing.assert_array_equal(t3["head"]["bias"][0], params["head"]["bias"])
    assert float(jnp.abs(t3["head"]["kernel"][0] - params["head"]["kernel"]).max()) > 0


def test_layer_teachers_without_additive_path_keep_teacher_b_unperturbed():
    params = _params()
    out = sadt_jax.layer_teacher_pair("head/bias", None)(params, None, jax.random.PRNGKey(1))
    b = jax.tree.map(lambda x: x[1], out)
    jax.tree.map(np.testing.assert_array_equal, b, params)
    a = jax.tree.map(lambda x: x[0], out)
    assert float(jnp.abs(a["head"]["bias"] - params["head"]["bias"]).max()) > 0


def test_sam_with_a_teacher_pair_parallel_equals_sequential_and_returns_aux():
    params = _params()

    def grad_fn(p):
        g = jax.tree.map(lambda x: 2.0 * x, p)
        return g, jnp.sum(p["head"]["bias"])

    teacher = sadt_jax.layer_teacher_pair("head/bias", "hidden/bias")
    outs = []
    for parallel in (False, True):
        tx = sadt_jax.sam(teacher=teacher, has_aux=True, parallel=parallel)
        state = tx.init(params)
        assert state.aux is None
        g = jax.tree.map(jnp.zeros_like, params)
        out, state = tx.update(g, state, params, grad_fn=grad_fn)
        assert state.aux.shape == (2,)
        outs.append(out)
        teachers = teacher(params, g, jax.random.fold_in(jax.random.PRNGKey(0), 0))
        expected = jax.tree.map(lambda t: 2.0 * jnp.sum(t, axis=0), teachers)
        assert _max_diff(out, expected) <= 1e-5
    assert _max_diff(*outs) <= 1e-6


def test_kl_clip_is_keras_formula():
    t = jax.random.normal(jax.random.PRNGKey(0), (6, 5)) * 4
    s = jax.random.normal(jax.random.PRNGKey(1), (6, 5)) * 4
    q, p = np.asarray(jax.nn.softmax(t)), np.asarray(jax.nn.softmax(s))
    q, p = np.clip(q, 1e-7, 1), np.clip(p, 1e-7, 1)
    keras = np.mean(np.sum(q * np.log(q / p), axis=-1))
    got = losses.distillation(t, s, clip=1e-7)
    np.testing.assert_allclose(got, keras, rtol=1e-5)
    np.testing.assert_allclose(got, losses.distillation(t, s), rtol=1e-3)
    np.testing.assert_allclose(
        losses.distillation(t, s, reverse=True, temperature=2.0, weight=0.5),
        0.5 * 4.0 * losses.kl_divergence(s, t, temperature=2.0),
        rtol=1e-6,
    )


# --------------------------------------------------------------------------- config edge


def test_config_sadt_fields_come_from_sadt_config():
    config = fashion_mnist.get_config("sadt_t1")
    expected = set(sadt_jax.algorithm.config.cli_fields())
    assert set(config.sadt.keys()) == expected
    assert {"teacher_dropout", "kl_clip", "t2_multiplicative_path"} <= expected
    assert all(v is None for v in config.sadt.values())  # None = the method's preset
    config.sadt.teacher_dropout = "shared"
    config.sadt.kl_clip = 1e-7
    resolved = builders.resolve_sadt_config(config)
    assert resolved.teacher_dropout == "shared" and resolved.kl_clip == 1e-7
    assert resolved.rho == sadt_jax.METHODS["sadt_t1"].rho
    config.sadt.teacher_dropout = "own"
    with pytest.raises(ConfigError, match="sadt.teacher_dropout='own' is not valid"):
        validation.validate_config(config)
    with pytest.raises(ValueError, match="teacher_dropout='own' is not valid"):
        sadt_jax.method_config("sadt_t1", teacher_dropout="own")


# --------------------------------------------------------------------------- README


def test_readme_own_loop_example_runs(capsys):
    readme = Path(__file__).resolve().parents[1] / "README.md"
    section = readme.read_text().split("### Use SADT in your own loop", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert np.isfinite(float(namespace["loss"]))
    assert "cross-entropy" in capsys.readouterr().out
