"""CPU-friendly convolution and max-pooling (``conv_impl`` / ``pool_impl``) vs flax's.

``MatmulConv`` / ``conv2d_matmul`` must give ``nn.Conv``'s values and, up to float
round-off, its gradients; the reshape max-pool must give ``nn.max_pool``'s values and
gradients. Shapes are small so the whole file runs in seconds.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sadt_jax import models
from sadt_jax.models import _layers

RTOL = 1e-5  # relative to the largest magnitude of the reference


def _close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    err = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    assert err <= rtol * scale, f"max abs diff {err:.3e} > {rtol:.0e} * {scale:.3e}"


def _tree_close(a, b, rtol=RTOL):
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), strict=True
    ):
        try:
            _close(x, y, rtol)
        except AssertionError as e:
            raise AssertionError(f"{jax.tree_util.keystr(path)}: {e}") from None


def _conv_pair(features, kernel, strides, padding, use_bias=True, **kw):
    common = dict(
        features=features,
        kernel_size=(kernel, kernel),
        strides=strides,
        padding=padding,
        use_bias=use_bias,
        **kw,
    )
    return nn.Conv(**common), _layers.MatmulConv(**common)


def _init(module, key, *args, **kwargs):
    # Jitted: eager ``init`` compiles one initialiser per parameter shape (slow on CPU).
    return jax.jit(lambda key, *a: module.init(key, *a, **kwargs))(key, *args)


def _numpy_init(model, x, seed=0):
    """Model variables without compiling ``init``: He-normal kernels, small random biases."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            scale = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0.0, scale, leaf.shape), leaf.dtype)
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0.0, 0.1, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _rand(shape, seed, dtype=jnp.float32):
    # NumPy, not jax.random: every eager jax op compiles a kernel (slow on CPU).
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _grads(module, variables, x, dy):
    """Value and cotangents (params, x) of ``<module(x), dy>``, jitted."""

    @jax.jit
    def f(variables, x):
        y, vjp = jax.vjp(lambda v, x: module.apply(v, x), variables, x)
        return y, vjp(dy)

    return f(variables, x)


# --- single convolution -------------------------------------------------------------------


CONV_CASES = [
    (padding, strides, kernel, cin, cout)
    for padding in ("SAME", "VALID")
    for strides in (1, 2)
    for kernel in (1, 3)
    for cin, cout in ((1, 4), (8, 5))
]


def test_conv_value_and_gradients_match_nn_conv():
    # All 16 settings in one jitted program per implementation (compiling dominates).
    x = {cin: _rand((5, 9, 10, cin), cin) for cin in (1, 8)}  # odd and even sizes
    variables, cotangents = [], []
    for i, (padding, strides, k, cin, cout) in enumerate(CONV_CASES):
        kernel = _rand((k, k, cin, cout), 100 + i) / np.sqrt(k * k * cin)
        variables.append({"params": {"kernel": kernel, "bias": _rand((cout,), 200 + i)}})
        conv = nn.Conv(cout, (k, k), strides=strides, padding=padding)
        out = jax.eval_shape(conv.apply, variables[-1], x[cin])
        cotangents.append(_rand(out.shape, 300 + i))

    def run(which):
        def f(variables, x, cotangents):
            results = []
            for case, v, dy in zip(CONV_CASES, variables, cotangents, strict=True):
                padding, strides, k, cin, cout = case
                module = _conv_pair(cout, k, strides, padding)[which]
                y, vjp = jax.vjp(module.apply, v, x[cin])
                results.append((y, vjp(dy)))
            return results

        return jax.jit(f)(variables, x, cotangents)

    for case, (y0, (dv0, dx0)), (y1, (dv1, dx1)) in zip(CONV_CASES, run(0), run(1), strict=True):
        try:
            np.testing.assert_array_equal(y1, y0)  # the forward is the same XLA convolution
            _close(dx1, dx0)
            _close(dv1["params"]["kernel"], dv0["params"]["kernel"])
            _close(dv1["params"]["bias"], dv0["params"]["bias"])
        except AssertionError as e:
            raise AssertionError(f"padding, strides, kernel, cin, cout = {case}: {e}") from None


