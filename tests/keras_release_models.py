"""The release's four Keras models, as written in its notebook, with named layers.

Run as a script (``KERAS_BACKEND=numpy python tests/keras_release_models.py H W C
[DIR]``), it builds ``clsclb``, ``VGG16_BN``, ``cir`` and ``ResNetForCIFAR10`` for
HxWxC inputs and 10 classes and prints, as JSON, for each model the (layer name,
weight name, shape, trainable) of every entry of ``model.weights`` (the order of
``model.get_weights()``); with ``DIR``, it also saves random weights and an
inference-mode forward pass of each model there (:func:`dump_forward`).

The code follows the release's cells 11 and 13 layer for layer, with two changes:
every layer with weights is named after the matching flax submodule path ('.' for
'/'), so that tests/test_release_models.py can compare Keras' order with
:func:`sadt_jax.models.release_weight_order`; and the ResNet's final
``AveragePooling2D`` takes the whole map (8x8 at 32x32, as released). Names do not
change the order: Keras sorts a functional model's layers by graph depth and
depth-first discovery, never by name. The numpy backend builds them in seconds.
"""

from __future__ import annotations

import json
import os
import sys

import keras
import numpy as np
from keras.layers import (
    Activation,
    AveragePooling2D,
    BatchNormalization,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAveragePooling2D,
    Input,
    MaxPooling2D,
    add,
    concatenate,
)
from keras.models import Model


def clsclb(input_shape, classes=10, dropout=0.3):
    inputs = Input(shape=input_shape)
    y = inputs
    for i in (1, 2, 3):
        y = Conv2D(
            64, 3, strides=1, activation="relu", kernel_initializer="he_normal", name=f"conv{i}"
        )(y)
        if i < 3:
            y = MaxPooling2D()(y)
        y = BatchNormalization(axis=-1, name=f"bn{i}")(y)
    y = Flatten()(y)
    y = Dropout(dropout)(y)
    y = Dense(512, activation="relu", name="dense1")(y)
    y = BatchNormalization(axis=-1, name="dense1_bn")(y)
    y = Dense(64, activation="relu", name="dense2")(y)
    y = BatchNormalization(axis=-1, name="dense2_bn")(y)
    y = Dense(10, activation="relu", name="dense3")(y)
    outputs = Dense(classes, activation="softmax", name="head")(y)
    return Model(inputs=inputs, outputs=outputs)


def vgg16_bn(input_shape, classes=10, conv_dropout=0.1, dropout=0.3):
    x = img_input = Input(shape=input_shape)
    for block, widths in enumerate(((32, 32), (64, 64), (128,) * 3, (256,) * 3, (256,) * 3), 1):
        for layer, units in enumerate(widths, 1):
            x = Conv2D(
                units,
                (3, 3),
                padding="same",
                kernel_initializer="he_normal",
                name=f"block{block}_conv{layer}",
            )(x)
            x = BatchNormalization(name=f"block{block}_bn{layer}")(x)
            x = Activation("relu")(x)
            x = Dropout(conv_dropout)(x)
        x = MaxPooling2D((2, 2), strides=(2, 2))(x)
    x = GlobalAveragePooling2D()(x)
    for i in (1, 2):
        x = Dense(512, kernel_initializer="he_normal", name=f"dense{i}")(x)
        x = BatchNormalization(name=f"dense{i}_bn")(x)
        x = Activation("relu")(x)
        x = Dropout(dropout)(x)
    x = Dense(classes, activation="relu", name="bottleneck")(x)
    x = Dense(classes, activation="softmax", name="head")(x)
    return Model(img_input, x)


