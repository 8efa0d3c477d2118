"""The release protocol (``configs/<family>.py:<method>,release``), rule by rule and end to end.

Each rule of the authors' released code that the project offers as a config field has a test
here: the 1024-buffer shuffle (against ``tf.data`` itself), the CutMix partner stream and the
partial last batch, the 1x1 minimum CutMix box, the selection rule and its kept ``best``
weights, the last-batch validation loss, the test split, and the optimizer restarted every
epoch with a bit-exact resume from the middle of an epoch. The last test trains mock CIFAR-10
through ``train_and_evaluate`` under the whole switch.
"""

from __future__ import annotations

import json
import math
import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import cifar10, cifar100, common, fashion_mnist
from sadt_jax import models
from sadt_jax.algorithm.state import TrainState
from sadt_jax.data import augment, pipeline, release_order
from sadt_jax.train import loop, protocol, steps, validation
from sadt_jax.train.selection import Selection, select_epoch
from sadt_jax.train.validation import ConfigError

# ----------------------------------------------------------------------------- the switch


@pytest.mark.parametrize(
    "family, arg",
    [
        (cifar10, "sadt_t1,release"),
        (cifar10, "sam,b2048,release"),
        (cifar100, "base,release"),
        (fashion_mnist, "sadt_t1,release"),
    ],
)
def test_release_switch_sets_every_part(family, arg):
    config = family.get_config(arg)
    clean = family.get_config(arg.replace(",release", ""))
    assert config.data.normalization == "scale" and clean.data.normalization == "standardize"
    assert config.data.order == "buffer" and config.data.shuffle_buffer == 1024
    assert config.data.cutmix_partner == "stream" and config.data.cutmix_box == "release"
    assert config.data.drop_remainder is False and config.data.release_split is True
    assert config.optim.reset_every_epoch is True and config.optim.adam_eps_placement == "keras"
    assert config.selection.loss == "last_batch" and config.selection.first_epoch == 4
    assert config.model.name == "release_simple_cnn" and config.model.dropout_rate is None
    assert config.sadt.bn_stats == ("all" if config.method == "sam" else None)
    if "kl_clip" in config.sadt:
        assert config.sadt.kl_clip == 1e-7
    # The clean protocol keeps the project's defaults.
    assert clean.data.order == "permutation" and clean.data.drop_remainder is True
    assert clean.optim.reset_every_epoch is False and clean.selection.first_epoch == 1
    assert clean.selection.loss == "full" and clean.data.release_split is False


def test_release_switch_maps_paper_models():
    config = common.apply_release(cifar10.get_config("base,b512"))
    assert config.model.name == "release_simple_cnn"
    for name, release in common.RELEASE_MODELS.items():
        c = cifar10.get_config("base")
        c.model.name = name
        assert common.apply_release(c).model.name == release


def test_bad_protocol_option_lists_valid_ones():
    with pytest.raises(ValueError, match="valid options: b512, b2048, sam_recipe, clean, release"):
        cifar10.get_config("sadt_t1,relase")
    with pytest.raises(ValueError, match="valid options: clean, release"):
        fashion_mnist.get_config("sadt_t1,b512")


def test_protocol_fields_are_validated():
    config = fashion_mnist.get_config("base")
    config.data.order = "shuffle"
    config.selection.first_epoch = 0
    with pytest.raises(ConfigError) as e:
        validation.validate_config(config)
    assert "data.order='shuffle'" in str(e.value) and "selection.first_epoch=0" in str(e.value)


def test_partial_batch_must_split_over_devices(monkeypatch):
    config = cifar10.get_config("base,release")  # batch 512: CIFAR's remainder is 336
    monkeypatch.setattr(validation.jax, "device_count", lambda: 16)
    validation.validate_against_data(config, 50_000)  # 336 = 16 x 21
    with pytest.raises(ConfigError, match="partial last batch of 16 examples .* 32 devices"):
        monkeypatch.setattr(validation.jax, "device_count", lambda: 32)
        validation.validate_against_data(config, 50_000 - 320)
    monkeypatch.setattr(validation.jax, "device_count", lambda: 16)
    config.sadt.m_sharpness = 4
    with pytest.raises(ConfigError, match="m_sharpness=4 does not divide .* 21 examples"):
        validation.validate_against_data(config, 50_000)
    config.data.drop_remainder = True
    validation.validate_against_data(config, 50_000)


