"""CIFAR-10: the SADT paper's protocol, and the SAM paper's standard recipe.

``arg`` is ``<method>`` or ``<method>,<variant>``:

* variants of the paper's protocol (Adam 1e-4, decay 0.9 per 1000 steps, CutMix
  Beta(0.25, 0.25) only, validation = first 3000 test images, best-validation-loss
  checkpoint reported): ``b512`` (default, 200 epochs), ``b2048`` (370 epochs);
  model by ``--config.model.name`` (simple_cnn, vgg16_bn, inception_resnet, resnet56);
* ``sam_recipe``: ResNet-18 / WRN-28-10 comparison with the SAM paper: SGD momentum
  0.9, weight decay 5e-4, cosine schedule, crop+flip, batch 128, 200 epochs.

The data must be prepared by tensorflow-datasets (``tfds build cifar10`` on a
machine with network, then copy the data_dir; see the README).

Run::

  python -m sadt_jax.main --config=configs/cifar10.py:sadt_t1,b2048 \
      --config.model.name=vgg16_bn --workdir=runs/c10_vgg_t1
"""

from configs.common import base_config, parse_method

VARIANTS = ("b512", "b2048", "sam_recipe")
DATASET = "cifar10"


def apply_variant(config, variant: str):
    """Sets the batch/epochs/optimizer fields of a named variant."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    if variant == "b512":
        config.batch_size, config.num_epochs = 512, 200
    elif variant == "b2048":
        config.batch_size, config.num_epochs = 2048, 370
    else:
        config.batch_size, config.num_epochs = 128, 200
        config.model.name = "resnet18"
        config.data.augment = "crop_flip"
        config.data.num_validation = 0
        config.optim.optimizer = "sgd"
        config.optim.schedule = "cosine"
        config.optim.learning_rate = 0.1
        config.optim.weight_decay = 5e-4
        config.optim.momentum = 0.9
    return config


def get_config(arg: str | None = None, dataset: str = DATASET):
    method, _, variant = (arg or "sadt_t1").partition(",")
    config = base_config(parse_method(method, "sadt_t1"))
    config.data.name = dataset
    config.model.name = "simple_cnn"
    return apply_variant(config, variant or "b512")
