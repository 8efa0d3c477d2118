"""Convolution + bias + ReLU + 2x2 max-pooling as one layer, computed batch chunk by chunk.

In the release simple CNN the first two blocks are ``pool(relu(conv(x) + b))``. Computed
layer by layer, the convolution's output (26x26x64 per image for the first block, 88 MB at
batch 512) is written to memory, read by the ReLU and the pool, and its gradient map is
written and read again in the backward pass: on XLA:CPU that memory traffic, not the
GEMMs, was the largest remaining cost (results/conv_cpu.md). :func:`conv_relu_pool` runs
the whole block on a few images at a time (``lax.map`` over batch chunks), so the
pre-activation map only ever exists for one chunk, in cache. What it keeps for the
backward pass is the input (which exists anyway) and one ``int8`` per pooled output: the
position of the window's first maximum, or 4 where that maximum is not positive (ReLU
cuts the derivative).

The derivative is a ``jax.custom_jvp`` whose tangent is another chunked loop, linear in
the tangents: ``z_dot = conv(x_dot, W) + conv(x, W_dot) + b_dot`` per chunk, then the
element the forward pass picked. JAX transposes it, in reverse mode, into one loop that
per chunk scatters the output gradient to the picked positions (in cache) and runs the
kernel-gradient and input-gradient GEMMs on it, so the full-size gradient map never
materialises either. Forward mode, forward-over-reverse Hessian-vector products and
``vmap`` work as for any JAX function.

With a 'VALID' pool the convolution skips the last row / column of an odd-sized map,
which the pool drops (10x10 instead of 11x11 outputs in the second block).

A training-mode BatchNorm right before a block (``bn1`` before the second block of the
release simple CNN) can be folded into the block's convolution: :class:`BatchNormAffine`
returns the BatchNorm's per-channel ``x * mul + shift`` instead of applying it, and
:class:`ConvReluPool` convolves ``x`` with the kernel scaled by ``mul`` and a bias that
absorbs ``shift`` (:func:`fold_affine`), so the normalised map is neither written nor
differentiated through; JAX differentiates the statistics as usual.

Values equal ``pool(relu(conv(x, W) + b))`` computed layer by layer with the same
convolution (the ReLU commutes with the maximum); gradients route to the first maximum
of each window in row-major order, as XLA's ``select_and_scatter`` (and
``_layers.max_pool_2x2``) do, and are zero where the maximum is not positive, as the
ReLU's. Sums over the batch (the kernel and bias gradients) are accumulated chunk by
chunk, so they differ from the layer-by-layer result by float round-off.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from sadt_jax.models import _layers

#: Target size in bytes of one chunk's pre-activation map plus its im2col patches (float32
#: sizes; images per chunk: a divisor of the batch where possible). At batch 512 this gives
#: 8 images per chunk to both blocks of the release simple CNN; 1 and 4 MiB, and 4 images
#: for the second block, measured no faster in the training step (results/conv_cpu.md).
FUSED_CHUNK_BYTES = 2 * 2**20

#: Row-major positions in a 2x2 window, shaped to compare with the ``_pool_windows`` view
#: (NumPy: a jnp array here would start JAX's backend at import).
_WINDOW = np.array([[0, 1], [2, 3]], np.int8).reshape(1, 1, 2, 1, 2, 1)


class _Config(NamedTuple):
    """Static settings of one fused block (hashable: ``custom_jvp``'s nondiff argument)."""

    pads: tuple[tuple[int, int], ...]
    pool_padding: str
    precision: Any
    gemm_forward: bool
    chunk: int


def _map_chunks(fn, arrays, size):
    """``fn`` on batch chunks of ``size`` images of every array; outputs concatenated."""
    batch = arrays[0].shape[0]
    n_full, rest = divmod(batch, size)
    parts = []
    if n_full == 1:
        parts.append(fn(*(a[:size] for a in arrays)))
    elif n_full > 1:
        stacked = [a[: n_full * size].reshape((n_full, size) + a.shape[1:]) for a in arrays]
        out = lax.map(lambda chunk: fn(*chunk), stacked)
        parts.append(jax.tree.map(lambda y: y.reshape((n_full * size,) + y.shape[2:]), out))
    if rest:
        parts.append(fn(*(a[n_full * size :] for a in arrays)))
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *ys: jnp.concatenate(ys, axis=0), *parts)


