"""Tests for sadt_jax.losses against closed forms and NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sadt_jax import losses

pytestmark = pytest.mark.accelerator  # run on the device by experiments/accelerator_check.py

B, C = 6, 5


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_kl(a_logits, b_logits, tau=1.0, mask=None):
    la = _np_log_softmax(np.asarray(a_logits, np.float64) / tau)
    lb = _np_log_softmax(np.asarray(b_logits, np.float64) / tau)
    per = (np.exp(la) * (la - lb)).sum(-1)
    if mask is None:
        return per.mean()
    mask = np.asarray(mask, np.float64)
    return (per * mask).sum() / max(mask.sum(), 1.0)


@pytest.fixture
def logits():
    return jax.random.normal(jax.random.PRNGKey(0), (B, C)) * 3.0


@pytest.fixture
def other_logits():
    return jax.random.normal(jax.random.PRNGKey(1), (B, C)) * 3.0


LABELS = jnp.array([0, 4, 2, 1, 3, 4])


def test_cross_entropy_uniform_logits_is_log_num_classes():
    ce = losses.cross_entropy(jnp.zeros((3, C)), jnp.array([0, 1, 4]))
    np.testing.assert_allclose(ce, np.log(C), rtol=1e-6)


def test_cross_entropy_closed_form(logits):
    # CE = mean_i (logsumexp(z_i) - z_i[y_i]).
    z = np.asarray(logits, np.float64)
    lse = np.log(np.exp(z).sum(-1))
    expected = np.mean(lse - z[np.arange(B), np.asarray(LABELS)])
    np.testing.assert_allclose(losses.cross_entropy(logits, LABELS), expected, rtol=1e-6)


def test_cross_entropy_gradient_is_softmax_minus_onehot(logits):
    g = jax.grad(losses.cross_entropy)(logits, LABELS)
    p = np.exp(_np_log_softmax(logits))
    expected = (p - np.eye(C)[np.asarray(LABELS)]) / B
    np.testing.assert_allclose(g, expected, atol=1e-7)


def test_soft_labels_equal_integer_labels_when_one_hot(logits):
    soft = jax.nn.one_hot(LABELS, C)
    np.testing.assert_allclose(
        losses.cross_entropy(logits, soft), losses.cross_entropy(logits, LABELS), rtol=1e-6
    )


def test_soft_labels_closed_form(logits):
    t = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(2), (B, C)))
    expected = np.mean(-(np.asarray(t, np.float64) * _np_log_softmax(logits)).sum(-1))
    np.testing.assert_allclose(losses.cross_entropy(logits, t), expected, rtol=1e-6)
    np.testing.assert_allclose(losses.soft_cross_entropy(logits, t), expected, rtol=1e-6)


def test_label_smoothing(logits):
    s = 0.1
    targets = np.eye(C)[np.asarray(LABELS)] * (1 - s) + s / C
    expected = np.mean(-(targets * _np_log_softmax(logits)).sum(-1))
    got = losses.cross_entropy(logits, LABELS, label_smoothing=s)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    st = losses.smooth_labels(LABELS, C, s)
    np.testing.assert_allclose(st, targets, atol=1e-7)
    np.testing.assert_allclose(st.sum(-1), np.ones(B), rtol=1e-6)


def test_smooth_labels_soft_input_no_smoothing():
    t = jax.nn.softmax(jnp.arange(C, dtype=jnp.float32))[None].repeat(2, 0)
    np.testing.assert_allclose(losses.smooth_labels(t, C), t)


def test_kl_both_directions_match_numpy(logits, other_logits):
    kl_ab = losses.kl_divergence(logits, other_logits)
    kl_ba = losses.kl_divergence(other_logits, logits)
    np.testing.assert_allclose(kl_ab, _np_kl(logits, other_logits), rtol=1e-5)
    np.testing.assert_allclose(kl_ba, _np_kl(other_logits, logits), rtol=1e-5)
    # KL is asymmetric: the two directions must differ on these inputs.
    assert abs(float(kl_ab) - float(kl_ba)) > 1e-2


def test_kl_zero_for_identical_and_nonnegative(logits, other_logits):
    np.testing.assert_allclose(losses.kl_divergence(logits, logits), 0.0, atol=1e-6)
    np.testing.assert_allclose(losses.kl_divergence(logits, logits + 7.0), 0.0, atol=1e-5)
    assert float(losses.kl_divergence(logits, other_logits)) > 0


@pytest.mark.parametrize("tau", [0.5, 2.0, 4.0])
def test_kl_temperature(logits, other_logits, tau):
    got = losses.kl_divergence(logits, other_logits, temperature=tau)
    np.testing.assert_allclose(got, _np_kl(logits, other_logits, tau), rtol=1e-5)


def test_kl_gradient_wrt_second_argument_is_softmax_difference(logits, other_logits):
    # d/dz KL(a || softmax(z)) = (softmax(z) - a) / B (batch mean).
    g = jax.grad(lambda z: losses.kl_divergence(logits, z))(other_logits)
    expected = (np.exp(_np_log_softmax(other_logits)) - np.exp(_np_log_softmax(logits))) / B
    np.testing.assert_allclose(g, expected, atol=1e-6)


def test_mask(logits, other_logits):
    mask = jnp.array([1, 0, 1, 1, 0, 1], jnp.float32)
    keep = np.asarray(mask, bool)
    np.testing.assert_allclose(
        losses.cross_entropy(logits, LABELS, mask=mask),
        losses.cross_entropy(logits[keep], LABELS[keep]),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        losses.kl_divergence(logits, other_logits, mask=mask),
        _np_kl(logits, other_logits, mask=mask),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        losses.accuracy(logits, LABELS, mask=mask),
        losses.accuracy(logits[keep], LABELS[keep]),
    )
    # An all-zero mask gives 0, not NaN.
    zero = losses.cross_entropy(logits, LABELS, mask=jnp.zeros(B))
    assert float(zero) == 0.0


def test_masked_mean():
    v = jnp.array([1.0, 2.0, 3.0, 10.0])
    np.testing.assert_allclose(losses.masked_mean(v), 4.0)
    np.testing.assert_allclose(losses.masked_mean(v, jnp.array([1, 1, 1, 0])), 2.0)


def test_accuracy():
    z = jnp.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    y = jnp.array([1, 0, 1, 1])
    np.testing.assert_allclose(losses.accuracy(z, y), 0.5)
    # Soft labels: compared against their argmax.
    soft = jax.nn.one_hot(y, 3) * 0.7 + 0.1
    np.testing.assert_allclose(losses.accuracy(z, soft), 0.5)


def test_losses_are_float32_for_bf16_logits(logits):
    ce = losses.cross_entropy(logits.astype(jnp.bfloat16), LABELS)
    kl = losses.kl_divergence(logits.astype(jnp.bfloat16), logits[::-1])
    assert ce.dtype == jnp.float32 and kl.dtype == jnp.float32
