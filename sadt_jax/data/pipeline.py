"""Host-side batching of in-memory arrays: deterministic, resumable and multi-host aware.

Training batches are index arrays drawn from a permutation that depends on ``(seed, epoch)``
only, so a run resumed from a checkpoint at step ``s`` sees exactly the batches it would have
seen, and the batches do not depend on the number of processes: every process computes the same
global batch and takes its own contiguous slice of it (process ``p`` of ``P`` takes rows
``[p * B / P, (p + 1) * B / P)`` of each global batch of size ``B``). Those slices, laid out in
process order, form the global batch, which is what
``jax.make_array_from_process_local_data`` expects for a batch sharded over the ``data`` axis of
a mesh whose devices are ordered by process.

Evaluation batches pad the last global batch with zeros and ``mask=False`` instead of dropping
it, so every example is evaluated exactly once and all processes run the same number of steps
with arrays of the same shape (no recompilation, no collective deadlock).

Training does not gather batches on the host: :func:`plan_blocks` stacks an epoch's index
plan into arrays that the loop uploads once per epoch, and the jitted step gathers each
batch from the training set held on the devices (see :mod:`sadt_jax.train.steps`).
:func:`train_batches` is the host-side equivalent, kept for tests and tools.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def _check_processes(global_batch_size: int, process_index: int, process_count: int) -> int:
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size={global_batch_size} must be positive")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must lie in [0, process_count={process_count})"
        )
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by the number of processes "
            f"({process_count}): choose a multiple of {process_count}"
        )
    return global_batch_size // process_count


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Number of full global batches in one epoch (the remainder is dropped).

    Args:
      num_examples: training set size.
      global_batch_size: batch size summed over all processes.

    Returns:
      ``num_examples // global_batch_size``.

    Raises:
      ValueError: the batch is larger than the dataset (an epoch would have no step).
    """
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size={global_batch_size} must be positive")
    steps = num_examples // global_batch_size
    if steps == 0:
        raise ValueError(
            f"global_batch_size={global_batch_size} exceeds the {num_examples} training examples: "
            "lower the batch size"
        )
    return steps


def train_batch_indices(
    num_examples: int,
    global_batch_size: int,
    *,
    seed: int,
    epoch: int,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """This process's example indices for every training step of one epoch.

    Args:
      num_examples: training set size.
      global_batch_size: batch size summed over all processes; divisible by ``process_count``.
      seed: non-negative data seed.
      epoch: non-negative epoch number; the permutation is a function of ``(seed, epoch)`` only.
      process_index: this process (``jax.process_index()``).
      process_count: number of processes (``jax.process_count()``).

    Returns:
      ``int64`` array ``(steps_per_epoch, global_batch_size // process_count)``; row ``s`` holds
      the indices of this process's share of step ``s``. The concatenation over processes, in
      process order, equals the single-process array.
    """
    local = _check_processes(global_batch_size, process_index, process_count)
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed={seed} and epoch={epoch} must be non-negative")
    steps = steps_per_epoch(num_examples, global_batch_size)
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    batches = perm[: steps * global_batch_size].reshape(steps, global_batch_size)
    return batches[:, process_index * local : (process_index + 1) * local].astype(np.int64)


def train_batches(
    images: np.ndarray,
    labels: np.ndarray,
    global_batch_size: int,
    *,
    seed: int,
    epoch: int,
    process_index: int = 0,
    process_count: int = 1,
    start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields this process's training batches of one epoch.

    Args:
      images: ``(N, ...)`` training images.
      labels: ``(N,)`` training labels.
      global_batch_size: batch size summed over all processes.
      seed: non-negative data seed.
      epoch: non-negative epoch number.
      process_index: this process.
      process_count: number of processes.
      start_step: first step within the epoch to yield (to resume mid-epoch).

    Yields:
      ``{'image': images[idx], 'label': labels[idx]}`` for each step's local indices ``idx``.
    """
    indices = train_batch_indices(
        images.shape[0],
        global_batch_size,
        seed=seed,
        epoch=epoch,
        process_index=process_index,
        process_count=process_count,
    )
    for idx in indices[start_step:]:
        yield {"image": images[idx], "label": labels[idx]}


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    """Number of (padded) global batches :func:`eval_batches` yields: ``ceil(N / B)``."""
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size={global_batch_size} must be positive")
    return -(-num_examples // global_batch_size)


def eval_batches(
    images: np.ndarray,
    labels: np.ndarray,
    global_batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields this process's share of every evaluation batch, padding instead of dropping.

    The examples, in order, are cut into ``ceil(N / global_batch_size)`` global batches; the
    last one is padded with zero images and labels whose ``mask`` is ``False``. Each process
    yields its contiguous slice of every global batch, so all processes yield the same number
    of batches of the same shape and, over all processes, every example appears exactly once
    with ``mask=True``.

    Args:
      images: ``(N, ...)`` images.
      labels: ``(N,)`` labels.
      global_batch_size: batch size summed over all processes; divisible by ``process_count``.
      process_index: this process (``jax.process_index()``).
      process_count: number of processes (``jax.process_count()``).

    Yields:
      ``{'image': (b, ...), 'label': (b,), 'mask': bool (b,)}`` with
      ``b = global_batch_size // process_count``.
    """
    local = _check_processes(global_batch_size, process_index, process_count)
    num_examples = images.shape[0]
    if labels.shape[0] != num_examples:
        raise ValueError(f"{num_examples} images but {labels.shape[0]} labels")
    for step in range(num_eval_batches(num_examples, global_batch_size)):
        start = step * global_batch_size + process_index * local
        stop = min(start + local, num_examples)
        valid = max(stop - start, 0)
        if valid == local:  # A full share: views, no copy.
            yield {
                "image": images[start:stop],
                "label": labels[start:stop],
                "mask": np.ones((local,), bool),
            }
            continue
        image = np.zeros((local, *images.shape[1:]), images.dtype)
        label = np.zeros((local, *labels.shape[1:]), labels.dtype)
        mask = np.zeros((local,), bool)
        if valid:
            image[:valid] = images[start:stop]
            label[:valid] = labels[start:stop]
            mask[:valid] = True
        yield {"image": image, "label": label, "mask": mask}


def plan_blocks(step_plans: list[dict[str, np.ndarray]]) -> list[tuple[int, dict[str, np.ndarray]]]:
    """An epoch's plan stacked into blocks of equal batch size, to upload at once.

    An epoch's plan is one dict of index arrays per step (``{"index": (b,), ...}``, see
    :func:`sadt_jax.data.release_order.epoch_batches`). It is stacked into rectangular
    ``(steps, b)`` arrays; a kept partial last batch has another size, so it starts a block of
    its own. The whole epoch is stacked even when a resumed run starts within it, so every
    epoch's blocks have the same shapes (one compilation of the step that reads them).

    Args:
      step_plans: the epoch's per-step index dicts, all with the same keys.

    Returns:
      ``[(first_step, block), ...]`` in step order: ``block[key]`` is ``int32``
      ``(num_steps, b)`` and holds steps ``first_step ...`` of ``step_plans``.
    """
    blocks: list[tuple[int, dict[str, np.ndarray]]] = []
    first = 0
    for s in range(1, len(step_plans) + 1):
        size = None if s == len(step_plans) else step_plans[s]["index"].shape[0]
        if size != step_plans[first]["index"].shape[0]:
            block = {
                k: np.stack([p[k] for p in step_plans[first:s]]).astype(np.int32)
                for k in step_plans[first]
            }
            blocks.append((first, block))
            first = s
    return blocks
