"""Training order of one epoch: a full permutation, or the release's local buffer shuffle.

Two orders, both pure functions of ``(seed, epoch)`` so a resumed run sees the same batches:

* ``"permutation"`` (the project's default): one uniform permutation of the training set per
  epoch, exactly :func:`sadt_jax.data.pipeline.train_batch_indices`'s.
* ``"buffer"`` (the authors' release): what ``tf.data`` does with
  ``zip(a.shuffle(1024), b.shuffle(1024)).shuffle(1024).batch(B)``: two copies of the ordered
  training set are each shuffled with a 1024-example buffer (:func:`buffer_shuffle`), zipped
  pairwise, and the pairs are shuffled again with a 1024 buffer. Element ``i`` of the first
  stream is the training example, element ``i`` of the second its CutMix partner. The shuffle
  is local: output ``t`` is always one of the first ``t + buffer_size`` inputs, so a batch
  draws mostly from a window of nearby original indices.

Partners: with ``partner=True`` every example gets a partner from a second, independently
shuffled stream (the release's CutMix pairing); with the ``"permutation"`` order that stream is
a second permutation. Without it, CutMix pairs examples within the batch
(:func:`sadt_jax.data.augment.cutmix`).

Batching: ``drop_remainder=True`` drops the partial last batch (the project's default);
``False`` keeps it, as the release does (98 steps of 512 on CIFAR's 50,000, the last of 336).
The kept partial batch is a second shape for ``jax.jit`` (one more compilation) and is sharded
over the devices like any batch, so its size must be divisible by the number of processes and
devices: :func:`check_partial_batch` says so before any compute. Nothing is padded: padding
would change the batch statistics of BatchNorm and the batch means of the losses.
"""

from __future__ import annotations

import numpy as np

from sadt_jax.data import pipeline

__all__ = [
    "ORDERS",
    "buffer_shuffle",
    "check_partial_batch",
    "epoch_batches",
    "epoch_order",
    "num_batches",
]

ORDERS = ("permutation", "buffer")