def _conv(x, kernel, cfg, acc, *, gemm, kernel_grad_layout=False):
    """One chunk's stride-1 convolution, accumulated in ``acc``: im2col GEMM or XLA's."""
    kh, kw, cin, cout = kernel.shape
    ho, wo, _ = _conv_out_shape(x, kernel, cfg)
    if not gemm:
        return lax.conv_general_dilated(
            x,
            kernel,
            (1, 1),
            cfg.pads,
            dimension_numbers=_layers._NHWC_SPEC,
            precision=cfg.precision,
            preferred_element_type=acc,
        )
    km = kernel.reshape(kh * kw * cin, cout)
    if kernel_grad_layout:  # transposes to patches^T @ dz, the faster kernel-gradient layout
        p = _layers._patches_t(x, (kh, kw), (1, 1), cfg.pads, (ho, wo)).T
    else:
        p = _layers._patches(x, (kh, kw), (1, 1), cfg.pads, (ho, wo))
    y = jnp.matmul(p, km, precision=cfg.precision, preferred_element_type=acc)
    return y.reshape(x.shape[0], ho, wo, cout)


def _pick(z, index, pool_padding):
    """The window element ``index`` (0-3, row-major) picked for every output; 0 for 4."""
    windows = _layers._pool_windows(z, 0, pool_padding)
    return jnp.sum(jnp.where(index[:, :, None, :, None, :] == _WINDOW, windows, 0), axis=(2, 4))


def _pool_relu(z, dtype, cfg):
    """``(pool(relu(z)), picked index)``: the index of each window's first maximum, or 4."""
    w = _layers._pool_windows(z, -jnp.inf, cfg.pool_padding)
    e00, e01, e10, e11 = w[:, :, 0, :, 0], w[:, :, 0, :, 1], w[:, :, 1, :, 0], w[:, :, 1, :, 1]
    # First maximum in row-major window order (as _layers.max_pool_2x2); 4 (nothing) where
    # the maximum is not positive, since the ReLU's derivative is zero there.
    top, bottom = jnp.maximum(e00, e01), jnp.maximum(e10, e11)
    first = jnp.where(bottom > top, jnp.where(e11 > e10, 3, 2), jnp.where(e01 > e00, 1, 0))
    index = jnp.where(jnp.maximum(top, bottom) > 0, first, 4)
    # The value is picked (elementwise, so XLA fuses it with the comparisons), not taken
    # as a maximum, so that differentiating this function (forward-over-reverse) routes
    # derivatives as the tangent does, ties included.
    y = jnp.where(index == 0, e00, jnp.where(index == 1, e01, jnp.where(index == 2, e10, e11)))
    return jnp.where(index == 4, 0, y).astype(dtype), index.astype(jnp.int8)


def _forward(x, kernel, bias, cfg):
    """``(pool(relu(conv(x) + b)), picked index)``, chunk by chunk.

    Chunked also where the convolution is XLA's: one whole-batch convolution followed by
    the pool measured 1.1x slower in the training step.
    """
    acc = jnp.promote_types(x.dtype, jnp.float32)

    def run(xc):
        z = _conv(xc, kernel, cfg, acc, gemm=cfg.gemm_forward) + bias.astype(acc)
        return _pool_relu(z, x.dtype, cfg)

    return _map_chunks(run, [x], cfg.chunk)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _conv_relu_pool(x, kernel, bias, cfg):
    return _forward(x, kernel, bias, cfg)[0]