def inception_resnet_module(inp, n_filters, m):
    he = lambda: keras.initializers.HeNormal(seed=32)  # noqa: E731

    def conv(filters, name, x, **kw):
        return Conv2D(
            filters, (3, 3), padding="same", kernel_initializer=he(), name=f"module{m}.{name}", **kw
        )(x)

    def bn(name, x):
        return BatchNormalization(axis=-1, name=f"module{m}.{name}")(x)

    path_a = Activation("elu")(bn("path_a_bn", conv(n_filters // 32, "path_a_conv", inp)))
    path_b = Activation("elu")(bn("path_b_bn1", conv(n_filters, "path_b_conv1", inp)))
    path_b = bn("path_b_bn2", conv(n_filters, "path_b_conv2", path_b))
    shortcut = conv(n_filters, "shortcut_conv", inp, activation="elu")
    shortcut = Activation("elu")(bn("shortcut_bn", shortcut))
    path_b = Activation("elu")(add([shortcut, path_b]))
    path_c = Activation("elu")(bn("path_c_bn", conv(n_filters // 32, "path_c_conv", inp)))
    output = concatenate([path_a, path_b, path_c])
    output = MaxPooling2D(pool_size=(2, 2))(output)
    return Dropout(0.2)(output)


def cir(input_shape, classes=10):
    inputs = Input(shape=input_shape)
    y = Conv2D(32, (3, 3), kernel_initializer=keras.initializers.HeNormal(seed=32), name="stem")(
        inputs
    )
    for m, n in enumerate((32, 64, 64), 1):
        y = inception_resnet_module(y, n, m)
    y = Flatten()(y)
    y = Dropout(0.2)(y)
    y = Dense(128, activation="elu", name="dense1")(y)
    y = Dropout(0.2)(y)
    y = Dense(classes, activation="relu", name="bottleneck")(y)
    outputs = Dense(classes, activation="softmax", name="head")(y)
    return Model(inputs=inputs, outputs=outputs)


def conv2d_bn(x, filters, kernel_size, strides, name):
    prefix, suffix = name
    x = Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        name=f"{prefix}conv{suffix}",
    )(x)
    return BatchNormalization(name=f"{prefix}bn{suffix}")(x)


def residual_block(x, filters, downsample, name):
    if downsample:
        residual_x = conv2d_bn(x, filters, 1, 2, (f"{name}.shortcut_", ""))
        stride = 2
    else:
        residual_x = x
        stride = 1
    residual = Activation("relu")(conv2d_bn(x, filters, (3, 3), stride, (f"{name}.", "1")))
    residual = conv2d_bn(residual, filters, (3, 3), 1, (f"{name}.", "2"))
    return Activation("relu")(add([residual_x, residual]))


def resnet_for_cifar10(input_shape, classes=10, block_layers_num=5):
    x = inputs = Input(shape=input_shape)
    x = Activation("relu")(conv2d_bn(x, 8, (3, 3), 1, ("stem_", "")))
    for stage, filters in enumerate((8, 32, 64), 1):
        for block in range(1, block_layers_num + 1):
            x = residual_block(x, filters, stage > 1 and block == 1, f"stage{stage}_block{block}")
    x = AveragePooling2D(pool_size=(x.shape[1], x.shape[2]), padding="valid")(x)
    x = Flatten()(x)
    x = Dense(classes, activation="relu", name="bottleneck")(x)
    x = Dense(classes, activation="softmax", name="head")(x)
    return Model(inputs, x)


BUILDERS = {
    "release_simple_cnn": clsclb,
    "release_vgg16_bn": vgg16_bn,
    "release_inception_resnet": cir,
    "release_resnet": resnet_for_cifar10,
}


def describe(model):
    """(layer name, weight name, shape, trainable) of each weight, in get_weights() order."""
    owner = {id(w): layer.name for layer in model.layers for w in layer.weights}
    return [(owner[id(w)], w.name, list(w.shape), bool(w.trainable)) for w in model.weights]


def dump_forward(model, path, seed):
    """Sets random weights, runs an inference-mode forward and saves both to ``path``.

    Kernels are drawn from N(0, 1.5 / fan_in), BN scales from U(0.5, 1.5), running
    variances from U(0.5, 2), everything else from N(0, 0.1^2): activations stay O(1)
    and see both signs. The input is N(0, 1), batch 2. The softmax of the last layer is
    switched off, so the saved output is the logits. The ``.npz`` holds ``w0, w1, ...``
    (``get_weights()`` order), ``x`` and ``logits``.
    """
    rng = np.random.default_rng(seed)
    weights = []
    for w in model.weights:
        shape = tuple(w.shape)
        if len(shape) > 1:
            value = rng.normal(0.0, np.sqrt(1.5 / np.prod(shape[:-1])), shape)
        elif w.name == "gamma":
            value = rng.uniform(0.5, 1.5, shape)
        elif w.name == "moving_variance":
            value = rng.uniform(0.5, 2.0, shape)
        else:
            value = rng.normal(0.0, 0.1, shape)
        weights.append(value.astype(np.float32))
    model.set_weights(weights)
    model.layers[-1].activation = keras.activations.linear
    x = rng.normal(0.0, 1.0, (2, *model.input_shape[1:])).astype(np.float32)
    logits = np.asarray(model(x, training=False))
    np.savez(path, x=x, logits=logits, **{f"w{i}": w for i, w in enumerate(weights)})


if __name__ == "__main__":
    shape = tuple(int(v) for v in sys.argv[1:4])
    models = {name: build(shape) for name, build in BUILDERS.items()}
    if len(sys.argv) > 4:  # a folder: also dump weights and an inference forward
        for i, (name, model) in enumerate(models.items()):
            dump_forward(model, os.path.join(sys.argv[4], f"{name}.npz"), seed=i)
    print(json.dumps({name: describe(model) for name, model in models.items()}))
