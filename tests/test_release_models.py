"""Tests for the release's four networks (sadt_jax.models.release).

The strongest checks compare with the release's own Keras code (transcribed in
tests/keras_release_models.py and built with Keras' numpy backend in a subprocess):
the ``get_weights()`` order, every weight's shape, and the inference-mode logits
for the same random weights.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from sadt_jax import models
from sadt_jax.models import release

NUM_CLASSES = 10
CIFAR = (2, 32, 32, 3)
FMNIST = (2, 28, 28, 1)
RELEASE = (
    "release_simple_cnn",
    "release_vgg16_bn",
    "release_inception_resnet",
    "release_resnet",
)
# (trainable, non-trainable) at 32x32x3 and 10 classes, as Keras reports them.
COUNTS = {
    "release_simple_cnn": (635_576, 1_536),
    "release_vgg16_bn": (4_085_912, 6_272),
    "release_inception_resnet": (305_358, 980),
    "release_resnet": (446_784, 2_288),
}
# What the release's T2 index ``ud`` lands on, and the expected t2_teacher_paths.
SALIENT = {
    "release_simple_cnn": (7, ("params", "conv2/bias")),
    "release_vgg16_bn": (53, ("batch_stats", "block4_bn2/var")),
    "release_inception_resnet": (49, ("params", "module2/path_b_bn2/bias")),
    "release_resnet": (109, ("batch_stats", "stage2_block5/bn2/var")),
}
T2_PATHS = {
    "release_simple_cnn": ("head/bias", "conv2/bias"),
    "release_vgg16_bn": ("head/bias", None),
    "release_inception_resnet": ("head/bias", "module2/path_b_bn2/bias"),
    "release_resnet": ("head/bias", None),
}
T2_STAND_INS = {
    "release_simple_cnn": "conv2/bias",
    "release_vgg16_bn": "block4_bn2/bias",
    "release_inception_resnet": "module2/path_b_bn2/bias",
    "release_resnet": "stage2_block5/bn2/bias",
}
KERAS_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keras_release_models.py")


def _key(seed: int) -> jax.Array:
    """A PRNG key whose random draws compile fast on XLA:CPU (threefry's are slow to build)."""
    return jax.random.key(seed, impl="rbg")


@functools.cache
def _jitted_apply(model, train):
    return jax.jit(
        lambda v, x, k: model.apply(v, x, train=train, mutable=["batch_stats"], rngs={"dropout": k})
    )


def _run(model, variables, x, train, seed=0):
    """Jitted ``apply`` (one compilation per model and mode): ``(logits, updates)``."""
    return _jitted_apply(model, train)(variables, x, _key(seed))


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree, sep="/")


@functools.cache
def _abstract_init(name, shape=CIFAR, **kwargs):
    model = models.get_model(name, NUM_CLASSES, **kwargs)
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(shape, jnp.float32), train=False)
    )