def test_conv_under_vmap_per_example_gradients():
    ref, fast = _conv_pair(6, 3, 1, "SAME")
    x = _rand((4, 2, 8, 8, 3), 0)  # 4 groups of 2 images
    variables = _init(ref, jax.random.key(1), x[0])

    def per_group_grads(module):
        def loss(v, xg):
            return jnp.sum(jnp.sin(module.apply(v, xg)))

        return jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, 0)))(variables, x)

    _tree_close(per_group_grads(fast), per_group_grads(ref))


@pytest.mark.parametrize("batch", [12, 11], ids=["4_chunks", "3_chunks_and_remainder"])
def test_conv_kernel_gradient_in_several_chunks(monkeypatch, batch):
    # Patches of 3 images per chunk: 12 = 4 x 3; 11 = 3 x 3 + 2 (no divisor near 3).
    monkeypatch.setattr(_layers, "CONV_CHUNK_BYTES", 3 * 8 * 8 * 9 * 4 * 4)
    assert _layers._chunk_size(batch, 8 * 8 * 9 * 4 * 4) == 3
    x, k, dy = _rand((batch, 8, 8, 4), 0), _rand((3, 3, 4, 5), 1), _rand((batch, 8, 8, 5), 2)

    def grads(conv):
        return jax.jit(jax.vjp(conv, x, k)[1])(dy)

    def xla(x, k):
        return jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    _tree_close(grads(_layers.conv2d_matmul), grads(xla))


def test_conv_hessian_vector_product_forward_over_reverse():
    # sadt_jax.sharpness uses jax.jvp(jax.grad(loss)): the custom derivative must allow it.
    ref, fast = _conv_pair(4, 3, 1, "SAME")
    x = _rand((3, 6, 6, 2), 0)
    variables = _init(ref, jax.random.key(1), x)
    v = jax.tree.map(lambda p: np.ones(p.shape, np.float32), variables)

    def hvp(module):
        def loss(var):
            return jnp.sum(jnp.tanh(module.apply(var, x)) ** 2)

        return jax.jit(lambda: jax.jvp(jax.grad(loss), (variables,), (v,))[1])()

    _tree_close(hvp(fast), hvp(ref), rtol=1e-4)


def test_conv_same_params_and_custom_gradient_in_use():
    ref, fast = _conv_pair(7, 3, 1, "SAME")
    x = _rand((2, 5, 5, 3), 0)
    p_ref = _init(ref, jax.random.key(4), x)
    p_fast = _init(fast, jax.random.key(4), x)
    assert jax.tree.structure(p_ref) == jax.tree.structure(p_fast)
    for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_fast), strict=True):
        np.testing.assert_array_equal(a, b)
    # The matmul path really is taken (guards against flax dropping the conv hook).
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(fast.apply(v, x))))(p_fast))
    assert "custom_jvp_call" in jaxpr
    assert isinstance(_layers.conv(7, 3, dtype=jnp.float32, impl="matmul"), _layers.MatmulConv)
    assert type(_layers.conv(7, 3, dtype=jnp.float32, impl="xla")) is nn.Conv


@pytest.mark.parametrize(
    "kw", [dict(kernel_dilation=2), dict(feature_group_count=2)], ids=["dilation", "groups"]
)
def test_conv_unsupported_settings_fall_back_to_xla(kw):
    ref, fast = _conv_pair(4, 3, 1, "SAME", **kw)
    x = _rand((2, 7, 7, 4), 0)
    variables = _init(ref, jax.random.key(1), x)
    dy = _rand(jax.eval_shape(ref.apply, variables, x).shape, 2)
    y0, g0 = _grads(ref, variables, x, dy)
    y1, g1 = _grads(fast, variables, x, dy)
    np.testing.assert_array_equal(y1, y0)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_array_equal(a, b)


