"""Fields shared by every config family, and the method -> config plumbing.

Every config has the same sections, so any field can be overridden on the command
line (``--config.sadt.rho=2e-3``) and unknown keys fail:

* top level: ``method``, ``seed``, ``init_seed``, ``num_epochs`` / ``num_steps``,
  ``batch_size``, ``eval_batch_size``, logging and thresholds;
* ``data``: dataset name, location, validation split, augmentation;
* ``model``: architecture name and its options;
* ``optim``: the base optimizer U and its schedule;
* ``sadt``: :class:`sadt_jax.SADTConfig` fields. ``None`` (a placeholder) means
  "the preset of ``method``" (see :mod:`sadt_jax.algorithm.methods`), so a field
  set here overrides exactly one hyperparameter of the method;
* ``selection``: which weights are selected, kept (``workdir/best/``) and tested;
* ``ckpt``: checkpointing.

Two protocols (:data:`PROTOCOLS`): the project's (the defaults below) and the authors'
released code (:func:`apply_release`, the ``release`` switch of every config family, e.g.
``configs/cifar10.py:sadt_t1,release``). Every part of the release switch is an ordinary field
and can also be set alone (the table in :func:`apply_release`).
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from sadt_jax.algorithm.config import cli_fields
from sadt_jax.algorithm.methods import METHODS

# config.sadt's fields: every SADTConfig field (t2_paths as two path strings), derived from
# SADTConfig itself so the two never drift apart (None = the method's preset value).
SADT_FIELDS = cli_fields()


def parse_method(arg: str | None, default: str) -> str:
    """The method named by ``get_config``'s argument; fails listing valid names."""
    method = arg or default
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    return method


def base_config(method: str) -> ml_collections.ConfigDict:
    """The sections and defaults every family starts from (the paper's protocol)."""
    config = ml_collections.ConfigDict()
    config.method = method
    config.seed = 0  # data order, dropout, noise
    config.init_seed = placeholder(int)  # initial weights; None = seed (same across methods)
    config.num_epochs = 20
    config.num_steps = placeholder(int)  # if set, overrides num_epochs
    config.batch_size = 512  # global batch, over all devices and hosts
    config.eval_batch_size = 1000
    config.log_every_steps = 20
    config.accuracy_thresholds = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9)
    config.teacher_every = 1  # sample teachers every k steps (plain base updates between)

    config.data = ml_collections.ConfigDict()
    config.data.name = "fashion_mnist"
    config.data.data_dir = placeholder(str)  # Debian IDX folder or tfds data_dir
    config.data.num_validation = 3000  # validation = first 3000 test images (paper)
    config.data.max_train_examples = placeholder(int)
    config.data.max_test_examples = placeholder(int)  # quick runs: first N of the test split
    config.data.augment = "cutmix"  # "cutmix" | "crop_flip" | "crop_flip_cutmix" | "none"
    config.data.cutmix_alpha = 0.25
    config.data.cutmix_box = "reference"  # "reference" | "release" (1x1 minimum box)
    config.data.cutmix_partner = "batch"  # "batch" (a permutation) | "stream" (a second stream)
    config.data.normalization = "standardize"  # "standardize" (per channel) | "scale" (x / 255)
    config.data.order = "permutation"  # "permutation" | "buffer" (tf.data-style local shuffle)
    config.data.shuffle_buffer = 1024  # buffer of order="buffer"
    config.data.drop_remainder = True  # False keeps the partial last batch
    config.data.release_split = False  # True: test = test images num_validation + 1 onwards

    config.model = ml_collections.ConfigDict()
    config.model.name = "simple_cnn"
    config.model.dtype = "float32"  # computation dtype; "bfloat16" keeps float32 params
    config.model.dropout_rate = placeholder(float)  # None = the model's default
    config.model.pool = placeholder(str)  # simple_cnn only: "max" (default) or "avg"

    config.optim = ml_collections.ConfigDict()
    config.optim.optimizer = "adam"  # "adam" | "sgd"
    config.optim.schedule = "exponential"  # "exponential" | "cosine" | "constant"
    config.optim.learning_rate = 1e-4
    config.optim.decay_rate = 0.9
    config.optim.decay_steps = 1000
    config.optim.staircase = False
    config.optim.warmup_epochs = 0.0
    config.optim.momentum = 0.9
    config.optim.nesterov = False
    config.optim.weight_decay = 0.0
    config.optim.adam_eps = 1e-7
    config.optim.adam_eps_placement = "optax"  # "optax" | "keras" (before bias correction)
    config.optim.reset_every_epoch = False  # True: optimizer state (and schedule) anew each epoch
    config.optim.agc_clip = 0.01

    config.sadt = ml_collections.ConfigDict({k: placeholder(t) for k, t in SADT_FIELDS.items()})

    config.selection = ml_collections.ConfigDict()
    config.selection.loss = "full"  # "full" (mean val CE) | "last_batch" (CE of the last batch)
    config.selection.first_epoch = 1  # weights are selected from this (1-based) epoch on

    config.ckpt = ml_collections.ConfigDict()
    config.ckpt.enabled = True
    config.ckpt.every_epochs = 1
    config.ckpt.max_to_keep = 2
    config.ckpt.async_save = False
    config.ckpt.keep_best = True  # keep the selected weights in workdir/best/
    return config


