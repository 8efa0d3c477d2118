"""Tests for sadt_jax.models: shapes, parameter counts, BatchNorm, T2 paths, dtypes.

Real forward passes run only on simple_cnn and resnet56 (small inputs); the
larger models are checked abstractly with ``jax.eval_shape``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from sadt_jax import models

NUM_CLASSES = 10
CIFAR = (2, 32, 32, 3)
FMNIST = (2, 28, 28, 1)
REAL = ("simple_cnn", "resnet56")  # models run for real; the rest via eval_shape


def _conv(cin: int, cout: int, k: int = 3, bias: bool = True) -> int:
    return k * k * cin * cout + (cout if bias else 0)


def _dense(fin: int, fout: int) -> int:
    return fin * fout + fout


_BN64 = 2 * 64  # scale + bias

# Hand count of the simple CNN: three conv-64 (+bias) with BatchNorm, 'SAME' pooling to
# 4x4x64 = 1024 features on both 32x32 and 28x28 inputs, then dense 512 -> 64 -> 10.
SIMPLE_CNN_CIFAR = (
    _conv(3, 64)
    + 2 * _conv(64, 64)
    + 3 * _BN64
    + _dense(4 * 4 * 64, 512)
    + _dense(512, 64)
    + _dense(64, NUM_CLASSES)
)
SIMPLE_CNN_FMNIST = SIMPLE_CNN_CIFAR - _conv(3, 64) + _conv(1, 64)

EXPECTED_PARAMS = {
    "simple_cnn": 634_314,
    "vgg16_bn": 4_083_690,
    "inception_resnet": 1_820_234,
    "resnet56": 853_018,  # He et al. 2016, option A: "0.85M"
    "resnet18": 11_173_962,
    "wrn28_10": 36_479_194,  # Zagoruyko & Komodakis 2016: "36.5M"
    # The release's Keras models (see tests/test_release_models.py).
    "release_simple_cnn": 635_576,
    "release_vgg16_bn": 4_085_912,
    "release_inception_resnet": 305_358,
    "release_resnet": 446_784,
}


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@functools.cache
def _abstract_init(model, shape=CIFAR, dtype=jnp.float32):
    """Shapes and dtypes of ``model.init`` without running it (cached: modules hash)."""
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(shape, dtype), train=False)
    )


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree, sep="/")


def _numpy_init(model, shape=CIFAR, seed=0):
    """Cheap stand-in for ``model.init``: He-normal kernels, zero biases, unit BN scales.

    Eager ``model.init`` compiles one random initialiser per parameter shape, which
    would dominate the test time on CPU; ``init`` itself is traced (abstractly) by
    every other test.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape), leaf.dtype)
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, _abstract_init(model, shape))


@pytest.fixture(scope="module")
def real_variables():
    """Concrete variables of the models that are run for real, on CIFAR shapes."""
    return {name: _numpy_init(models.get_model(name, NUM_CLASSES)) for name in REAL}