def _numpy_variables(name, shape=CIFAR, seed=0):
    """Concrete variables without compiling ``init``: N(0, 1.5/fan_in) kernels etc."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        leaf_name = path[-1].key
        if leaf_name == "kernel":
            std = np.sqrt(1.5 / np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0.0, std, leaf.shape), jnp.float32)
        if leaf_name in ("scale", "var"):
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
        return jnp.asarray(rng.normal(0.0, 0.1, leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, _abstract_init(name, shape))


def _images(shape=CIFAR, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@functools.cache
def _initialised(name, seed=0, **kwargs):
    """``model.init`` for real (jitted: one compilation per model)."""
    model = models.get_model(name, NUM_CLASSES, **kwargs)
    init = jax.jit(lambda k: model.init(k, jnp.zeros(CIFAR), train=False))
    return init(_key(seed))


# --- parameter counts and shapes ----------------------------------------------------------


@pytest.mark.parametrize("name", RELEASE)
def test_parameter_counts_are_the_release(name):
    variables = _abstract_init(name)
    assert (_count(variables["params"]), _count(variables["batch_stats"])) == COUNTS[name]


@pytest.mark.parametrize("name", RELEASE)
def test_output_shapes_cifar_and_fashion_mnist(name):
    num_classes = NUM_CLASSES
    model = models.get_model(name, num_classes)
    for shape in (CIFAR, FMNIST):
        variables = jax.eval_shape(
            lambda s=shape: model.init(jax.random.key(0), jnp.zeros(s), train=False)
        )
        for train in (True, False):
            logits, _ = jax.eval_shape(
                lambda v, x, t=train: model.apply(
                    v, x, train=t, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}
                ),
                variables,
                jax.ShapeDtypeStruct(shape, jnp.float32),
            )
            assert logits.shape == (shape[0], num_classes)


@pytest.mark.parametrize("name", RELEASE)
def test_fashion_mnist_forward_runs(name):
    variables = _numpy_variables(name, FMNIST)
    model = models.get_model(name, NUM_CLASSES)
    logits, _ = _run(model, variables, _images(FMNIST), train=False)
    assert logits.shape == (FMNIST[0], NUM_CLASSES)
    assert np.all(np.isfinite(np.asarray(logits)))


def test_bottleneck_width():
    # Dense(10, ReLU) in the simple CNN whatever the classes; Dense(classes, ReLU) elsewhere.
    for name in RELEASE:
        params = _flat(_abstract_init(name)["params"])
        params100 = _flat(
            jax.eval_shape(
                lambda n=name: models.get_model(n, 100).init(
                    jax.random.key(0), jnp.zeros(CIFAR), train=False
                )
            )["params"]
        )
        key = "dense3/kernel" if name == "release_simple_cnn" else "bottleneck/kernel"
        assert params[key].shape[-1] == 10
        assert params100[key].shape[-1] == (10 if name == "release_simple_cnn" else 100)
        assert params100["head/kernel"].shape == (params100[key].shape[-1], 100)


# --- against the release's Keras code -----------------------------------------------------


@pytest.fixture(scope="module")
def keras_models(tmp_path_factory):
    """Weight list (JSON) and a dumped inference forward of each Keras model."""
    if importlib.util.find_spec("keras") is None:
        pytest.skip("keras is not installed")
    folder = tmp_path_factory.mktemp("keras")
    env = dict(os.environ, KERAS_BACKEND="numpy")
    out = subprocess.run(
        [sys.executable, KERAS_SCRIPT, *map(str, CIFAR[1:]), str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1]), folder


_KERAS_LEAF = {
    "kernel": "kernel",
    "bias": "bias",
    "gamma": "scale",
    "beta": "bias",
    "moving_mean": "mean",
    "moving_variance": "var",
}


@pytest.mark.parametrize("name", RELEASE)
def test_weight_order_and_shapes_match_keras(name, keras_models):
    described, _ = keras_models
    keras_list = [
        (
            "params" if trainable else "batch_stats",
            f"{layer.replace('.', '/')}/{_KERAS_LEAF[weight]}",
            tuple(shape),
        )
        for layer, weight, shape, trainable in described[name]
    ]
    variables = _abstract_init(name)
    ours = [
        (collection, path, _flat(variables[collection])[path].shape)
        for collection, path in models.release_weight_order(models.get_model(name, NUM_CLASSES))
    ]
    assert ours == keras_list
    trainable = sum(int(np.prod(s)) for c, _, s in keras_list if c == "params")
    assert (trainable, _count(variables["batch_stats"])) == COUNTS[name]


@pytest.mark.parametrize("name", RELEASE)
def test_inference_logits_match_keras(name, keras_models):
    # The Keras model's random weights, loaded through release_weight_order: same logits.
    _, folder = keras_models
    dump = np.load(folder / f"{name}.npz")
    model = models.get_model(name, NUM_CLASSES)
    flat = {
        (collection, *path.split("/")): jnp.asarray(dump[f"w{i}"])
        for i, (collection, path) in enumerate(models.release_weight_order(model))
    }
    variables = traverse_util.unflatten_dict(flat)
    logits, _ = _run(model, variables, jnp.asarray(dump["x"]), train=False)
    np.testing.assert_allclose(np.asarray(logits), dump["logits"], rtol=1e-4, atol=1e-4)


# --- T2 salient tensors -------------------------------------------------------------------


@pytest.mark.parametrize("name", RELEASE)
def test_t2_index_mapping(name):
    order = models.release_weight_order(models.get_model(name, NUM_CLASSES))
    variables = _abstract_init(name)
    # A complete order: every variable exactly once.
    everything = {(c, p) for c in variables for p in _flat(variables[c])}
    assert len(order) == len(set(order)) == len(everything) and set(order) == everything
    index, target = SALIENT[name]
    assert release.RELEASE_SALIENT_INDEX[name] == index
    assert order[index] == target
    # Teacher A: the last get_weights() entry, the output layer's bias.
    assert order[-1] == ("params", "head/bias")
    assert models.t2_teacher_paths(name) == T2_PATHS[name]
    mult, add = T2_PATHS[name]
    if add is not None:  # a trainable tensor: teacher B perturbs exactly the release's
        assert target == ("params", add)
    else:  # a running variance: no trainable target; the stand-in is that BN's beta
        assert target[0] == "batch_stats" and target[1].endswith("/var")
        assert target[1].replace("/var", "/bias") == T2_STAND_INS[name]
    stand_in = models.t2_teacher_paths(name, stand_in=True)
    assert stand_in == (mult, T2_STAND_INS[name])
    assert stand_in[1] in _flat(variables["params"])


@pytest.mark.parametrize("name", ["release_inception_resnet", "release_resnet"])
def test_t2_salient_tensor_changes_train_mode_output(name):
    # The Inception-ResNet's tensor (a BN shift) and the ResNet's stand-in really perturb.
    kwargs = {"dropout_rate": 0.0} if name == "release_inception_resnet" else {}
    model = models.get_model(name, NUM_CLASSES, **kwargs)
    variables = _numpy_variables(name)
    _, path = models.t2_teacher_paths(name, stand_in=True)
    params = _flat(variables["params"])
    noise = 0.1 * np.random.default_rng(5).normal(size=params[path].shape)
    perturbed = {**params, path: params[path] + noise}
    x = _images()

    def logits(p):
        v = {"params": traverse_util.unflatten_dict(p, sep="/")}
        return np.asarray(_run(model, v | {"batch_stats": variables["batch_stats"]}, x, True)[0])

    assert not np.allclose(logits(params), logits(perturbed))


def test_release_weight_order_rejects_other_models():
    with pytest.raises(ValueError, match="release"):
        models.release_weight_order(models.get_model("simple_cnn", NUM_CLASSES))


# --- dropout, BatchNorm, dtypes -----------------------------------------------------------


def _dropout_rates(name, **kwargs):
    model = models.get_model(name, NUM_CLASSES, **kwargs)
    rates = []

    def interceptor(next_fun, args, kw, context):
        if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
            rates.append(context.module.rate)
        return next_fun(*args, **kw)

    def apply(v, x):
        with nn.intercept_methods(interceptor):
            return model.apply(
                v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}
            )

    jax.eval_shape(apply, _abstract_init(name), jax.ShapeDtypeStruct(CIFAR, jnp.float32))
    return sorted(r for r in rates if r > 0)


def test_dropout_rates_are_the_release():
    assert _dropout_rates("release_simple_cnn") == [0.3]
    assert _dropout_rates("release_vgg16_bn") == [0.1] * 13 + [0.3] * 2
    assert _dropout_rates("release_inception_resnet") == [0.2] * 5
    assert _dropout_rates("release_resnet") == []
    # Overridable like every model's.
    assert _dropout_rates("release_vgg16_bn", dropout_rate=0.0, conv_dropout_rate=0.0) == []
    assert _dropout_rates("release_inception_resnet", dropout_rate=0.5) == [0.5] * 5
    with pytest.raises(TypeError):
        models.get_model("release_resnet", NUM_CLASSES, dropout_rate=0.1)


@pytest.mark.parametrize("name", RELEASE)
def test_train_and_eval_modes(name):
    model = models.get_model(name, NUM_CLASSES)
    variables = _numpy_variables(name)
    x = _images() * 2.0 + 0.5

    (logits0, updates), (logits1, _) = (
        _run(model, variables, x, True, 0),
        _run(model, variables, x, True, 1),
    )
    # Dropout only in training mode, with a fresh mask per rng; the ResNet has none.
    assert np.allclose(logits0, logits1) == (name == "release_resnet")
    # Running statistics move in training mode (when mutable) ...
    before, after = _flat(variables["batch_stats"]), _flat(updates["batch_stats"])
    for path, old in before.items():
        assert not np.allclose(after[path], old), path
    # ... and not in evaluation mode, which needs no rng and is deterministic.
    eval_logits, eval_updates = _run(model, variables, x, False, 0)
    for path, old in before.items():
        np.testing.assert_array_equal(_flat(eval_updates["batch_stats"])[path], old)
    np.testing.assert_array_equal(eval_logits, _run(model, variables, x, False, 1)[0])


@pytest.mark.parametrize("name", RELEASE)
def test_bfloat16_forward(name):
    variables = _numpy_variables(name)
    x = _images()
    f32, _ = _run(models.get_model(name, NUM_CLASSES), variables, x, False)
    model = models.get_model(name, NUM_CLASSES, dtype=jnp.bfloat16)
    bf16, _ = _run(model, variables, x, False)
    assert bf16.dtype == jnp.bfloat16
    scale = float(np.max(np.abs(np.asarray(f32)))) + 1.0
    np.testing.assert_allclose(np.asarray(bf16, np.float32), np.asarray(f32), atol=0.1 * scale)
    assert np.all(np.isfinite(np.asarray(bf16, np.float32)))
    # Training mode (abstractly): bf16 logits, float32 running statistics.
    logits, updates = jax.eval_shape(lambda v: _run(model, v, x, True), variables)
    assert logits.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updates))


def test_batch_norm_is_keras_default():
    for name in RELEASE:
        found = []

        def interceptor(next_fun, args, kw, context, found=found):
            if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
                found.append(context.module)
            return next_fun(*args, **kw)

        model = models.get_model(name, NUM_CLASSES)

        def apply(v, x, model=model, interceptor=interceptor):
            with nn.intercept_methods(interceptor):
                return model.apply(v, x, train=False)

        jax.eval_shape(apply, _abstract_init(name), jax.ShapeDtypeStruct(CIFAR, jnp.float32))
        assert len(found) == len(_flat(_abstract_init(name)["batch_stats"])) // 2
        for m in found:
            assert (m.momentum, m.epsilon, m.axis) == (0.99, 1e-3, -1)


# --- initialisers -------------------------------------------------------------------------


def _he_normal_ok(kernel):
    """Std sqrt(2 / fan_in) and the Keras cut at 2 sigma of the untruncated normal."""
    fan_in = np.prod(kernel.shape[:-1])
    sigma = np.sqrt(2.0 / fan_in) / 0.87962566103423978
    values = np.asarray(kernel).ravel()
    return (
        abs(values.std() / np.sqrt(2.0 / fan_in) - 1) < 0.1
        and np.abs(values).max() <= 2 * sigma + 1e-7
        and np.abs(values).max() > 1.8 * sigma
    )


def test_initialisers_are_keras():
    key = _key(0)
    # he_normal: truncated at 2 sigma, with Keras' 0.8796 correction: std sqrt(2 / fan_in).
    assert _he_normal_ok(release.he_normal(key, (3, 3, 128, 256)))
    assert _he_normal_ok(release.he_normal(key, (256, 512)))
    # glorot_uniform: U(+-sqrt(6 / (fan_in + fan_out))), receptive field included.
    kernel = np.asarray(release.glorot_uniform(key, (3, 3, 32, 64)))
    limit = np.sqrt(6.0 / (9 * (32 + 64)))
    assert limit * 0.99 < np.abs(kernel).max() <= limit


def _layer_inits(name):
    """{layer path: (kernel_init, use_bias)} of every conv and dense layer."""
    found = {}

    def interceptor(next_fun, args, kw, context):
        m = context.module
        if isinstance(m, (nn.Conv, nn.Dense)) and context.method_name == "__call__":
            found["/".join(m.scope.path)] = (m.kernel_init, m.use_bias)
        return next_fun(*args, **kw)

    model = models.get_model(name, NUM_CLASSES)

    def apply(v, x):
        with nn.intercept_methods(interceptor):
            return model.apply(v, x, train=False)

    jax.eval_shape(apply, _abstract_init(name), jax.ShapeDtypeStruct(CIFAR, jnp.float32))
    return found


def test_each_layer_has_the_release_initialiser():
    he, glorot = release.he_normal, release.glorot_uniform
    vgg = _layer_inits("release_vgg16_bn")
    assert len(vgg) == 13 + 4
    for path, (init, bias) in vgg.items():
        want = glorot if path in ("bottleneck", "head") else he
        assert init is want and bias, path
    resnet = _layer_inits("release_resnet")
    for path, (init, bias) in resnet.items():
        assert init is glorot and bias == (path in ("bottleneck", "head")), path
    cnn = _layer_inits("release_simple_cnn")
    for path, (init, bias) in cnn.items():
        assert init is (he if path.startswith("conv") else glorot) and bias, path
    cir = _layer_inits("release_inception_resnet")  # not initialising: plain he_normal
    for path, (init, bias) in cir.items():
        is_conv = path == "stem" or path.startswith("module")
        assert init is (he if is_conv else glorot) and bias, path


def test_initial_variables_start_like_keras():
    # Zero biases, BatchNorm gamma 1, beta 0, running mean 0, running variance 1.
    variables = _initialised("release_inception_resnet")
    for path, value in _flat(variables).items():
        want = {"bias": 0.0, "scale": 1.0, "mean": 0.0, "var": 1.0}.get(path.split("/")[-1])
        if want is not None:
            np.testing.assert_array_equal(value, want, err_msg=path)


def test_shape_keyed_initialiser():
    init = release.shape_keyed(release.he_normal, _key(3))
    a = init(_key(0), (3, 3, 8, 4))
    np.testing.assert_array_equal(a, init(_key(1), (3, 3, 8, 4)))  # key ignored
    assert not np.allclose(a[..., :2], init(_key(0), (3, 3, 8, 2)))  # shape matters
    other = release.shape_keyed(release.he_normal, _key(4))
    assert not np.allclose(a, other(_key(0), (3, 3, 8, 4)))  # base key matters


def test_inception_resnet_kernels_of_equal_shape_start_identical():
    params = _flat(_initialised("release_inception_resnet")["params"])

    def k(path):
        return np.asarray(params[f"{path}/kernel"])

    groups = [
        # module 1: (3, 3, 32, 32) x 3 and (3, 3, 32, 1) x 2
        ["module1/path_b_conv1", "module1/shortcut_conv", "module1/path_b_conv2"],
        ["module1/path_a_conv", "module1/path_c_conv"],
        ["module2/path_b_conv1", "module2/shortcut_conv"],
        ["module2/path_a_conv", "module2/path_c_conv"],
        ["module3/path_b_conv1", "module3/shortcut_conv"],
        ["module3/path_a_conv", "module3/path_c_conv"],
        ["module2/path_b_conv2", "module3/path_b_conv2"],  # both (3, 3, 64, 64)
    ]
    for group in groups:
        for path in group[1:]:
            np.testing.assert_array_equal(k(path), k(group[0]), err_msg=path)
    for path in ("stem", "module2/path_b_conv1", "module2/path_b_conv2", "module3/path_a_conv"):
        assert _he_normal_ok(k(path)), path
    # Kernels of different shapes differ, and so do kernels that are not tied.
    kernels = {p[: -len("/kernel")]: v for p, v in params.items() if p.endswith("kernel")}
    distinct = {tuple(np.asarray(v).ravel()[:8]) for v in kernels.values()}
    assert len(distinct) == len(kernels) - sum(len(g) - 1 for g in groups)


def test_inception_resnet_tied_kernel_init_option():
    # Off: independent draws. One module (n=32) is enough: its three (3, 3, 32, 32)
    # kernels are tied when the option is on (see the test above). That the tied draws
    # follow the init seed (the release's fixed seed 32 does not) is test_shape_keyed_*'s.
    untied = _flat(
        _initialised("release_inception_resnet", module_widths=(32,), tied_kernel_init=False)[
            "params"
        ]
    )
    paths = [f"module1/{p}/kernel" for p in ("path_b_conv1", "shortcut_conv", "path_b_conv2")]
    assert not np.allclose(untied[paths[0]], untied[paths[1]])
    assert not np.allclose(untied[paths[1]], untied[paths[2]])
    assert all(_he_normal_ok(untied[p]) for p in paths)
