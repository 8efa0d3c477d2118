"""CIFAR-100: the same protocols and variants as ``cifar10.py``.

Run::

  python -m sadt_jax.main --config=configs/cifar100.py:sadt_t2,b512 \
      --config.model.name=resnet56 --workdir=runs/c100_r56_t2
"""

from configs import cifar10


def get_config(arg: str | None = None):
    """``arg`` is ``<method>[,<variant>][,release]`` as in ``configs/cifar10.py``."""
    return cifar10.get_config(arg, dataset="cifar100")