def _images(shape=CIFAR, seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


# --- registry ---------------------------------------------------------------------------


def test_model_names():
    assert models.MODEL_NAMES == (
        "simple_cnn",
        "vgg16_bn",
        "inception_resnet",
        "resnet56",
        "resnet18",
        "wrn28_10",
        "release_simple_cnn",
        "release_vgg16_bn",
        "release_inception_resnet",
        "release_resnet",
    )


@pytest.mark.parametrize("fn", [lambda n: models.get_model(n, 10), models.t2_teacher_paths])
def test_unknown_name_raises_listing_names(fn):
    with pytest.raises(ValueError) as excinfo:
        fn("resnet1000")
    message = str(excinfo.value)
    assert "\n" not in message and "resnet1000" in message
    for name in models.MODEL_NAMES:
        assert name in message


def test_unknown_kwarg_raises():
    with pytest.raises(TypeError):
        models.get_model("simple_cnn", 10, no_such_option=1)


# --- shapes and parameter counts ----------------------------------------------------------


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_param_count(name):
    variables = _abstract_init(models.get_model(name, NUM_CLASSES))
    assert _count(variables["params"]) == EXPECTED_PARAMS[name]
    assert set(variables) == {"params", "batch_stats"}


def test_simple_cnn_param_count_by_hand():
    model = models.get_model("simple_cnn", NUM_CLASSES)
    assert _count(_abstract_init(model, CIFAR)["params"]) == SIMPLE_CNN_CIFAR
    assert _count(_abstract_init(model, FMNIST)["params"]) == SIMPLE_CNN_FMNIST


def test_simple_cnn_release_layout_param_count():
    # Keras `clsclb` of the release: VALID convs, 4x4x64 flattened on 32x32x3, BN after
    # the hidden dense layers and an extra Dense(10, relu) before the output layer.
    expected = (
        _conv(3, 64)
        + 2 * _conv(64, 64)
        + 3 * _BN64
        + _dense(4 * 4 * 64, 512)
        + 2 * 512
        + _dense(512, 64)
        + 2 * 64
        + _dense(64, 10)
        + _dense(10, NUM_CLASSES)
    )
    model = models.get_model("simple_cnn", NUM_CLASSES, release_layout=True)
    assert _count(_abstract_init(model)["params"]) == expected == 635_576
    # 28x28x1: 'VALID' convolutions leave 3x3x64 features.
    fmnist = expected - _conv(3, 64) + _conv(1, 64) - (16 - 9) * 64 * 512
    assert _count(_abstract_init(model, FMNIST)["params"]) == fmnist == 405_048


def test_wrn28_10_param_count_near_published():
    model = models.get_model("wrn28_10", NUM_CLASSES)
    count = _count(_abstract_init(model)["params"])
    assert abs(count - 36_479_194) <= 0.005 * 36_479_194
    assert count == 36_479_194


def test_param_count_scales_with_classes():
    # Only the output layer depends on num_classes.
    a = _count(_abstract_init(models.get_model("resnet18", 10))["params"])
    b = _count(_abstract_init(models.get_model("resnet18", 100))["params"])
    assert b - a == 90 * (512 + 1)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [CIFAR, FMNIST], ids=["cifar", "fmnist"])
def test_output_shape_abstract(name, train, shape):
    model = models.get_model(name, NUM_CLASSES)
    variables = _abstract_init(model, shape)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    out = jax.eval_shape(
        lambda v, x: model.apply(
            v, x, train=train, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}
        ),
        variables,
        x,
    )
    logits, updates = out
    assert logits.shape == (shape[0], NUM_CLASSES)
    assert logits.dtype == jnp.float32
    # The updated statistics have the same structure as the running averages.
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
        variables["batch_stats"]
    )


@pytest.mark.parametrize("name", REAL)
@pytest.mark.parametrize("train", [True, False])
def test_output_shape_real(name, train, real_variables):
    model = models.get_model(name, NUM_CLASSES)
    if train:
        logits, _ = model.apply(
            real_variables[name], _images(), train=True, mutable=["batch_stats"]
        )
    else:
        logits = model.apply(real_variables[name], _images(), train=False)
    assert logits.shape == (CIFAR[0], NUM_CLASSES)
    assert np.all(np.isfinite(np.asarray(logits)))


def test_simple_cnn_fashion_mnist_forward():
    model = models.get_model("simple_cnn", NUM_CLASSES)
    variables = _numpy_init(model, FMNIST)
    logits = model.apply(variables, _images(FMNIST), train=False)
    assert logits.shape == (FMNIST[0], NUM_CLASSES)


def test_simple_cnn_release_layout_forward():
    shape = CIFAR
    model = models.get_model("simple_cnn", NUM_CLASSES, release_layout=True, dropout_rate=0.3)
    variables = _numpy_init(model, shape)
    logits, _ = model.apply(
        variables,
        _images(shape),
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(2)},
    )
    assert logits.shape == (shape[0], NUM_CLASSES)
    assert models.t2_teacher_paths("simple_cnn")[1] in _flat(variables["params"])


# --- outputs recorded before the shared base class (sadt_jax/models/_base.py) -----------

