"""The fused conv + bias + ReLU + 2x2 max-pool block (``_fused.conv_relu_pool``).

Checked against XLA's own operations (``lax.conv_general_dilated``, ``jax.nn.relu``,
``nn.max_pool``, whose gradient is XLA's ``select_and_scatter``): the value, the
gradients of input, kernel and bias, the forward-mode JVP and forward-over-reverse
Hessian-vector products, ties included, in several batch chunks, plus the release simple
CNN with ``block_impl='fused'`` against ``'layers'``. Shapes are small so the file runs in
seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sadt_jax import models
from sadt_jax.models import _fused, _layers
from sadt_jax.models.simple_cnn import SimpleCNN
from tests.numerics import assert_close, rand

SPEC = ("NHWC", "HWIO", "NHWC")


def _xla(padding, pool_padding):
    def block(x, k, b):
        z = jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=SPEC) + b
        return nn.max_pool(jax.nn.relu(z), (2, 2), strides=(2, 2), padding=pool_padding)

    return block


def _ours(padding, pool_padding, **kw):
    def block(x, k, b):
        return _fused.conv_relu_pool(x, k, b, padding, pool_padding, **kw)

    return block


def _parts(block, x, k, b, dy, tangents):
    """Value, the three gradients, the JVP and an HVP, in one jitted program."""

    @jax.jit
    def f(x, k, b, dy, tangents):
        y, vjp = jax.vjp(block, x, k, b)
        grads = vjp(dy)
        _, y_dot = jax.jvp(block, (x, k, b), tangents)

        def loss(x, k, b):  # not piecewise linear, so the HVP is not zero
            return jnp.sum(dy * block(x, k, b) ** 2)

        hvp = jax.jvp(jax.grad(loss, argnums=(0, 1, 2)), (x, k, b), tangents)[1]
        return (y, *grads, y_dot, *hvp)

    return f(x, k, b, dy, tangents)


NAMES = ("value", "dx", "dkernel", "dbias", "jvp", "hvp_x", "hvp_kernel", "hvp_bias")
# (batch, size, in_features, padding, pool_padding, forward, chunk images)
CASES = [
    (4, 9, 1, "VALID", "VALID", "auto", 1),  # 'auto' at depth 9: XLA's convolution per chunk
    (5, 8, 6, "SAME", "SAME", "gemm", 2),  # 2 + 2 + a remainder of 1
    (3, 8, 3, "VALID", "SAME", "gemm", 3),  # one chunk, odd map padded with -inf
    # explicit pads, 7x9 map: the unpooled row by one input row less, the unpooled column
    # by one high pad less
    (6, 8, 4, ((1, 0), (2, 1)), "VALID", "xla", 4),
]


@pytest.mark.parametrize(
    ("batch", "size", "cin", "padding", "pool_padding", "forward", "chunk"), CASES
)
def test_fused_block_matches_xla_float32(batch, size, cin, padding, pool_padding, forward, chunk):
    x, k, b = rand((batch, size, size, cin), 0), 0.5 * rand((3, 3, cin, 5), 1), rand((5,), 2)
    out = jax.eval_shape(_xla(padding, pool_padding), x, k, b).shape
    per_image = out[1] * out[2] * 4 * (5 + 9 * cin) * 4  # pre-pool map + patches, float32
    ours = _ours(padding, pool_padding, forward=forward, chunk_bytes=chunk * per_image)
    tangents = (rand(x.shape, 3), rand(k.shape, 4), rand(b.shape, 5))
    dy = rand(out, 6)
    ref = _parts(_xla(padding, pool_padding), x, k, b, dy, tangents)
    got = _parts(ours, x, k, b, dy, tangents)
    for name, a, r in zip(NAMES, got, ref, strict=True):
        assert a.dtype == r.dtype, name
        assert_close(a, r, 1e-5 if name.startswith("hvp") else 2e-6)
    # ReLU and max commute exactly: the value is bit-identical with XLA's forward conv.
    if forward in ("xla", "auto"):
        np.testing.assert_array_equal(got[0], ref[0])


@pytest.mark.parametrize(("cin", "xla_conv"), [(1, True), (7, True), (8, False)])
def test_auto_forward_is_the_gemm_from_depth_64(cin, xla_conv):
    # 'auto': XLA's convolution for shallow GEMMs (the first block, depth 9), the im2col
    # GEMM from depth kh*kw*cin >= 64 (XLA:CPU runs a chunk's convolution on one thread).
    x, k, b = jnp.zeros((2, 6, 6, cin)), jnp.zeros((3, 3, cin, 4)), jnp.zeros((4,))
    jaxpr = str(jax.make_jaxpr(_ours("VALID", "VALID"))(x, k, b))
    assert ("conv_general_dilated" in jaxpr) == xla_conv


def test_ties_route_like_select_and_scatter():
    # Blank images: every pre-activation equals the bias, so every window is a 4-way tie
    # (a ReLU'd zero where the bias is negative). XLA sends the derivative to the first
    # element of each window; so must the fused block, in reverse and forward mode.
    x = jnp.zeros((3, 10, 10, 2)).at[:, 4:7, 2:5, :].set(rand((3, 3, 3, 2), 0))
    k, b = rand((3, 3, 2, 4), 1), jnp.array([0.5, -0.5, 0.0, 1.0])
    dy = rand((3, 4, 4, 4), 2)
    tangents = (rand(x.shape, 3), rand(k.shape, 4), rand(b.shape, 5))
    ref = _parts(_xla("VALID", "VALID"), x, k, b, dy, tangents)
    got = _parts(_ours("VALID", "VALID", chunk_bytes=1), x, k, b, dy, tangents)
    for name, a, r in zip(NAMES, got, ref, strict=True):
        assert_close(a, r, 1e-5 if name.startswith("hvp") else 2e-6)


def test_fused_block_vmap_and_symbolic_zero_tangents():
    x, k, b = rand((2, 3, 8, 8, 3), 0), rand((3, 3, 3, 4), 1), rand((4,), 2)
    ref = jax.vmap(_xla("SAME", "SAME"), in_axes=(0, None, None))(x, k, b)
    got = jax.vmap(_ours("SAME", "SAME"), in_axes=(0, None, None))(x, k, b)
    assert_close(got, ref, 2e-6)
    # Only the kernel varies (x and b are constants): the tangent loop has one term.
    jvp_ref = jax.jvp(lambda k: _xla("SAME", "SAME")(x[0], k, b), (k,), (k,))[1]
    jvp_got = jax.jvp(lambda k: _ours("SAME", "SAME")(x[0], k, b), (k,), (k,))[1]
    assert_close(jvp_got, jvp_ref, 2e-6)


def test_fused_block_bfloat16_matches_loosely():
    x, k = rand((4, 8, 8, 8), 0, jnp.bfloat16), rand((3, 3, 8, 6), 1, jnp.bfloat16)
    b, dy = rand((6,), 2, jnp.bfloat16), rand((4, 3, 3, 6), 3, jnp.bfloat16)
    ref = jax.vjp(_xla("VALID", "VALID"), x, k, b)
    got = jax.vjp(_ours("VALID", "VALID"), x, k, b)
    assert got[0].dtype == jnp.bfloat16
    assert_close(got[0], ref[0], 2e-2)
    for a, r in zip(got[1](dy), ref[1](dy), strict=True):
        assert_close(a, r, 5e-2)


def test_conv_relu_pool_rejects_bad_input():
    x, k, b = jnp.zeros((1, 6, 6, 2)), jnp.zeros((3, 3, 2, 4)), jnp.zeros((4,))
    with pytest.raises(ValueError, match="matching channels"):
        _fused.conv_relu_pool(x, jnp.zeros((3, 3, 3, 4)), b)
    with pytest.raises(ValueError, match="bias of shape"):
        _fused.conv_relu_pool(x, k, jnp.zeros((3,)))
    with pytest.raises(ValueError, match="pool_padding"):
        _fused.conv_relu_pool(x, k, b, pool_padding="FULL")
    with pytest.raises(ValueError, match="at least 2x2"):
        _fused.conv_relu_pool(jnp.zeros((1, 3, 3, 2)), k, b)


def _release_loss(block_impl, x, labels, variables=None, **kwargs):
    model = models.get_model(
        "release_simple_cnn", 10, block_impl=block_impl, dropout_rate=0.0, **kwargs
    )
    if variables is None:
        variables = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(1), x)

    def loss(params):
        logits, new_state = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)
        return jnp.mean(ce), (logits, new_state)

    return variables, jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])


def _assert_same_pass(got, want):
    """Loss, logits and new batch statistics to 1e-5, gradients to 5e-5 (float round-off)."""
    (l1, logits1, s1, g1), (l0, logits0, s0, g0) = got, want
    assert_close(l1, l0, 1e-5)
    assert_close(logits1, logits0, 1e-5)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s0), strict=True):
        assert_close(a, b, 1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        assert_close(a, b, 5e-5)


def test_release_simple_cnn_fused_matches_layers():
    x, labels = rand((6, 28, 28, 1), 0), jnp.arange(6) % 10
    variables, ((l0, (logits0, s0)), g0) = _release_loss("layers", x, labels)
    fused_init, ((l1, (logits1, s1)), g1) = _release_loss("fused", x, labels)
    # Same parameter tree and initial values, same forward pass up to round-off (conv2's
    # value is XLA's convolution per chunk here, an im2col GEMM layer by layer).
    jax.tree.map(np.testing.assert_array_equal, fused_init, variables)
    _assert_same_pass((l1, logits1, s1, g1), (l0, logits0, s0, g0))


def _bn_then_block(fold):
    """bn1 (training mode) then the fused conv2 block, bn1 folded into conv2 or applied."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            block = _fused.ConvReluPool(5, 3, padding="VALID", pool_padding="VALID", name="conv2")
            if fold:
                return block(x, _fused.BatchNormAffine(axis_name="d", name="bn1")(x))
            bn = _layers.batch_norm(True, dtype=jnp.float32, axis_name="d", name="bn1")
            return block(bn(x))

    return Net()