@functools.partial(_conv_relu_pool.defjvp, symbolic_zeros=True)
def _conv_relu_pool_jvp(cfg, primals, tangents):
    x, kernel, bias = primals
    x_dot, kernel_dot, bias_dot = (None if isinstance(t, SymbolicZero) else t for t in tangents)
    y, index = _forward(x, kernel, bias, cfg)
    if x_dot is None and kernel_dot is None and bias_dot is None:
        return y, jnp.zeros_like(y)
    acc = jnp.promote_types(x.dtype, jnp.float32)

    # Checkpointed so that reverse mode keeps only (x, index) per chunk and rebuilds the
    # patches and the picked mask in its loop, instead of storing them for the batch.
    @jax.checkpoint
    def chunk(xc, index_c, x_dot_c):
        z_dot = 0
        if x_dot_c is not None:  # transposes to dz @ W^T and col2im
            z_dot = z_dot + _conv(x_dot_c, kernel, cfg, acc, gemm=True)
        if kernel_dot is not None:  # transposes to patches^T @ dz
            z_dot = z_dot + _conv(xc, kernel_dot, cfg, acc, gemm=True, kernel_grad_layout=True)
        if bias_dot is not None:
            z_dot = z_dot + bias_dot.astype(acc)
        z_dot = jnp.broadcast_to(z_dot, index_c.shape[:1] + _conv_out_shape(x, kernel, cfg))
        return _pick(z_dot, index_c, cfg.pool_padding).astype(x.dtype)

    if x_dot is None:
        y_dot = _map_chunks(lambda xc, ic: chunk(xc, ic, None), [x, index], cfg.chunk)
    else:
        y_dot = _map_chunks(chunk, [x, index, x_dot], cfg.chunk)
    return y, y_dot


def _conv_out_shape(x, kernel, cfg):
    """``(height, width, channels)`` of the stride-1 convolution of ``x`` under ``cfg.pads``."""
    kh, kw, _, cout = kernel.shape
    return (x.shape[1] + sum(cfg.pads[0]) - kh + 1, x.shape[2] + sum(cfg.pads[1]) - kw + 1, cout)


def conv_relu_pool(
    x: jnp.ndarray,
    kernel: jnp.ndarray,
    bias: jnp.ndarray,
    padding: Any = "VALID",
    pool_padding: str = "VALID",
    precision: Any = None,
    *,
    forward: str = "auto",
    chunk_bytes: int | None = None,
) -> jnp.ndarray:
    """``max_pool_2x2(relu(conv(x, kernel) + bias))``, fused and computed per batch chunk.

    Args:
      x: ``(batch, height, width, in_features)``.
      kernel: ``(kh, kw, in_features, out_features)``, same dtype as ``x``.
      bias: ``(out_features,)``.
      padding: the stride-1 convolution's ``'SAME'``, ``'VALID'`` or explicit pairs.
      pool_padding: the 2x2 stride-2 pool's ``'SAME'`` or ``'VALID'``.
      precision: ``lax.Precision`` of the convolutions / GEMMs.
      forward: how each chunk's convolution value is computed: ``'xla'`` (XLA's
        convolution on the chunk), ``'gemm'`` (im2col GEMM) or ``'auto'`` (``'gemm'``
        where the GEMM's depth ``kh*kw*in_features`` is at least
        ``_layers.GEMM_MIN_DEPTH``, else ``'xla'``: XLA:CPU runs its convolution of a
        chunk on one thread (YNNPACK), the GEMM on both cores of the 2-core machine, so
        the second block of the release simple CNN (depth 576) got 1.03x faster training
        steps in wall time, for 1.09x more CPU time, while the first (depth 9) lost;
        results/conv_cpu.md). The gradients are GEMMs either way.
      chunk_bytes: target size of one chunk's pre-activation map and patches (default
        :data:`FUSED_CHUNK_BYTES`).

    Returns:
      ``(batch, out_height / 2, out_width / 2, out_features)`` in ``x.dtype``.

    Raises:
      ValueError: for shapes or settings it does not support.
    """
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(
            f"conv_relu_pool needs NHWC x and an HWIO kernel with matching channels, got "
            f"{x.shape} and {kernel.shape}"
        )
    if bias.shape != kernel.shape[-1:] or not (x.dtype == kernel.dtype == bias.dtype):
        raise ValueError(
            f"conv_relu_pool needs a bias of shape {kernel.shape[-1:]} and one dtype, got "
            f"{bias.shape} and {x.dtype}, {kernel.dtype}, {bias.dtype}"
        )
    if pool_padding not in ("SAME", "VALID") or forward not in ("auto", "gemm", "xla"):
        raise ValueError(
            f"pool_padding must be 'SAME' or 'VALID' and forward 'auto', 'gemm' or 'xla', got "
            f"{pool_padding!r}, {forward!r}"
        )
    pads = _layers._conv_pads(x.shape[1:3], kernel.shape[:2], (1, 1), padding)
    depth = kernel.shape[0] * kernel.shape[1] * kernel.shape[2]
    precision = tuple(precision) if isinstance(precision, list) else precision
    if forward == "auto":
        forward = "gemm" if depth >= _layers.GEMM_MIN_DEPTH else "xla"
    cfg = _Config(pads, pool_padding, precision, forward == "gemm", 1)
    ho, wo, cout = _conv_out_shape(x, kernel, cfg)
    if ho < 2 or wo < 2:
        raise ValueError(
            f"conv_relu_pool needs a convolution output of at least 2x2, not {ho}x{wo}"
        )
    if pool_padding == "VALID" and (ho % 2 or wo % 2):
        x, cfg = _drop_unpooled(x, cfg, ho % 2, wo % 2)
        ho, wo = ho - ho % 2, wo - wo % 2
    target = FUSED_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    chunk = _layers._chunk_size(x.shape[0], ho * wo * (cout + depth) * 4, target)
    return _conv_relu_pool(x, kernel, bias, cfg._replace(chunk=chunk))


