"""Fashion-MNIST (the embedded default), the paper's simple CNN, any method.

Data: the Debian package ``dataset-fashion-mnist`` (60k train, 10k test; the
first 3000 test images are the validation split). Budget: 3 epochs at batch 512,
so the default SADT run fits in about 10 minutes on 2 CPU cores; the experiment
suites override ``num_epochs``.

Run::

  python -m sadt_jax.main --config=configs/fashion_mnist.py:sadt_t1 --workdir=runs/fm_t1
  python -m sadt_jax.main --config=configs/fashion_mnist.py:base \
      --config.num_epochs=10 --workdir=runs/fm_base
"""

from configs.common import base_config, parse_method


def get_config(arg: str | None = None):
    """``arg`` is the method: base, gc, agc, sam, sadt_t1, sadt_t2, sadt_t3, ..."""
    config = base_config(parse_method(arg, "sadt_t1"))
    config.data.name = "fashion_mnist"
    config.model.name = "simple_cnn"
    config.model.dropout_rate = 0.3  # as in the authors' release (dense layers)
    config.num_epochs = 3
    config.batch_size = 512
    return config
