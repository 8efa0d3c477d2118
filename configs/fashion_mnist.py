"""Fashion-MNIST (the embedded default), the paper's simple CNN, any method.

Data: the Debian package ``dataset-fashion-mnist`` (60k train, 10k test; the
first 3000 test images are the validation split). Budget: 3 epochs at batch 512,
so the default SADT run fits in about 10 minutes on 2 CPU cores; the experiment
suites override ``num_epochs``.

``arg`` is ``<method>[,release]``; ``release`` switches to the protocol of the authors'
released code (``configs/common.py:apply_release``) with the release's simple CNN
(``release_simple_cnn``, its dropout 0.3) at 28x28x1.

Run::

  python -m sadt_jax.main --config=configs/fashion_mnist.py:sadt_t1 --workdir=runs/fm_t1
  python -m sadt_jax.main --config=configs/fashion_mnist.py:base \
      --config.num_epochs=10 --workdir=runs/fm_base
  python -m sadt_jax.main --config=configs/fashion_mnist.py:sadt_t1,release --workdir=runs/fm_t1_rel
"""

from configs.common import apply_release, base_config, parse_arg


def get_config(arg: str | None = None):
    """``arg`` is the method (base, gc, agc, sam, sadt_t1, sadt_t2, sadt_t3, ...)[,release]."""
    method, _, protocol = parse_arg(arg, "sadt_t1")
    config = base_config(method)
    config.data.name = "fashion_mnist"
    config.model.name = "simple_cnn"
    config.model.dropout_rate = 0.3  # as in the authors' release (dense layers)
    config.num_epochs = 3
    config.batch_size = 512
    return apply_release(config) if protocol == "release" else config