# First-row logits at ``jax.jit(model.init)(jax.random.key(0), x)`` with
# ``x = jax.random.normal(jax.random.key(1), CIFAR)``, ``conv_impl='xla'``: eval mode, then
# train mode with ``rngs={'dropout': jax.random.key(3)}``; then the sum of |batch_stats|
# after the train-mode pass. Recorded before the models shared one base class, to show
# that the refactor changed no parameter (name, shape, initial value) and no output.
RECORDED_OUTPUTS = {
    ("simple_cnn", ()): (
        [-3.949319, -0.159015, -1.76039, 0.193144, -1.277018, 0.167765, 6.276652, 0.211216,
         0.389055, -4.345444],
        [-1.648186, -1.947217, 0.533497, 0.570645, -1.297505, 0.717161, 1.864752, 1.696984,
         0.509429, -0.665576],
        193.335876,
    ),
    ("simple_cnn", (("dropout_rate", 0.3), ("release_layout", True))): (
        [-0.725582, -1.35857, -2.636647, -1.024904, 5.991073, -1.345881, -5.82734, 3.454914,
         1.334749, 0.014114],
        [1.94599, -2.105058, -0.906605, 1.252029, 0.783538, -1.876336, -2.233478, 0.290129,
         -0.220072, -1.120133],
        769.489258,
    ),
    ("resnet56", ()): (
        [10770.162109, -5483.592773, -3817.552734, 2185.896484, -4091.963867, 1496.509766,
         16784.003906, 15533.091797, 904.291016, -237.543945],
        [-2.465439, 0.741564, 3.89334, 0.650511, 3.554503, -0.066311, 7.271659, 3.729858,
         1.893986, -2.627636],
        2116.058350,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(RECORDED_OUTPUTS), ids=lambda c: c[0] + str(len(c[1])))
def test_outputs_unchanged_by_the_shared_base_class(case):
    name, kwargs = case
    model = models.get_model(name, NUM_CLASSES, conv_impl="xla", **dict(kwargs))
    x = jax.random.normal(jax.random.key(1), CIFAR)
    variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))
    eval_logits = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
    train_logits, updates = jax.jit(
        lambda v: model.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(3)}
        )
    )(variables)
    want_eval, want_train, want_stats = RECORDED_OUTPUTS[case]
    np.testing.assert_allclose(np.asarray(eval_logits[0]), want_eval, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(train_logits[0]), want_train, rtol=2e-5, atol=2e-5)
    stats = sum(float(jnp.sum(jnp.abs(leaf))) for leaf in jax.tree.leaves(updates))
    np.testing.assert_allclose(stats, want_stats, rtol=1e-5)


# --- BatchNorm and dropout ----------------------------------------------------------------


@pytest.mark.parametrize("name", REAL)
def test_batch_stats_update_in_train_mode_only(name, real_variables):
    model = models.get_model(name, NUM_CLASSES)
    variables = real_variables[name]
    before = variables["batch_stats"]
    x = _images() * 3.0 + 1.0

    _, train_updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    after = _flat(train_updates["batch_stats"])
    for path, old in _flat(before).items():
        assert not np.allclose(after[path], old), f"{path} did not change in train mode"

    _, eval_updates = model.apply(variables, x, train=False, mutable=["batch_stats"])
    for path, old in _flat(before).items():
        np.testing.assert_array_equal(_flat(eval_updates["batch_stats"])[path], old)


def _batch_norm_calls(model, variables, train: bool) -> list[nn.BatchNorm]:
    """The BatchNorm modules called by one abstract forward pass."""
    found = []

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            found.append(context.module)
        return next_fun(*args, **kwargs)

    def apply(v, x):
        with nn.intercept_methods(interceptor):
            return model.apply(
                v, x, train=train, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}
            )

    jax.eval_shape(apply, variables, jax.ShapeDtypeStruct(CIFAR, jnp.float32))
    return found


@pytest.mark.parametrize("name", models.MODEL_NAMES)
@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_hyperparameters(name, train):
    # Keras defaults, as in the release: momentum 0.99, epsilon 1e-3; running averages
    # in eval mode only.
    model = models.get_model(name, NUM_CLASSES)
    variables = _abstract_init(model)
    found = _batch_norm_calls(model, variables, train)
    assert len(found) == len(_flat(variables["batch_stats"])) // 2  # mean and var each
    for m in found:
        assert (m.momentum, m.epsilon, m.use_running_average) == (0.99, 1e-3, not train)