def test_conv2d_matmul_raises_for_unsupported():
    x, k = jnp.zeros((1, 5, 5, 4)), jnp.zeros((3, 3, 2, 3))
    with pytest.raises(ValueError, match="channels"):
        _layers.conv2d_matmul(x, k)  # grouped (4 input channels, kernel expects 2)
    with pytest.raises(ValueError, match="padding"):
        _layers.conv2d_matmul(x, jnp.zeros((3, 3, 4, 3)), padding="CIRCULAR")
    with pytest.raises(ValueError, match="padding"):
        _layers.conv2d_matmul(x, jnp.zeros((3, 3, 4, 3)), padding=((-1, 0), (0, 0)))
    with pytest.raises(ValueError, match="dtypes"):
        _layers.conv2d_matmul(x, jnp.zeros((3, 3, 4, 3), jnp.bfloat16))
    with pytest.raises(ValueError, match="impl"):
        _layers.conv(4, 3, dtype=jnp.float32, impl="fast")


def test_conv_bfloat16_keeps_dtypes_and_matches():
    ref, fast = _conv_pair(8, 3, 1, "SAME", dtype=jnp.bfloat16)
    x = _rand((4, 8, 8, 8), 0)
    variables = _init(ref, jax.random.key(1), x)
    dy = _rand((4, 8, 8, 8), 2, jnp.bfloat16)
    y0, (g0, dx0) = _grads(ref, variables, x, dy)
    y1, (g1, dx1) = _grads(fast, variables, x, dy)
    assert y1.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y1, np.float32), np.asarray(y0, np.float32))
    assert g1["params"]["kernel"].dtype == jnp.float32 and dx1.dtype == jnp.float32
    # bf16 rounding of the results (ours accumulates the kernel gradient in float32).
    _tree_close((g1, dx1), (g0, dx0), rtol=2e-2)


def test_auto_impl_depends_on_backend(monkeypatch):
    assert _layers.resolve_impl("auto", "matmul", _layers.CONV_IMPLS) == (
        "matmul" if jax.default_backend() == "cpu" else "xla"
    )
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _layers.resolve_impl("auto", "matmul", _layers.CONV_IMPLS) == "xla"
    assert _layers.resolve_impl("auto", "reshape", _layers.POOL_IMPLS) == "xla"
    assert _layers.resolve_impl("matmul", "matmul", _layers.CONV_IMPLS) == "matmul"


# --- max-pooling --------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("hw", [(8, 8), (7, 9)])
def test_max_pool_matches_nn_max_pool(padding, hw):
    def ref(x):
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding=padding)

    def fast(x):
        return _layers.max_pool_2x2(x, "reshape", padding=padding)

    def value_and_grad(pool):
        return jax.jit(lambda x, dy: (pool(x), jax.vjp(pool, x)[1](dy)[0]))

    x = _rand((3, *hw, 5), 0)  # continuous values: no ties
    dy = _rand(jax.eval_shape(ref, x).shape, 1)
    # Ties (many equal values, e.g. ReLU zeros): routed to the first maximum in row-major
    # window order, as XLA's select_and_scatter does, so gradients are still identical.
    xt = jnp.asarray(np.random.default_rng(0).integers(0, 2, x.shape), jnp.float32)
    for inputs in (x, xt):
        got, want = value_and_grad(fast)(inputs, dy), value_and_grad(ref)(inputs, dy)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