# ----------------------------------------------------------------------------- the shuffle


def test_buffer_shuffle_limits():
    rng = np.random.default_rng(0)
    order = np.arange(50)
    np.testing.assert_array_equal(release_order.buffer_shuffle(order, 1, rng), order)
    full = release_order.buffer_shuffle(order, 64, rng)
    assert sorted(full.tolist()) == order.tolist() and not np.array_equal(full, order)


def test_buffer_shuffle_is_local():
    # Output t is one of the first t + buffer inputs; every input appears once.
    n, buffer = 5000, 64
    out = release_order.buffer_shuffle(np.arange(n), buffer, np.random.default_rng(1))
    assert sorted(out.tolist()) == list(range(n))
    assert np.all(out < np.arange(n) + buffer)
    assert np.abs(out - np.arange(n)).mean() < 2 * buffer  # a window, not a permutation


def test_buffer_shuffle_matches_tf_data_distribution():
    # P(input i lands at output t) under tf.data's own shuffle vs the emulation.
    tf = pytest.importorskip("tensorflow")
    n, buffer, trials = 8, 3, 3000
    ds = tf.data.Dataset.range(n).shuffle(buffer, seed=0, reshuffle_each_iteration=True)
    ref = np.stack(list(ds.repeat(trials).batch(n).as_numpy_iterator()))  # one order per row
    rng = np.random.default_rng(0)
    ours = np.stack(
        [release_order.buffer_shuffle(np.arange(n), buffer, rng) for _ in range(trials)]
    )

    def position_freq(perms):
        freq = np.zeros((n, n))
        for t in range(n):
            freq[:, t] = np.bincount(perms[:, t], minlength=n) / trials
        return freq

    np.testing.assert_allclose(position_freq(ours), position_freq(ref), atol=0.05)
    assert position_freq(ours)[buffer + 1 :, 0].max() == 0.0  # output 0 is among the first 3


def test_permutation_order_is_the_projects():
    for epoch in (0, 3):
        plan = release_order.epoch_batches(1000, 96, seed=5, epoch=epoch)
        indices = pipeline.train_batch_indices(1000, 96, seed=5, epoch=epoch)
        np.testing.assert_array_equal(np.stack([p["index"] for p in plan]), indices)


def test_release_order_partial_batch_kept_and_partners():
    # CIFAR's 50,000 at batch 512: 98 steps, the last of 336 (97 when dropped).
    kwargs = dict(seed=0, epoch=2, order="buffer", partner=True)
    plan = release_order.epoch_batches(50_000, 512, drop_remainder=False, **kwargs)
    assert len(plan) == 98 and plan[-1]["index"].shape == plan[-1]["partner"].shape == (336,)
    examples = np.concatenate([p["index"] for p in plan])
    partners = np.concatenate([p["partner"] for p in plan])
    assert sorted(examples.tolist()) == sorted(partners.tolist()) == list(range(50_000))
    assert np.mean(examples == partners) < 0.01  # two independent streams
    dropped = release_order.epoch_batches(50_000, 512, drop_remainder=True, **kwargs)
    assert len(dropped) == 97
    again = release_order.epoch_batches(50_000, 512, drop_remainder=False, **kwargs)
    np.testing.assert_array_equal(again[5]["partner"], plan[5]["partner"])  # (seed, epoch)
    other = release_order.epoch_batches(50_000, 512, drop_remainder=False, **{**kwargs, "epoch": 3})
    assert not np.array_equal(other[0]["index"], plan[0]["index"])


