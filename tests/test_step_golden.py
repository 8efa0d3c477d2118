"""Every method's parameters after 5 steps are unchanged by refactoring (golden values).

``tests/data/golden_steps.npz`` holds the parameters and BatchNorm statistics after
5 jitted :func:`sadt_jax.sadt_update` steps, for every method of
:data:`sadt_jax.METHODS` (and a few settings that exercise other code paths:
``bn_stats="all"``, m-sharpness, label smoothing and temperature), on a tiny CNN with
BatchNorm and dropout, recorded with the code *before* the step was rewritten as a
composition of teacher samplers, the ``sam`` transformation and distillation losses.
The rewritten step must reproduce them bit for bit on CPU.

Regenerate (only after a deliberate behaviour change, and say so in the commit)::

  PYTHONPATH=. python tests/test_step_golden.py
"""

from __future__ import annotations

import functools
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

import sadt_jax

GOLDEN = Path(__file__).parent / "data" / "golden_steps.npz"
NUM_CLASSES = 4
STEPS = 5
T2_PATHS = ("head/bias", "conv2/bias")

# name -> (method, SADTConfig overrides). The methods that existed when the values were
# recorded; methods added later (rdrop) have their own tests.
RECORDED = ("base", "gc", "agc", "sam", "sadt_t1", "sadt_t2", "sadt_t3", "base_2x")
RECORDED += ("sadt_t1_1u", "sadt_ema")
CASES = {name: (name, {}) for name in RECORDED}
CASES.update(
    {
        "sadt_t1/bn_all": ("sadt_t1", {"bn_stats": "all"}),
        "sadt_t2/bn_all": ("sadt_t2", {"bn_stats": "all"}),
        "sam/bn_all": ("sam", {"bn_stats": "all"}),
        "sadt_t1/m4": ("sadt_t1", {"m_sharpness": 4, "rho": 0.05, "noise_std": 0.01}),
        "sam/m4": ("sam", {"m_sharpness": 4}),
        "sadt_t3/tau_ls": ("sadt_t3", {"temperature": 2.0, "label_smoothing": 0.1}),
        "sadt_t1/strong": ("sadt_t1", {"rho": 0.5, "noise_std": 0.1, "kd_weight": 0.5}),
    }
)
# `gc` is deliberately changed elsewhere (per-output-unit gradient centralisation, a change
# of the base optimizer, not of the step), so its recorded values are not compared.
SKIP = {"gc": "gc's optimizer changes to per-output-unit centralisation (deliberate)"}


class DropoutCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(4, (3, 3), use_bias=False, name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(x)
        x = nn.relu(nn.Conv(4, (3, 3), name="conv2")(nn.relu(x)))
        x = nn.Dropout(0.3, deterministic=not train)(x.mean(axis=(1, 2)))
        return nn.Dense(NUM_CLASSES, name="head")(x)


def _batch(step):
    kx, ky = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(0), step))
    return {
        "image": jax.random.normal(kx, (8, 6, 6, 2)),
        "label": jax.random.randint(ky, (8,), 0, NUM_CLASSES),
    }


def run_case(method, overrides):
    """Final ``{"params": ..., "model_state": ...}`` after ``STEPS`` jitted steps."""
    model = DropoutCNN()
    cfg = sadt_jax.method_config(method, t2_paths=T2_PATHS, **overrides)
    variables = model.init(jax.random.PRNGKey(1), _batch(0)["image"], train=False)
    state = sadt_jax.TrainState.create(
        apply_fn=model.apply,
        variables=variables,
        tx=sadt_jax.make_optimizer(method, learning_rate=1e-2),
        key=jax.random.PRNGKey(7),
        ema_teacher=cfg.ema_decay > 0,
    )
    step = jax.jit(functools.partial(sadt_jax.sadt_update, config=cfg))
    for i in range(STEPS):
        state, _ = step(state, _batch(i))
    return {"params": state.params, "model_state": state.model_state}


def _flat(name, tree):
    return {
        f"{name}|{jax.tree_util.keystr(p)}": np.asarray(x)
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_golden_bitwise(name):
    if name in SKIP:
        pytest.skip(SKIP[name])
    golden = np.load(GOLDEN)
    expected = {k: golden[k] for k in golden.files if k.split("|")[0] == name}
    got = _flat(name, run_case(*CASES[name]))
    assert expected, f"no golden values for {name}"
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype
        assert np.array_equal(got[k], v), (k, float(np.max(np.abs(got[k] - v))))


if __name__ == "__main__":
    arrays = {}
    for case_name, (m, o) in CASES.items():
        arrays.update(_flat(case_name, run_case(m, o)))
    np.savez(GOLDEN, **arrays)
    print(f"wrote {len(arrays)} arrays to {GOLDEN}")