def buffer_shuffle(order: np.ndarray, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """``tf.data.Dataset.shuffle(buffer_size)`` of a sequence, emulated in NumPy.

    The same ring buffer as TensorFlow's ``ShuffleDatasetOp``: the buffer is filled with the
    next inputs until it holds ``buffer_size`` elements (or the input is exhausted); each output
    is the element at a uniformly drawn position among the ``n`` it holds, which is then swapped
    with the ring's front and the front advanced. Output ``t`` is therefore a uniform draw from
    the ``min(buffer_size, N - t)`` elements held at that moment, all of them among the first
    ``t + buffer_size`` inputs. ``buffer_size=1`` is the identity; ``buffer_size >= N`` a
    uniform permutation.

    Args:
      order: ``(N,)`` input sequence.
      buffer_size: shuffle buffer size, ``>= 1``.
      rng: NumPy generator; the output is a function of its state.

    Returns:
      The shuffled ``(N,)`` sequence (a permutation of ``order``).
    """
    if buffer_size < 1:
        raise ValueError(f"buffer_size={buffer_size} must be >= 1")
    order = np.asarray(order)
    n = order.shape[0]
    held = np.minimum(buffer_size, n - np.arange(n))  # elements in the buffer at output t
    draws = rng.integers(0, held) if n else np.zeros(0, np.int64)
    ring = np.empty(min(buffer_size, n), order.dtype)
    out = np.empty_like(order)
    size = ring.shape[0]
    start = end = 0
    next_in = 0
    for t in range(n):
        while next_in < n and end - start < buffer_size:
            ring[end % size] = order[next_in]
            end += 1
            next_in += 1
        i = (start + int(draws[t])) % size
        front = start % size
        out[t] = ring[i]
        ring[i] = ring[front]
        start += 1
    return out


def epoch_order(
    num_examples: int,
    *,
    seed: int,
    epoch: int,
    order: str = "permutation",
    buffer_size: int = 1024,
    partner: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The examples (and their CutMix partners) of one epoch, in training order.

    Args:
      num_examples: training set size ``N``.
      seed: non-negative data seed.
      epoch: non-negative epoch number.
      order: ``"permutation"`` or ``"buffer"`` (see the module docstring).
      buffer_size: the ``"buffer"`` order's shuffle buffer (1024 in the release).
      partner: also return a partner stream.

    Returns:
      ``(examples, partners)``: ``int64`` arrays ``(N,)``; ``partners`` is ``None`` without
      ``partner``. ``order="permutation"`` without partners is the permutation of
      :func:`sadt_jax.data.pipeline.train_batch_indices`.
    """
    if order not in ORDERS:
        raise ValueError(f"order={order!r} is not valid; choose one of: {', '.join(ORDERS)}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed={seed} and epoch={epoch} must be non-negative")
    if order == "permutation":
        examples = np.random.default_rng([seed, epoch]).permutation(num_examples)
        partners = None
        if partner:
            partners = np.random.default_rng([seed, epoch, 1]).permutation(num_examples)
        return examples.astype(np.int64), None if partners is None else partners.astype(np.int64)
    ordered = np.arange(num_examples, dtype=np.int64)
    streams = [np.random.default_rng([seed, epoch, 2, k]) for k in range(3)]
    first = buffer_shuffle(ordered, buffer_size, streams[0])
    second = buffer_shuffle(ordered, buffer_size, streams[1])
    pairs = buffer_shuffle(ordered, buffer_size, streams[2])  # positions of the zipped pairs
    return first[pairs], (second[pairs] if partner else None)


def num_batches(num_examples: int, global_batch_size: int, *, drop_remainder: bool = True) -> int:
    """Training steps per epoch: ``N // B`` dropping the partial batch, ``ceil(N / B)`` keeping it.

    Raises:
      ValueError: the batch size is not positive, or (dropping) larger than the dataset.
    """
    if drop_remainder:
        return pipeline.steps_per_epoch(num_examples, global_batch_size)
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size={global_batch_size} must be positive")
    return -(-num_examples // global_batch_size)


def check_partial_batch(
    num_examples: int, global_batch_size: int, num_shards: int, *, drop_remainder: bool
) -> None:
    """Checks that a kept partial last batch can be split over ``num_shards`` devices/processes.

    Raises:
      ValueError: saying which sizes would work.
    """
    remainder = 0 if drop_remainder else num_examples % global_batch_size
    if remainder % num_shards:
        raise ValueError(
            f"the partial last batch of {remainder} examples ({num_examples} training examples "
            f"mod batch_size={global_batch_size}) cannot be split over {num_shards} devices: "
            f"set data.drop_remainder=True, or pick batch_size / data.max_train_examples so that "
            f"the remainder is a multiple of {num_shards}"
        )


def epoch_batches(
    num_examples: int,
    global_batch_size: int,
    *,
    seed: int,
    epoch: int,
    order: str = "permutation",
    buffer_size: int = 1024,
    partner: bool = False,
    drop_remainder: bool = True,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """This process's share of every training batch of one epoch, as example indices.

    Every process computes the same global order and takes its contiguous slice of each global
    batch (as :func:`sadt_jax.data.pipeline.train_batch_indices` does), the partial last batch
    included when it is kept.

    Args:
      num_examples: training set size.
      global_batch_size: batch size summed over all processes.
      seed: non-negative data seed.
      epoch: non-negative epoch number.
      order: ``"permutation"`` or ``"buffer"``.
      buffer_size: shuffle buffer of the ``"buffer"`` order.
      partner: add each example's CutMix partner (``"partner"`` key).
      drop_remainder: drop (``True``) or keep the partial last batch.
      process_index: this process.
      process_count: number of processes.

    Returns:
      One dict per step: ``{"index": (b,), "partner": (b,)}`` (``int64``; ``"partner"`` only
      with ``partner``), ``b`` the global batch size (or the partial batch's) over
      ``process_count``.
    """
    pipeline._check_processes(global_batch_size, process_index, process_count)
    check_partial_batch(
        num_examples, global_batch_size, process_count, drop_remainder=drop_remainder
    )
    steps = num_batches(num_examples, global_batch_size, drop_remainder=drop_remainder)
    examples, partners = epoch_order(
        num_examples, seed=seed, epoch=epoch, order=order, buffer_size=buffer_size, partner=partner
    )
    out = []
    for s in range(steps):
        lo = s * global_batch_size
        hi = min(lo + global_batch_size, num_examples)
        local = (hi - lo) // process_count
        window = slice(lo + process_index * local, lo + (process_index + 1) * local)
        batch = {"index": examples[window]}
        if partners is not None:
            batch["partner"] = partners[window]
        out.append(batch)
    return out