PROTOCOLS = ("clean", "release")

#: The release's version of each paper model (names from :mod:`sadt_jax.models`).
RELEASE_MODELS = {
    "simple_cnn": "release_simple_cnn",
    "vgg16_bn": "release_vgg16_bn",
    "inception_resnet": "release_inception_resnet",
    "resnet56": "release_resnet",
}


def apply_release(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Switches ``config`` to the protocol of the authors' released code.

    ===============================  =========================  ================================
    field                            project default            release
    ===============================  =========================  ================================
    ``data.normalization``           ``"standardize"``          ``"scale"`` (x / 255)
    ``data.order``                   ``"permutation"``          ``"buffer"`` (1024, 3 shuffles)
    ``data.cutmix_partner``          ``"batch"``                ``"stream"``
    ``data.cutmix_box``              ``"reference"``            ``"release"`` (1x1 minimum)
    ``data.drop_remainder``          ``True``                   ``False`` (partial batch kept)
    ``data.release_split``           ``False``                  ``True`` (test = 3001-9999)
    ``optim.reset_every_epoch``      ``False``                  ``True`` (Adam + schedule)
    ``optim.adam_eps_placement``     ``"optax"``                ``"keras"``
    ``sadt.kl_clip``                 method preset (off)        ``1e-7``
    ``sadt.bn_stats`` (``sam`` only) ``"clean"``                ``"all"``
    ``selection.loss``               ``"full"``                 ``"last_batch"``
    ``selection.first_epoch``        ``1``                      ``4``
    ``model.name``                   e.g. ``simple_cnn``        ``RELEASE_MODELS[name]``
    ``model.dropout_rate``           family's choice            ``None`` (the release model's)
    ===============================  =========================  ================================

    Call it after the model name is set (the family configs do). ``sadt.kl_clip`` is set only
    when the config has that field.
    """
    config.data.normalization = "scale"
    config.data.order = "buffer"
    config.data.shuffle_buffer = 1024
    config.data.cutmix_partner = "stream"
    config.data.cutmix_box = "release"
    config.data.drop_remainder = False
    config.data.release_split = True
    config.optim.reset_every_epoch = True
    config.optim.adam_eps_placement = "keras"
    if "kl_clip" in config.sadt:
        config.sadt.kl_clip = 1e-7
    if config.method == "sam":
        config.sadt.bn_stats = "all"  # SAM keeps its perturbed pass's BatchNorm update
    config.selection.loss = "last_batch"
    config.selection.first_epoch = 4
    config.model.name = RELEASE_MODELS.get(config.model.name, config.model.name)
    config.model.dropout_rate = None  # the release models' own rates
    return config


def parse_arg(arg: str | None, default_method: str, variants: tuple[str, ...] = ()):
    """Splits ``<method>[,<variant>][,release]`` into ``(method, variant, protocol)``.

    Raises:
      ValueError: an unknown method, variant or protocol, listing the valid ones.
    """
    parts = [p for p in (arg or "").split(",") if p]
    method = parse_method(parts[0] if parts else None, default_method)
    protocol, variant = "clean", None
    for part in parts[1:]:
        if part in PROTOCOLS:
            protocol = part
        elif part in variants and variant is None:
            variant = part
        else:
            valid = ", ".join((*variants, *PROTOCOLS))
            raise ValueError(f"unknown config option {part!r} in {arg!r}; valid options: {valid}")
    return method, variant, protocol