def test_max_pool_vmap_jvp_and_batch_dims():
    x = _rand((2, 3, 6, 6, 4), 0)  # two leading batch dims
    ref = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    np.testing.assert_array_equal(_layers.max_pool_2x2(x, "reshape"), ref)
    v = _rand(x.shape, 1)
    jvp_fast = jax.vmap(
        lambda a, b: jax.jvp(lambda z: _layers.max_pool_2x2(z, "reshape"), (a,), (b,))
    )
    jvp_ref = jax.vmap(
        lambda a, b: jax.jvp(
            lambda z: nn.max_pool(z, (2, 2), strides=(2, 2), padding="SAME"), (a,), (b,)
        )
    )
    for a, b in zip(jvp_fast(x, v), jvp_ref(x, v), strict=True):
        np.testing.assert_array_equal(a, b)


# --- whole models -------------------------------------------------------------------------


def _model_grads(model, variables, x):
    """Loss, logits, BatchNorm updates and parameter gradients, in training mode."""
    labels = np.arange(x.shape[0]) % 10

    def loss(params):
        logits, updates = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        onehot = jax.nn.one_hot(labels, 10)
        return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), (logits, updates)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])


@pytest.mark.parametrize("release_layout", [False, True], ids=["default", "release"])
def test_simple_cnn_matmul_matches_xla(release_layout):
    # 20x20: the release layout's 'VALID' convolutions and pools leave 1x1x64 features.
    x = _rand((6, 20, 20, 1), 0)

    def build(conv_impl, pool_impl):
        return models.get_model(
            "simple_cnn",
            10,
            conv_impl=conv_impl,
            pool_impl=pool_impl,
            release_layout=release_layout,
        )

    ref = build("xla", "xla")
    variables = _numpy_init(ref, x)
    (l0, (logits0, upd0)), g0 = _model_grads(ref, variables, x)
    # conv 'matmul' + pool 'reshape': what 'auto' gives on CPU.
    (l1, (logits1, upd1)), g1 = _model_grads(build("matmul", "reshape"), variables, x)
    # Same operations forward, but XLA fuses (and so rounds) the surrounding elementwise
    # ops differently in the two programs: equal up to float round-off. In the release
    # layout (pooling between ReLU and BatchNorm, BatchNorm variance E[x^2] - E[x]^2) that
    # round-off reaches ~1.5e-5 relative on some gradients: against a float64 run, plain
    # XLA is off by 1e-6 and the reshape-pool program by 1.3e-5 (while its logits are the
    # closer ones, 4e-7 vs 5e-6); the pool itself only routes values, exactly.
    rtol = 5e-5 if release_layout else RTOL
    _close(logits1, logits0, rtol)
    _close(l1, l0, rtol)
    _tree_close(upd1, upd0, rtol)
    _tree_close(g1, g0, rtol)


def test_all_models_accept_conv_impl_with_same_params():
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    for name in models.MODEL_NAMES:
        shapes = {}
        for impl in ("xla", "matmul"):
            model = models.get_model(name, 10, conv_impl=impl)
            variables = jax.eval_shape(
                lambda m=model: m.init(jax.random.key(0), jnp.zeros(x.shape), train=False)
            )
            shapes[impl] = {
                k: (v.shape, v.dtype)
                for k, v in traverse_util.flatten_dict(variables, sep="/").items()
            }
        assert shapes["xla"] == shapes["matmul"], name
    for name in ("simple_cnn", "vgg16_bn"):
        models.get_model(name, 10, pool_impl="reshape")
    with pytest.raises(TypeError):
        models.get_model("resnet56", 10, pool_impl="reshape")


def test_small_resnet_matmul_matches_xla():
    # Stride-2 3x3 convolutions and 1x1 stride-2 projection shortcuts; small net and input.
    x = _rand((4, 12, 12, 3), 0)

    def build(conv_impl):
        return models.ResNet(10, (1, 1), (4, 8), shortcut="B", conv_impl=conv_impl)

    ref, fast = build("xla"), build("matmul")
    variables = _numpy_init(ref, x)

    def grads(model):
        def loss(params):
            logits, _ = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(jnp.sin(logits))

        return jax.jit(jax.grad(loss))(variables["params"])

    _tree_close(grads(fast), grads(ref), rtol=1e-4)
