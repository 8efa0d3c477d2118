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
* ``ckpt``: checkpointing.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from sadt_jax.algorithm.methods import METHODS

# SADTConfig fields exposed in config.sadt (None = the method's preset value).
SADT_FIELDS = {
    "objective": str,
    "teachers": str,
    "two_updates": bool,
    "rho": float,
    "normalize": bool,
    "adaptive": bool,
    "adaptive_eta": float,
    "noise_std": float,
    "noise_mode": str,
    "kl_direction": str,
    "t2_std": float,
    "t2_multiplicative_path": str,
    "t2_additive_path": str,
    "temperature": float,
    "kd_weight": float,
    "ema_decay": float,
    "ema_weight": float,
    "m_sharpness": int,
    "bn_stats": str,
    "label_smoothing": float,
}


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
    config.data.augment = "cutmix"  # "cutmix" | "crop_flip" | "crop_flip_cutmix" | "none"
    config.data.cutmix_alpha = 0.25

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
    config.optim.agc_clip = 0.01

    config.sadt = ml_collections.ConfigDict({k: placeholder(t) for k, t in SADT_FIELDS.items()})

    config.ckpt = ml_collections.ConfigDict()
    config.ckpt.enabled = True
    config.ckpt.every_epochs = 1
    config.ckpt.max_to_keep = 2
    config.ckpt.async_save = False
    return config