def test_release_order_processes_partition_the_partial_batch():
    kwargs = dict(seed=1, epoch=0, order="buffer", partner=True, drop_remainder=False)
    single = release_order.epoch_batches(1000, 96, **kwargs)  # remainder 40
    shares = [
        release_order.epoch_batches(1000, 96, process_index=p, process_count=4, **kwargs)
        for p in range(4)
    ]
    for s, full in enumerate(single):
        for key in ("index", "partner"):
            np.testing.assert_array_equal(np.concatenate([sh[s][key] for sh in shares]), full[key])
    with pytest.raises(ValueError, match="partial last batch of 40 examples .* 16 devices"):
        release_order.check_partial_batch(1000, 96, 16, drop_remainder=False)
    release_order.check_partial_batch(1000, 96, 16, drop_remainder=True)


# ----------------------------------------------------------------------------- CutMix


def _release_box_reference(lam, cy, cx, size):
    """The release's box rule in plain NumPy, for one example."""
    cut = int(np.floor(size * np.sqrt(1.0 - lam)))
    half = cut // 2
    x1, x2 = np.clip(cx - half, 0, size), np.clip(cx + half, 0, size)
    y1, y2 = np.clip(cy - half, 0, size), np.clip(cy + half, 0, size)
    w, h = max(x2 - x1, 1), max(y2 - y1, 1)
    mask = np.zeros((size, size), bool)
    mask[y1 : y1 + h, x1 : x1 + w] = True
    return mask


def test_release_cutmix_box_matches_the_release_rule():
    key = jax.random.PRNGKey(3)
    size, n = 32, 400
    lam = jnp.concatenate([jnp.linspace(0.0, 1.0, n - 4), jnp.array([1.0, 0.999, 0.9962, 0.5])])
    boxes = np.asarray(augment.cutmix_boxes(key, lam, size, size, min_box=True))
    key_y, key_x = jax.random.split(key)  # the same centre draws as cutmix_boxes
    cy = np.asarray(jax.random.randint(key_y, lam.shape, 0, size))
    cx = np.asarray(jax.random.randint(key_x, lam.shape, 0, size))
    for i in range(n):
        ref = _release_box_reference(float(lam[i]), int(cy[i]), int(cx[i]), size)
        np.testing.assert_array_equal(boxes[i], ref, err_msg=f"example {i}, lam {lam[i]}")
    # lambda > 255/256: the box collapses: 1x1 under the release's rule, empty otherwise.
    collapsed = np.asarray(lam) > 255 / 256
    assert collapsed.sum() >= 3 and np.all(boxes[collapsed].sum(axis=(1, 2)) == 1)
    reference = np.asarray(augment.cutmix_boxes(key, lam, size, size))
    assert np.all(reference[collapsed].sum(axis=(1, 2)) == 0)
    np.testing.assert_array_equal(reference[~collapsed], boxes[~collapsed])


def test_cutmix_partner_stream_labels_and_pixels():
    b, size, k = 64, 8, 5
    images = jnp.zeros((b, size, size, 1), jnp.uint8)
    partners = jnp.full((b, size, size, 1), 255, jnp.uint8)
    labels = jax.nn.one_hot(jnp.arange(b) % k, k)
    partner_labels = jax.nn.one_hot((jnp.arange(b) + 1) % k, k)
    mixed, mixed_labels = augment.cutmix(
        jax.random.PRNGKey(0),
        images,
        labels,
        alpha=0.25,
        partner_images=partners,
        partner_labels=partner_labels,
        box="release",
    )
    pasted = np.asarray(mixed[..., 0] == 255).sum(axis=(1, 2)) / size**2  # 1 - lambda'
    assert pasted.min() >= 1 / size**2  # every example takes at least one partner pixel
    expected = (1 - pasted)[:, None] * np.asarray(labels) + pasted[:, None] * partner_labels
    np.testing.assert_allclose(np.asarray(mixed_labels), expected, atol=1e-6)
    with pytest.raises(ValueError, match="together"):
        augment.cutmix(jax.random.PRNGKey(0), images, labels, partner_images=partners)