def test_folded_batch_norm_matches_batch_norm_then_block():
    # Two "devices" (vmap with an axis name) so the statistics' pmean is exercised; the
    # input has a large mean so that a folded shift, not only the scale, matters.
    x = rand((2, 3, 9, 9, 4), 0) * 2.0 + 3.0
    dy = rand((2, 3, 3, 3, 5), 1)
    ref_net, fold_net = _bn_then_block(False), _bn_then_block(True)
    variables = ref_net.init(jax.random.key(0), x[0])
    assert jax.tree.structure(fold_net.init(jax.random.key(0), x[0])) == jax.tree.structure(
        variables
    )
    params = jax.tree.map(lambda p: p + 0.3 * rand(p.shape, 2), variables["params"])
    stats = jax.tree.map(lambda v: v + 0.5, variables["batch_stats"])

    def run_net(net):
        def per_device(params, x, dy):
            def f(params, x):
                y, state = net.apply(
                    {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"]
                )
                return jnp.sum(y * dy), (y, state)

            return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)

        return jax.jit(jax.vmap(per_device, (None, 0, 0), axis_name="d"))(params, x, dy)

    (_, (y0, s0)), g0 = run_net(ref_net)
    (_, (y1, s1)), g1 = run_net(fold_net)
    assert_close(y1, y0, 1e-5)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s0), strict=True):
        assert_close(a, b, 1e-6)  # running averages: the same statistics
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        assert_close(a, b, 2e-5)  # params (bn1 and conv2) and the input gradient