def _drop_unpooled(x, cfg, drop_h, drop_w):
    """Input and pads whose convolution lacks the last row / column a 'VALID' pool drops.

    Those outputs are never used, so they are not computed (conv2 of the release simple
    CNN: 10x10 instead of 11x11 outputs, 17% fewer FLOPs). One high pad less where there
    is one, else one input row / column less (its gradient is zero either way).
    """
    pads = list(cfg.pads)
    for axis, drop in ((0, drop_h), (1, drop_w)):
        if not drop:
            continue
        lo, hi = pads[axis]
        if hi > 0:
            pads[axis] = (lo, hi - 1)
        else:
            x = lax.slice_in_dim(x, 0, x.shape[1 + axis] - 1, axis=1 + axis)
    return x, cfg._replace(pads=tuple(pads))


class ConvReluPool(nn.Module):
    """``max_pool_2x2(relu(conv))`` as one fused layer (:func:`conv_relu_pool`).

    Its parameters are those of ``_layers.conv(..., use_bias=True)`` (``kernel``, He
    normal; ``bias``, zeros; float32), created in the same order, so a model that swaps
    this layer in for the three separate layers keeps its parameter tree and, given
    the same RNG, its initial values.

    Attributes:
      features: output channels.
      kernel_size: an int or a (height, width) pair.
      padding: the convolution's ``'SAME'`` or ``'VALID'``.
      pool_padding: the pool's ``'SAME'`` or ``'VALID'``.
      dtype: computation dtype.
      kernel_init: kernel initialiser.
    """

    features: int
    kernel_size: int | tuple[int, int] = 3
    padding: str = "SAME"
    pool_padding: str = "SAME"
    dtype: Any = jnp.float32
    kernel_init: nn.initializers.Initializer = _layers.conv_init

    @nn.compact
    def __call__(self, x: jnp.ndarray, affine: tuple | None = None) -> jnp.ndarray:
        """The block on ``x``, or with ``affine = (mul, shift)`` on ``x * mul + shift``.

        ``affine`` is a per-input-channel affine map (a BatchNorm's, from
        :class:`BatchNormAffine`) folded into the convolution (:func:`fold_affine`), so the
        mapped input is never materialised; it needs ``padding='VALID'``.
        """
        kh, kw = (self.kernel_size,) * 2 if isinstance(self.kernel_size, int) else self.kernel_size
        shape = (kh, kw, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        if affine is not None:
            if self.padding != "VALID":
                raise ValueError(
                    f"ConvReluPool can fold an affine input map only into a 'VALID' "
                    f"convolution (padded zeros are not mapped), got padding={self.padding!r}"
                )
            kernel, bias = fold_affine(kernel, bias, *affine)
        x, kernel, bias = (jnp.asarray(a, self.dtype) for a in (x, kernel, bias))
        return conv_relu_pool(x, kernel, bias, self.padding, self.pool_padding)


def fold_affine(kernel, bias, mul, shift):
    """Kernel and bias of ``conv(x * mul + shift)`` as a convolution of ``x`` itself.

    For a convolution without padding, ``conv(x * mul + shift, W) + b = conv(x, W') + b'``
    with ``W'[..., c, :] = W[..., c, :] * mul[c]`` and ``b' = b + sum_{h, w, c} W[h, w, c, :]
    * shift[c]`` (every output sees a full window of shifted inputs).

    Args:
      kernel: ``(kh, kw, in_features, out_features)``.
      bias: ``(out_features,)``.
      mul: ``(in_features,)`` per-input-channel scale.
      shift: ``(in_features,)`` per-input-channel offset.

    Returns:
      ``(W', b')``.
    """
    folded_bias = bias + jnp.einsum("hwio,i->o", kernel, shift, precision=lax.Precision.HIGHEST)
    return kernel * mul[:, None], folded_bias


def _batch_moments(x: jnp.ndarray, axis_name: str | None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-channel mean and variance over all but the last axis, as ``nn.BatchNorm`` computes them.

    flax's defaults (``use_fast_variance=True``, ``force_float32_reductions=True``): float32
    ``E[x]`` and ``E[x^2]``, averaged together across ``axis_name`` in one ``pmean``, and
    ``var = max(0, E[x^2] - E[x]^2)``. Written out here rather than imported from flax's
    private ``_compute_stats``, so that a flax upgrade cannot break importing the models;
    ``tests/test_fused_block.py`` checks it against ``nn.BatchNorm`` (statistics and
    running averages).
    """
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    moments = jnp.stack([x.mean(axes), jnp.square(x).mean(axes)])
    if axis_name is not None:
        moments = lax.pmean(moments, axis_name)
    mean, mean_sq = moments[0], moments[1]
    return mean, jnp.maximum(0.0, mean_sq - jnp.square(mean))


class BatchNormAffine(nn.BatchNorm):
    """Training-mode BatchNorm returned as the affine map it applies, not applied.

    An ``nn.BatchNorm`` (the defaults of ``_layers.batch_norm``: momentum 0.99, epsilon
    1e-3, float32 parameters) with the same variables, statistics and running-average
    updates in training mode (``params`` ``scale`` and ``bias``, ``batch_stats`` ``mean``
    and ``var``; statistics as ``nn.BatchNorm`` computes them, :func:`_batch_moments`), but
    it returns ``(mul, shift)`` with ``BatchNorm(x) = x * mul + shift`` per channel (``mul = scale /
    sqrt(var + epsilon)``, ``shift = bias - mean * mul``), so that the next layer can fold
    it into its weights (:meth:`ConvReluPool.__call__`) and the normalised map is never
    stored. Training mode and the last axis as features only: in evaluation the model
    applies ``nn.BatchNorm`` with the running averages, unchanged.
    """

    use_running_average: bool = False
    momentum: float = _layers.BN_MOMENTUM
    epsilon: float = _layers.BN_EPSILON
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:  # type: ignore[override]
        settings = (self.use_running_average, self.axis, self.use_bias, self.use_scale)
        stats = (self.use_fast_variance, self.force_float32_reductions, self.axis_index_groups)
        if settings != (False, -1, True, True) or stats != (True, True, None):
            raise ValueError(
                "BatchNormAffine supports training mode (use_running_average=False) with "
                "axis=-1, a bias and a scale, and flax's default statistics (fast variance, "
                "float32 reductions, no axis_index_groups) only"
            )
        features = (x.shape[-1],)
        stat_dtype = jnp.float32
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stat_dtype), features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, stat_dtype), features)
        initializing = self.is_initializing()
        mean, var = _batch_moments(x, None if initializing else self.axis_name)
        if not initializing:
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        mul = lax.rsqrt(var + self.epsilon) * scale
        return mul, bias - mean * mul