def test_preprocess_uses_the_partner_stream_and_scaling():
    b = 16
    batch = {
        "image": jnp.zeros((b, 8, 8, 3), jnp.uint8),
        "label": jnp.zeros((b,), jnp.int32),
        "partner_image": jnp.full((b, 8, 8, 3), 255, jnp.uint8),
        "partner_label": jnp.ones((b,), jnp.int32),
    }
    out = steps.preprocess(
        jax.random.PRNGKey(1),
        batch,
        augment_name="cutmix",
        mean=np.zeros(3, np.float32),
        std=np.full(3, 255.0, np.float32),
        num_classes=2,
        cutmix_alpha=0.25,
        cutmix_box="release",
    )
    values = np.unique(np.asarray(out["image"]))
    assert set(values.tolist()) == {0.0, 1.0}  # x / 255; partner pixels are 1
    assert np.all(np.asarray(out["label"])[:, 1] > 0)  # every example mixed with its partner


# ----------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    "losses, first_epoch, expected",
    [
        ([5, 4, 3, 2, 1], 4, (5, 1)),
        ([1, 2, 3, 1.5, 0.9], 4, (5, 0.9)),  # epochs 1-3 count in the minimum
        ([1, 2, 3, 4, 5], 4, (0, None)),  # never fires: the initial weights
        ([3, 2, 1, 1], 4, (0, None)),  # strict: a tie does not fire
        ([3, 2, 1, 0.5, 0.7, 0.4], 4, (6, 0.4)),
        ([3, 2, 2.5], 1, (2, 2)),  # the project's rule: the lowest loss of any epoch
        ([], 4, (0, None)),
    ],
)
def test_select_epoch(losses, first_epoch, expected):
    assert select_epoch(losses, first_epoch) == expected


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(x)


def _tiny_state(seed=0):
    model = _Tiny()
    variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4)))
    return TrainState.create(
        apply_fn=model.apply, variables=variables, tx=optax.adam(1e-3), key=jax.random.PRNGKey(0)
    )


def _shift(state, value):
    return state.replace(
        params=jax.tree.map(lambda p: p + value, state.params),
        model_state=jax.tree.map(lambda p: p + value, state.model_state),
    )


def _config(first_epoch=4, loss="last_batch"):
    config = fashion_mnist.get_config("base,release")
    config.selection.first_epoch, config.selection.loss = first_epoch, loss
    return config


def _row(epoch, selection_loss):
    return {
        "epoch": epoch,
        "val_loss": 9.0,
        "val_selection_loss": selection_loss,
        "val_accuracy": 0.1 * epoch,
        "test_loss": 1.0,
        "test_accuracy": 0.01 * epoch,
    }


def _mean_param(state):
    return {"loss": 0.0, "accuracy": float(state.params["Dense_0"]["bias"][0])}


def test_selection_keeps_and_tests_the_selected_weights(tmp_path):
    initial = _tiny_state()
    sel = Selection(_config(), str(tmp_path))
    sel.start(initial, lambda: initial, [])
    assert sel.epoch == 0 and os.listdir(tmp_path / "best") == ["0"]
    losses = [2.0, 1.0, 3.0, 1.5, 0.5, 0.7]
    fired = [sel.update(e, _row(e, L), _shift(initial, e)) for e, L in enumerate(losses, 1)]
    assert fired == [False, False, False, False, True, False]
    assert sel.epoch == 5 and sel.loss == 0.5 and os.listdir(tmp_path / "best") == ["5"]
    out = sel.test(_mean_param, initial)
    assert out["epoch"] == 5 and out["tested"] and out["test_accuracy"] == 5.0  # bias 0 + 5
    assert out["val_accuracy"] == 0.5
    meta = json.loads((tmp_path / "best" / "5" / "meta" / "metadata").read_text())
    assert meta["epoch"] == 5 and meta["selection_loss"] == 0.5
    saved = ocp.StandardCheckpointer().restore(tmp_path / "best" / "5" / "variables")
    np.testing.assert_array_equal(
        saved["model_state"]["batch_stats"]["BatchNorm_0"]["var"],
        np.asarray(initial.model_state["batch_stats"]["BatchNorm_0"]["var"]) + 5,
    )  # BatchNorm statistics are kept with the parameters
    sel.close()

    # Resume after epoch 6: the rule is recomputed from the rows and the weights read back.
    again = Selection(_config(), str(tmp_path))
    history = [_row(e, L) for e, L in enumerate(losses, 1)]
    again.start(initial, lambda: initial, history)
    assert again.epoch == 5 and again.minimum == 0.5
    assert again.test(_mean_param, initial)["test_accuracy"] == 5.0
    again.close()