def test_fold_bn_keeps_eval_and_parameters():
    x, labels = rand((6, 28, 28, 1), 3), jnp.arange(6) % 10
    model = models.get_model("release_simple_cnn", 10, block_impl="fused", dropout_rate=0.0)
    unfolded = model.clone(fold_bn=False)
    variables = jax.jit(lambda k, x: model.init(k, x, train=True))(jax.random.key(1), x)
    jax.tree.map(
        np.testing.assert_array_equal,
        variables,
        jax.jit(lambda k, x: unfolded.init(k, x, train=True))(jax.random.key(1), x),
    )
    # Evaluation applies bn1 as a layer with or without the fold: the same bits.
    np.testing.assert_array_equal(
        jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x),
        jax.jit(lambda v, x: unfolded.apply(v, x, train=False))(variables, x),
    )
    _, ((l0, (logits0, s0)), g0) = _release_loss("fused", x, labels, variables, fold_bn=False)
    _, ((l1, (logits1, s1)), g1) = _release_loss("fused", x, labels, variables, fold_bn=True)
    _assert_same_pass((l1, logits1, s1, g1), (l0, logits0, s0, g0))
    with pytest.raises(ValueError, match="fold_bn must be True or False"):
        model.clone(fold_bn="yes").init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="supports training mode"):
        _fused.BatchNormAffine(use_running_average=True).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="only into a 'VALID' convolution"):
        _fused.ConvReluPool(4, padding="SAME").init(
            jax.random.key(0), x, (jnp.ones(1), jnp.zeros(1))
        )


def test_block_impl_auto_and_validation():
    release = dict(num_classes=10, release_layout=True)
    assert SimpleCNN(**release)._fused_blocks() == (jax.default_backend() == "cpu")
    assert not SimpleCNN(**release, conv_impl="xla")._fused_blocks()
    assert not SimpleCNN(**release, pool_impl="xla")._fused_blocks()
    assert not SimpleCNN(**release, dtype=jnp.bfloat16)._fused_blocks()
    assert not SimpleCNN(num_classes=10)._fused_blocks()  # BatchNorm sits before the pool
    assert SimpleCNN(**release, block_impl="fused", conv_impl="xla")._fused_blocks()
    x = jnp.zeros((1, 28, 28, 1))
    with pytest.raises(ValueError, match="release_layout=True"):
        SimpleCNN(num_classes=10, block_impl="fused").init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="block_impl must be one of"):
        SimpleCNN(**release, block_impl="fast").init(jax.random.key(0), x, train=False)


def test_importing_the_models_does_not_start_jax():
    # A jnp array built at import starts XLA's thread pool before the entry point's
    # keep_freed_memory(): its worker threads then take their own malloc arenas and every
    # step page-faults its temporary buffers in again (~30,000 faults per release
    # simple-CNN step, measured). Module-level constants must be NumPy.
    code = (
        "import sadt_jax.models, sadt_jax.models._fused\n"
        "from jax._src import xla_bridge\n"
        "print(bool(xla_bridge._backends))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
