"""``conv_impl='gemm'``: forward, input gradient and kernel gradient as chunked GEMMs.

Every part is checked against XLA's own convolution (``lax.conv_general_dilated`` and
its derivatives): the value, the input gradient, the kernel gradient and the forward-mode
JVP, in float32 (tight) and bfloat16 (loose), plus forward-over-reverse and the models'
``'auto'`` choice. Shapes are small so the file runs in seconds.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sadt_jax import models
from sadt_jax.models import _layers
from tests.numerics import assert_close, rand

SPEC = ("NHWC", "HWIO", "NHWC")


def _xla(strides, padding):
    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=SPEC)

    return conv


def _gemm(strides, padding, forward="gemm", input_grad="gemm"):
    def conv(x, k):
        return _layers.conv2d_matmul(x, k, strides, padding, forward=forward, input_grad=input_grad)

    return conv


def _parts(conv, x, k, dy, x_dot, k_dot):
    """Value, input gradient, kernel gradient and JVP, in one jitted program."""

    @jax.jit
    def f(x, k, dy, x_dot, k_dot):
        y, vjp = jax.vjp(conv, x, k)
        dx, dk = vjp(dy)
        _, y_dot = jax.jvp(conv, (x, k), (x_dot, k_dot))
        return y, dx, dk, y_dot

    return f(x, k, dy, x_dot, k_dot)


CASES = [
    (padding, strides, 3, 6, 5)
    for padding in ("SAME", "VALID", ((2, 0), (1, 1)))
    for strides in ((1, 1), (2, 2), (1, 2))
] + [
    ("SAME", (1, 1), 1, 1, 4),
    ("VALID", (2, 2), 1, 6, 5),
    ("SAME", (2, 2), 3, 1, 4),
]


@pytest.mark.parametrize(("padding", "strides", "kernel", "cin", "cout"), CASES)
def test_gemm_value_grads_and_jvp_match_xla_float32(padding, strides, kernel, cin, cout):
    x, k = rand((3, 9, 8, cin), 0), rand((kernel, 3, cin, cout), 1)
    y_shape = jax.eval_shape(_xla(strides, padding), x, k).shape
    dy, x_dot, k_dot = rand(y_shape, 2), rand(x.shape, 3), rand(k.shape, 4)
    ref = _parts(_xla(strides, padding), x, k, dy, x_dot, k_dot)
    ours = _parts(_gemm(strides, padding), x, k, dy, x_dot, k_dot)
    for name, a, b in zip(("value", "dx", "dkernel", "jvp"), ours, ref, strict=True):
        assert a.dtype == b.dtype, name
        assert_close(a, b, 2e-6)


@pytest.mark.parametrize(("forward", "input_grad"), [("gemm", "xla"), ("xla", "gemm")])
def test_gemm_parts_are_selectable(forward, input_grad):
    x, k = rand((4, 7, 7, 3), 0), rand((3, 3, 3, 4), 1)
    dy, x_dot, k_dot = rand((4, 7, 7, 4), 2), rand(x.shape, 3), rand(k.shape, 4)
    ref = _parts(_xla((1, 1), "SAME"), x, k, dy, x_dot, k_dot)
    ours = _parts(_gemm((1, 1), "SAME", forward, input_grad), x, k, dy, x_dot, k_dot)
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b, 2e-6)
    if forward == "xla":  # XLA's own operation: bit-identical
        np.testing.assert_array_equal(ours[0], ref[0])
    else:  # the input gradient is XLA's own
        np.testing.assert_array_equal(ours[1], ref[1])


@pytest.mark.parametrize("batch", [12, 11], ids=["4_chunks", "3_chunks_and_remainder"])
def test_gemm_in_several_chunks(monkeypatch, batch):
    # 3 images per chunk for both paths: 12 = 4 x 3; 11 = 3 x 3 + 2.
    per_image = 8 * 8 * 9 * 4 * 4
    monkeypatch.setattr(_layers, "CONV_CHUNK_BYTES", 3 * per_image)
    monkeypatch.setattr(_layers, "GEMM_CHUNK_BYTES", 3 * per_image)
    x, k = rand((batch, 8, 8, 4), 0), rand((3, 3, 4, 5), 1)
    dy, x_dot, k_dot = rand((batch, 8, 8, 5), 2), rand(x.shape, 3), rand(k.shape, 4)
    ref = _parts(_xla((1, 1), "SAME"), x, k, dy, x_dot, k_dot)
    ours = _parts(_gemm((1, 1), "SAME"), x, k, dy, x_dot, k_dot)
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b, 2e-6)


def test_gemm_bfloat16_matches_loosely():
    x, k = rand((4, 8, 8, 8), 0, jnp.bfloat16), rand((3, 3, 8, 6), 1, jnp.bfloat16)
    dy = rand((4, 8, 8, 6), 2, jnp.bfloat16)
    x_dot, k_dot = rand(x.shape, 3, jnp.bfloat16), rand(k.shape, 4, jnp.bfloat16)
    ref = _parts(_xla((1, 1), "SAME"), x, k, dy, x_dot, k_dot)
    ours = _parts(_gemm((1, 1), "SAME"), x, k, dy, x_dot, k_dot)
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == jnp.bfloat16
        assert_close(a, b, 2e-2)  # bfloat16 rounding of the results, float32 accumulation


def test_gemm_hessian_vector_product_forward_over_reverse():
    # sadt_jax.sharpness uses jax.jvp(jax.grad(loss)).
    x, k = rand((3, 6, 6, 2), 0), rand((3, 3, 2, 4), 1)
    v = (rand(x.shape, 2), rand(k.shape, 3))

    def hvp(conv):
        def loss(x, k):
            return jnp.sum(jnp.tanh(conv(x, k)) ** 2)

        return jax.jit(lambda: jax.jvp(jax.grad(loss, argnums=(0, 1)), (x, k), v)[1])()

    for a, b in zip(hvp(_gemm((1, 1), "SAME")), hvp(_xla((1, 1), "SAME")), strict=True):
        assert_close(a, b, 1e-5)


def test_gemm_conv_module_and_auto():
    layer = _layers.conv(5, 3, dtype=jnp.float32, impl="gemm")
    assert isinstance(layer, _layers.GemmConv)
    auto = type(_layers.conv(5, 3, dtype=jnp.float32))
    assert auto is (_layers.GemmConv if jax.default_backend() == "cpu" else nn.Conv)
    x = rand((2, 6, 6, 8), 0)  # GEMM depth 3 * 3 * 8 = 72 >= GEMM_MIN_DEPTH
    ref = nn.Conv(5, (3, 3), use_bias=True)
    fast = _layers.GemmConv(5, (3, 3), use_bias=True)
    variables = jax.jit(ref.init)(jax.random.key(0), x)

    def grads(module):
        return jax.jit(jax.grad(lambda v, x: jnp.sum(jnp.sin(module.apply(v, x))), (0, 1)))(
            variables, x
        )

    for a, b in zip(jax.tree.leaves(grads(fast)), jax.tree.leaves(grads(ref)), strict=True):
        assert_close(a, b, 2e-6)
    jaxpr = str(jax.make_jaxpr(lambda v: fast.apply(v, x))(variables))
    assert "custom_jvp_call" in jaxpr and "conv_general_dilated" not in jaxpr
    # A shallow GEMM (3 * 3 * 3 = 27): the forward value is XLA's convolution.
    shallow = str(
        jax.make_jaxpr(lambda x: fast.apply(jax.jit(fast.init)(jax.random.key(0), x), x))(
            x[..., :3]
        )
    )
    assert "custom_jvp_call" in shallow and "conv_general_dilated" in shallow
    with pytest.raises(ValueError, match="input_grad"):
        _layers.conv2d_matmul(x, jnp.zeros((3, 3, 8, 5)), input_grad="fast")


def test_release_simple_cnn_gemm_matches_xla():
    model_kw = dict(release_layout=True, dropout_rate=0.0)
    x = rand((4, 28, 28, 1), 0)
    labels = jnp.arange(4) % 10
    out = []
    for impl in ("xla", "gemm"):
        model = models.get_model("simple_cnn", 10, conv_impl=impl, pool_impl="xla", **model_kw)
        variables = jax.jit(lambda k, x, m=model: m.init(k, x, train=False))(jax.random.key(1), x)

        def loss(params, model=model, variables=variables):
            logits, _ = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.mean(
                -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)
            )

        out.append(jax.jit(jax.value_and_grad(loss))(variables["params"]))
    (l0, g0), (l1, g1) = out
    assert_close(l1, l0, 1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        assert_close(a, b, 5e-5)