def test_selection_falls_back_to_the_initial_weights(tmp_path):
    initial = _tiny_state()
    sel = Selection(_config(), str(tmp_path))
    sel.start(initial, lambda: initial, [])
    for e, loss in enumerate([1.0, 2.0, 3.0, 1.0, 1.2], 1):  # epoch 4 ties epoch 1: no
        assert not sel.update(e, _row(e, loss), _shift(initial, e))
    out = sel.test(_mean_param, _shift(initial, 100))
    assert out["epoch"] == 0 and out["selection_loss"] is None
    assert out["test_accuracy"] == 0.0 and out["tested"]  # the untrained initial bias
    sel.close()


def test_selection_loss_full_uses_val_loss(tmp_path):
    config = _config(first_epoch=1, loss="full")
    config.ckpt.keep_best = False
    sel = Selection(config, str(tmp_path))
    initial = _tiny_state()
    sel.start(initial, lambda: initial, [])
    assert sel.update(1, _row(1, 5.0), initial) and sel.loss == 9.0
    assert not (tmp_path / "best").exists()


# ----------------------------------------------------------------------------- evaluation


def test_evaluate_reports_the_last_batch_loss():
    model = models.get_model("simple_cnn", 10)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), train=False)
    state = TrainState.create(
        apply_fn=model.apply, variables=variables, tx=optax.adam(1e-3), key=jax.random.PRNGKey(1)
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (70, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, (70,), dtype=np.int32)
    mean, std = np.zeros(1, np.float32), np.full(1, 255.0, np.float32)
    eval_fn = jax.jit(lambda s, b: steps.eval_sums(s, b, mean=mean, std=std))
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    out = protocol.evaluate(eval_fn, state, images, labels, 32, NamedSharding(mesh, P("data")))
    logits = model.apply(variables, images.astype(np.float32) / 255, train=False)
    ce = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), labels[:, None], 1)[:, 0]
    assert math.isclose(out["last_batch_loss"], ce[64:].mean(), rel_tol=1e-5)  # 70 = 2*32 + 6
    assert math.isclose(out["loss"], ce.mean(), rel_tol=1e-5)
    assert math.isclose(
        out["accuracy"], float(np.mean(np.argmax(logits, -1) == labels)), rel_tol=1e-6
    )
    config = _config()
    config.batch_size, config.eval_batch_size = 512, 1000
    assert protocol.validation_batch_size(config) == 512
    config.selection.loss = "full"
    assert protocol.validation_batch_size(config) == 1000


# ----------------------------------------------------------------------------- end to end


def _release_model():
    # The release's simple CNN where the models package has it; the project's otherwise.
    return "release_simple_cnn" if "release_simple_cnn" in models.MODEL_NAMES else "simple_cnn"


def _mock_cifar_release_config():
    config = cifar10.get_config("base,release")
    config.model.name = _release_model()
    config.num_epochs = 5
    config.batch_size = 32
    config.eval_batch_size = 64
    config.log_every_steps = 1
    config.data.num_validation = 40
    return config


