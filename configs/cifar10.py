"""CIFAR-10: the SADT paper's protocol, and the SAM paper's standard recipe.

``arg`` is ``<method>[,<variant>][,release]``:

* variants of the paper's protocol (Adam 1e-4, decay 0.9 per 1000 steps, CutMix
  Beta(0.25, 0.25) only, validation = first 3000 test images, best-validation-loss
  checkpoint reported): ``b512`` (default, 200 epochs), ``b2048`` (370 epochs);
  model by ``--config.model.name`` (simple_cnn, vgg16_bn, inception_resnet, resnet56);
* ``sam_recipe``: ResNet-18 / WRN-28-10 comparison with the SAM paper: SGD momentum
  0.9, weight decay 5e-4, cosine schedule, crop+flip, batch 128, 200 epochs;
* ``release``: the protocol of the authors' released code on top of the variant
  (``configs/common.py:apply_release``: /255 scaling, Adam and its schedule anew every
  epoch with Keras' epsilon, the 1024-buffer shuffle with CutMix partners from a second
  stream and the partial last batch kept, the 1x1 minimum CutMix box, KL on clipped
  probabilities, the release models, selection on the last validation batch's loss from
  epoch 4, test = test images 3001-9999). Without it: the project's protocol.

The data must be prepared by tensorflow-datasets (``tfds build cifar10`` on a
machine with network, then copy the data_dir; see the README).

Run::

  python -m sadt_jax.main --config=configs/cifar10.py:sadt_t1,b2048 \
      --config.model.name=vgg16_bn --workdir=runs/c10_vgg_t1
  python -m sadt_jax.main --config=configs/cifar10.py:sadt_t1,b2048,release \
      --config.model.name=release_vgg16_bn --workdir=runs/c10_rvgg_t1_release
"""

from configs.common import apply_release, base_config, parse_arg

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
    method, variant, protocol = parse_arg(arg, "sadt_t1", VARIANTS)
    config = base_config(method)
    config.data.name = dataset
    config.model.name = "simple_cnn"
    config = apply_variant(config, variant or "b512")
    return apply_release(config) if protocol == "release" else config