def test_dropout_uses_rng_in_train_mode_only():
    model = models.get_model("simple_cnn", NUM_CLASSES, dropout_rate=0.5)
    variables = _numpy_init(model)
    x = _images()

    def train_logits(seed):
        logits, _ = model.apply(
            variables,
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(seed)},
        )
        return np.asarray(logits)

    assert not np.allclose(train_logits(0), train_logits(1))
    np.testing.assert_array_equal(train_logits(3), train_logits(3))
    # Eval mode needs no rng and is deterministic.
    np.testing.assert_array_equal(
        model.apply(variables, x, train=False), model.apply(variables, x, train=False)
    )


# --- T2 teacher paths ---------------------------------------------------------------------


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_t2_teacher_paths_point_to_leaves(name):
    # The trainable stand-ins; tests/test_release_models.py checks the release's own.
    bias_path, salient_path = models.t2_teacher_paths(name, stand_in=True)
    params = _flat(_abstract_init(models.get_model(name, NUM_CLASSES))["params"])
    assert bias_path in params and salient_path in params
    assert bias_path != salient_path
    assert params[bias_path].shape == (NUM_CLASSES,)
    assert len(params[salient_path].shape) == 1
    # The output bias is the last layer: the "last parameter tensor" of the release.
    assert bias_path.startswith("head/")


def test_t2_simple_cnn_is_second_conv_bias():
    assert models.t2_teacher_paths("simple_cnn") == ("head/bias", "conv2/bias")


@pytest.mark.parametrize("name", models.MODEL_NAMES[:6])
def test_t2_teacher_paths_of_the_project_models_ignore_stand_in(name):
    assert models.t2_teacher_paths(name) == models.t2_teacher_paths(name, stand_in=True)
    assert all(isinstance(p, str) for p in models.t2_teacher_paths(name))


@pytest.mark.parametrize("name", REAL)
def test_t2_salient_tensor_affects_train_mode_output(name, real_variables):
    # Teacher B must change the training-mode logits: a conv bias directly followed by
    # BatchNorm would not (batch statistics cancel it), which is why the deeper models
    # use a BatchNorm shift.
    model = models.get_model(name, NUM_CLASSES)
    variables = real_variables[name]
    _, salient_path = models.t2_teacher_paths(name)
    params = _flat(variables["params"])
    noise = 0.1 * jax.random.normal(jax.random.key(5), params[salient_path].shape)
    perturbed = dict(params)
    perturbed[salient_path] = params[salient_path] + noise
    perturbed = traverse_util.unflatten_dict(perturbed, sep="/")

    x = _images()

    def logits(p):
        out, _ = model.apply(
            {"params": p, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return np.asarray(out)

    assert not np.allclose(logits(variables["params"]), logits(perturbed))


# --- dtypes -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_bfloat16_compute_float32_params(name):
    model = models.get_model(name, NUM_CLASSES, dtype=jnp.bfloat16)
    variables = _abstract_init(model)
    for leaf in jax.tree.leaves(variables):
        assert leaf.dtype == jnp.float32
    logits, updates = jax.eval_shape(
        lambda v, x: model.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}
        ),
        variables,
        jax.ShapeDtypeStruct(CIFAR, jnp.float32),
    )
    assert logits.dtype == jnp.bfloat16
    for leaf in jax.tree.leaves(updates):
        assert leaf.dtype == jnp.float32


def test_bfloat16_forward_close_to_float32(real_variables):
    variables = real_variables["simple_cnn"]
    x = _images()
    f32 = models.get_model("simple_cnn", NUM_CLASSES).apply(variables, x, train=False)
    bf16 = models.get_model("simple_cnn", NUM_CLASSES, dtype=jnp.bfloat16).apply(
        variables, x, train=False
    )
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf16, np.float32), np.asarray(f32), atol=0.1, rtol=0.1)