def _adam_counts(workdir):
    steps_dir = os.path.join(workdir, "checkpoints")
    last = max(int(d) for d in os.listdir(steps_dir) if d.isdigit())
    tree = ocp.StandardCheckpointer().restore(os.path.join(steps_dir, str(last), "state"))
    leaves = jax.tree_util.tree_leaves_with_path(tree["state"]["opt_state"])
    return {int(v) for p, v in leaves if "count" in jax.tree_util.keystr(p)}


def _params(workdir):
    steps_dir = os.path.join(workdir, "checkpoints")
    last = max(int(d) for d in os.listdir(steps_dir) if d.isdigit())
    tree = ocp.StandardCheckpointer().restore(os.path.join(steps_dir, str(last), "state"))
    return jax.tree.leaves(tree["state"])


@pytest.fixture
def compilation_cache(tmp_path):
    """A persistent compilation cache for the test: the resumed runs reuse the first's programs."""
    old = {
        k: getattr(jax.config, k)
        for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    }
    from jax._src import compilation_cache

    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    for k, v in old.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


def test_release_protocol_mock_cifar10_end_to_end(tmp_path, monkeypatch, compilation_cache):
    """Base under the whole release switch on mock CIFAR-10 (100 train / 100 test images).

    Batch 32 keeps the partial last batch (3 x 32 + 4 = 4 steps per epoch); validation is the
    first 40 test images in batches of 32 (the selection loss is the last 8 images' CE); test
    is images 41-99. Then the same run is preempted in the middle of epoch 3 and resumed: it
    ends bit for bit where the uninterrupted run did, so the optimizer is reset at epoch starts
    only, never on a mid-epoch resume.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    from sadt_jax.train import Preempted, train_and_evaluate

    config = _mock_cifar_release_config()
    with tfds.testing.mock_data(num_examples=100):
        summary = train_and_evaluate(config, str(tmp_path / "straight"))
    assert summary["steps_per_epoch"] == 4 and summary["steps"] == 20
    rows = [json.loads(x) for x in open(tmp_path / "straight" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20]
    assert all("val_selection_loss" in r for r in rows)
    # Adam and its schedule restart every epoch: 4 updates since the last epoch began, not 20.
    assert _adam_counts(tmp_path / "straight") == {4}
    # The selection rule on the rows, the kept weights and their test.
    losses = [r["val_selection_loss"] for r in rows]
    epoch, loss = select_epoch(losses, 4)
    selected = summary["selected"]
    assert selected["epoch"] == epoch and selected["selection_loss"] == loss and selected["tested"]
    assert os.listdir(tmp_path / "straight" / "best") == [str(epoch)]
    if epoch:
        assert selected["test_accuracy"] == rows[epoch - 1]["test_accuracy"]
    assert 0.0 <= selected["test_accuracy"] <= 1.0
    # Test = images 41-99 (image 40 unused): every accuracy is a multiple of 1/59 (not 1/60).
    accuracies = [r["test_accuracy"] for r in rows]
    assert all(abs(a * 59 - round(a * 59)) < 1e-9 for a in accuracies)
    assert any(0 < a < 1 for a in accuracies)

    # Preempt in the middle of epoch 3 (after its 2nd step), then resume.
    real = loop._Preemption.stop_at

    def stop_at(self, step):  # polled before every step
        if step == 10:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, step)

    monkeypatch.setattr(loop._Preemption, "stop_at", stop_at)
    resumed = tmp_path / "resumed"
    with tfds.testing.mock_data(num_examples=100):
        with pytest.raises(Preempted, match="epoch 3"):
            train_and_evaluate(config, str(resumed))
        monkeypatch.setattr(loop._Preemption, "stop_at", real)
        second = train_and_evaluate(config, str(resumed))
    assert [json.loads(x) for x in open(resumed / "metrics.jsonl")] == rows
    for a, b in zip(_params(tmp_path / "straight"), _params(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert second["selected"] == {**selected, "checkpoint": str(resumed / "best")}
