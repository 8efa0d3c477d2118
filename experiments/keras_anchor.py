r"""The Keras anchor: the release's simple CNN in tf.keras, a base and a SADT-T1 step, timed.

The network is the authors' Keras model (``release_layout=True`` in
:class:`sadt_jax.models.SimpleCNN`): three 3x3 VALID convolutions with 64 filters and ReLU,
2x2 max-pooling after the first two, BatchNorm after each (after the pool), then flatten,
dropout 0.3, Dense 512 ReLU, BatchNorm, Dense 64 ReLU, BatchNorm, Dense 10 ReLU and the output
Dense (logits; the release's softmax sits in the loss here, as in ours). Adam (lr 1e-4,
eps 1e-7) and softmax cross-entropy, as in ours.

* **base**: one tape, one Adam update.
* **sadt_t1**, written from the algorithm: clean pass at θ (CE, gradient g, p = softmax of
  the clean logits, a constant), first Adam update to θ'; snapshot of every weight (BatchNorm
  running statistics included); teacher = θ' + 1e-3 (g + 1e-4 ξ on kernels, ξ ~ N(0, 1));
  teacher pass in training mode and the gradient of KL(q || p) (Keras' clipped KL) at the
  teacher's weights; restore the snapshot; second Adam update with g + g_KD.

Both are ``tf.function``-compiled ``tf.GradientTape`` steps, timed one step at a time (the
loss is fetched after each step), the two methods interleaved, after ``--warmup`` untimed
steps. Run through ``experiments/benchmark.py --compare_keras``, which alternates this
process with ours over several rounds; alone::

    python experiments/keras_anchor.py --batch_size 512 --steps 10 --out keras.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

METHODS = ("base", "sadt_t1")


def build_model(keras, shape: Sequence[int], num_classes: int, dropout: float = 0.3):
    """The release's simple CNN (``clsclb``), returning logits."""
    layers = keras.layers
    inputs = keras.Input(tuple(shape))
    x = inputs
    for pool in (True, True, False):
        conv = layers.Conv2D(64, 3, activation="relu", kernel_initializer="he_normal")
        x = conv(x)  # padding "valid"
        if pool:
            x = layers.MaxPooling2D(2)(x)
        x = layers.BatchNormalization()(x)
    x = layers.Dropout(dropout)(layers.Flatten()(x))
    x = layers.BatchNormalization()(layers.Dense(512, activation="relu")(x))
    x = layers.BatchNormalization()(layers.Dense(64, activation="relu")(x))
    x = layers.Dense(10, activation="relu")(x)
    return keras.Model(inputs, layers.Dense(num_classes)(x))


def make_step(tf, keras, model, method: str, learning_rate: float = 1e-4):
    """A ``tf.function`` ``(images, labels) -> loss`` doing one training step of ``method``."""
    opt = keras.optimizers.Adam(learning_rate=learning_rate, epsilon=1e-7)
    params = model.trainable_variables
    opt.build(params)

    def ce(labels, logits):
        return tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        )

    def kl(a, b):  # keras.losses.KLDivergence: mean over the batch of sum a log(a / b), clipped
        a, b = tf.clip_by_value(a, 1e-7, 1.0), tf.clip_by_value(b, 1e-7, 1.0)
        return tf.reduce_mean(tf.reduce_sum(a * tf.math.log(a / b), axis=-1))

    @tf.function
    def base(images, labels):
        with tf.GradientTape() as tape:
            loss = ce(labels, model(images, training=True))
        opt.apply_gradients(list(zip(tape.gradient(loss, params), params, strict=True)))
        return loss

    @tf.function
    def sadt_t1(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = ce(labels, logits)
        g = tape.gradient(loss, params)
        p = tf.stop_gradient(tf.nn.softmax(logits))
        opt.apply_gradients(list(zip(g, params, strict=True)))  # theta'
        snapshot = [tf.identity(v) for v in model.weights]  # running statistics included
        for v, gv in zip(params, g, strict=True):
            eps = gv + 1e-4 * tf.random.normal(tf.shape(gv)) if len(v.shape) > 1 else gv
            v.assign_add(1e-3 * eps)
        with tf.GradientTape() as tape:
            q = tf.nn.softmax(model(images, training=True))
            kd = kl(q, p)
        g_kd = tape.gradient(kd, params)
        for v, saved in zip(model.weights, snapshot, strict=True):
            v.assign(saved)
        g_total = [a + b for a, b in zip(g, g_kd, strict=True)]
        opt.apply_gradients(list(zip(g_total, params, strict=True)))
        return loss

    return {"base": base, "sadt_t1": sadt_t1}[method]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Times both methods; returns ``{method: {...}, "_meta": {...}}``."""
    import tensorflow as tf

    keras = tf.keras
    tf.random.set_seed(args.seed)
    shape = tuple(int(s) for s in args.dataset_shape.split(","))
    images = tf.random.normal((args.batch_size, *shape))
    labels = tf.random.uniform((args.batch_size,), 0, args.num_classes, dtype=tf.int32)
    steps, compile_s, params = {}, {}, {}
    for m in METHODS:
        model = build_model(keras, shape, args.num_classes)
        params[m] = int(sum(v.numpy().size for v in model.trainable_variables))
        steps[m] = make_step(tf, keras, model, m)
        t0 = time.perf_counter()
        steps[m](images, labels).numpy()  # trace + first run
        compile_s[m] = time.perf_counter() - t0
        for _ in range(args.warmup):
            steps[m](images, labels).numpy()
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    per_repeat: dict[str, list[float]] = {m: [] for m in METHODS}
    loss = {}
    for i in range(args.repeats):
        for m in METHODS if i % 2 == 0 else reversed(METHODS):
            ts = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                loss[m] = float(steps[m](images, labels).numpy())
                ts.append(time.perf_counter() - t0)
            times[m] += ts
            per_repeat[m].append(1e3 * statistics.median(ts))
    out: dict[str, Any] = {
        m: {
            "step_ms": 1e3 * statistics.median(times[m]),
            "step_ms_per_repeat": per_repeat[m],
            "compile_s": compile_s[m],
            "trainable_params": params[m],
            "final_loss": loss[m],
        }
        for m in METHODS
    }
    out["_meta"] = {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "batch_size": args.batch_size,
        "dataset_shape": list(shape),
    }
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset_shape", default="28,28,1")
    p.add_argument("--num_classes", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    results = run(args)
    print(json.dumps({m: results[m]["step_ms"] for m in METHODS}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
