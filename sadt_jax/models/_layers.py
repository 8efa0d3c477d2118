"""Building blocks shared by the model zoo.

Every model in :mod:`sadt_jax.models` builds its layers through these helpers so
that initialisers, dtypes and BatchNorm settings are the same everywhere:

* convolution kernels use He-normal initialisation by default (truncated normal,
  fan-in, scale 2: Keras' ``he_normal``, as in three of the release's four models;
  its ResNet keeps Keras' Glorot-uniform default), dense kernels use Glorot-uniform
  (Keras' ``Dense`` default), biases start at zero; ``kernel_init`` overrides;
* parameters are always stored in float32 (``param_dtype``); ``dtype`` only sets
  the computation dtype (e.g. ``jnp.bfloat16``);
* BatchNorm uses Keras' defaults as in the release (``momentum=0.99``,
  ``epsilon=1e-3``), batch statistics in training mode and the running averages
  (collection ``batch_stats``) otherwise;
* convolutions take ``impl`` (the models' ``conv_impl``) and 2x2 max-pooling takes
  ``impl`` (``pool_impl``): ``'auto'`` (default) picks implementations that are fast on
  XLA:CPU (:class:`GemmConv`: forward, input and kernel gradient as chunked im2col
  GEMMs; a reshape-based pool) when ``jax.default_backend() == 'cpu'`` and XLA's own
  elsewhere; ``'matmul'`` (:class:`MatmulConv`) replaces only the conv kernel gradient;
  ``'xla'`` forces ``nn.Conv`` / ``nn.max_pool``. Values and gradients agree with XLA's
  to float round-off (sums in a different order) or exactly (pooling).
  See ``results/conv_cpu.md``;
* the release simple CNN's ``pool(relu(conv))`` blocks can run as one layer computed per
  batch chunk (``sadt_jax.models._fused``, ``SimpleCNN.block_impl``; the CPU default).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

Dtype = Any

#: Keras ``he_normal``: truncated normal, variance 2 / fan_in.
conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
#: Keras ``glorot_uniform`` (the ``Dense`` default).
dense_init = nn.initializers.glorot_uniform()

#: BatchNorm momentum and epsilon: Keras' defaults, as in the authors' release.
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3


# --- CPU-friendly convolution and max-pooling ---------------------------------------------
#
# On XLA:CPU (jaxlib 0.10.2) the forward convolution and its input gradient run at
# GEMM speed, but the kernel gradient is lowered as a convolution whose "kernel" is the
# whole output-gradient feature map, several times slower; the gradient of
# ``reduce_window`` max (``select_and_scatter``) is slow as well. ``conv_impl='matmul'``
# and ``pool_impl='reshape'`` replace only those backward computations; forward values
# are computed by the same XLA operations as ``nn.Conv`` / ``nn.max_pool``.
# ``conv_impl='gemm'`` computes the forward value and the input gradient by chunked
# im2col GEMMs too (XLA:CPU's convolutions on these small-channel shapes ran at half the
# GEMM's speed).

#: ``impl`` values accepted by :func:`conv` (``'auto'``: ``'gemm'`` on CPU, else ``'xla'``).
CONV_IMPLS = ("auto", "xla", "matmul", "gemm")
#: What ``'auto'`` means on the CPU backend (results/conv_cpu.md).
CPU_CONV_IMPL = "gemm"
#: ``impl`` values accepted by :func:`max_pool_2x2` (``'auto'``: ``'reshape'`` on CPU).
POOL_IMPLS = ("auto", "xla", "reshape")
#: What ``pool_impl="auto"`` means on CPU.
CPU_POOL_IMPL = "reshape"

#: Target size in bytes of one batch chunk of im2col patches in the matmul kernel
#: gradient: small enough to stay in cache. Chunks of 0.1-2 MiB were fastest for every
#: layer measured (results/conv_cpu.md); whole-batch patches are up to 2x slower.
CONV_CHUNK_BYTES = 2**20
#: The same for the forward value and the input gradient (``conv_impl='gemm'``), whose
#: patches are laid out ``(pixels, kh*kw*C)``: 4 MiB chunks were fastest (results/conv_cpu.md).
GEMM_CHUNK_BYTES = 4 * 2**20
#: ``forward='auto'`` computes the value by GEMMs only when the GEMM's depth
#: ``kh*kw*in_features`` is at least this: XLA's forward convolution was 1.1-1.9x faster for
#: the 3x3 1->64 first layer (depth 9), the GEMMs up to 1.9x faster at depth 576.
GEMM_MIN_DEPTH = 64

_NHWC_SPEC = ("NHWC", "HWIO", "NHWC")


def resolve_impl(impl: str, fast: str, valid: tuple[str, ...]) -> str:
    """Maps ``'auto'`` to ``fast`` on the CPU backend and to ``'xla'`` elsewhere."""
    if impl not in valid:
        raise ValueError(f"impl must be one of {valid}, got {impl!r}")
    if impl == "auto":
        return fast if jax.default_backend() == "cpu" else "xla"
    return impl


def _conv_pads(
    spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], padding: Any
) -> tuple[tuple[int, int], ...]:
    """Explicit non-negative (low, high) pads, or ValueError if unsupported."""
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID"):
            raise ValueError(f"matmul conv supports 'SAME'/'VALID' padding, got {padding!r}")
        pads = lax.padtype_to_pads(spatial, kernel, strides, padding)
    else:
        pads = [tuple(int(v) for v in p) for p in padding]
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if len(pads) != len(spatial) or any(lo < 0 or hi < 0 for lo, hi in pads):
        raise ValueError(f"matmul conv needs non-negative padding per spatial dim, got {padding}")
    return pads


def _patches_t(x, kernel_hw, strides, pads, out_hw):
    """im2col, transposed: ``(kh*kw*C, b*Ho*Wo)``, rows ordered (i, j, c) like HWIO."""
    b, _, _, c = x.shape
    (kh, kw), (sh, sw), (ho, wo) = kernel_hw, strides, out_hw
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    cols = []
    for i in range(kh):
        for j in range(kw):
            window = lax.slice(
                xp,
                (0, i, j, 0),
                (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                (1, sh, sw, 1),
            )
            cols.append(jnp.transpose(window, (3, 0, 1, 2)))  # (C, b, Ho, Wo)
    return jnp.stack(cols, 0).reshape(kh * kw * c, b * ho * wo)


def _patches(x, kernel_hw, strides, pads, out_hw):
    """im2col: ``(b*Ho*Wo, kh*kw*C)``, columns ordered (i, j, c) like HWIO."""
    b, _, _, c = x.shape
    (kh, kw), (sh, sw), (ho, wo) = kernel_hw, strides, out_hw
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    cols = [
        lax.slice(
            xp,
            (0, i, j, 0),
            (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
            (1, sh, sw, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.concatenate(cols, axis=-1).reshape(b * ho * wo, kh * kw * c)


def _chunk_size(batch: int, bytes_per_image: int, target_bytes: int | None = None) -> int:
    """Images per chunk: about ``target_bytes`` (default :data:`CONV_CHUNK_BYTES`) of
    patches, a divisor of the batch if possible.

    A remainder chunk costs far more than its size (the batch is sliced and copied), so
    the largest divisor of ``batch`` not above the target is used unless it is below half
    the target (e.g. a prime batch size).
    """
    target_bytes = CONV_CHUNK_BYTES if target_bytes is None else target_bytes
    target = int(max(1, min(batch, target_bytes // max(bytes_per_image, 1))))
    size = max(d for d in range(1, target + 1) if batch % d == 0)
    return size if 2 * size >= target else target


def _conv_chunked(terms, strides, pads, precision, chunk_bytes):
    """``sum_i conv(x_i, kernel_i)`` as batch-chunked im2col matmuls (bilinear in each pair).

    Every term is ``(x, kernel, kernel_grad_layout, operands)``, all ``x`` of one shape
    ``(batch, height, width, in_features)``, all kernels ``(kh, kw, in_features,
    out_features)``. One loop over batch chunks of about ``chunk_bytes`` of patches per
    term does one ``(n, kh*kw*C) @ (kh*kw*C, D)`` GEMM per term, accumulated in (at least)
    float32; ``jax.checkpoint`` keeps the patches out of the residuals (they are rebuilt
    per chunk in the backward pass). Being linear in each argument, JAX transposes it into
    chunked GEMMs in the same single loop: with respect to ``kernel``,
    ``dW = sum over chunks of patches(x_chunk)^T @ dy_chunk``; with respect to ``x``,
    ``dpatches = dy_chunk @ W^T`` followed by the col2im sum of shifted slices.

    ``kernel_grad_layout`` picks the patches' layout: True (for terms differentiated only
    in the kernel): ``(kh*kw*C, pixels)`` built along a major axis, fastest for the
    transposed GEMM ``patches^T @ dy``; False: ``(pixels, kh*kw*C)``, fastest for
    ``patches @ W`` and its transpose ``dy @ W^T`` (measured, results/conv_cpu.md).
    ``operands`` is the dtype of the GEMM operands (``None``: the accumulation dtype, so
    bfloat16 products are exact as well).

    Returns:
      The sum in the first kernel's dtype.
    """
    batch, height, width, cin = terms[0][0].shape
    kh, kw, _, cout = terms[0][1].shape
    (lo_h, hi_h), (lo_w, hi_w) = pads
    ho = (height + lo_h + hi_h - kh) // strides[0] + 1
    wo = (width + lo_w + hi_w - kw) // strides[1] + 1
    out_dtype = terms[0][1].dtype
    acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
    xs = [x for x, *_ in terms]
    kms, layouts, dtypes = [], [], []
    for _, kernel, kernel_grad_layout, operands in terms:
        dtypes.append(acc_dtype if operands is None else operands)
        kms.append(kernel.reshape(kh * kw * cin, cout).astype(dtypes[-1]))
        layouts.append(kernel_grad_layout)

    @jax.checkpoint
    def chunk(xcs, kms):
        y = 0
        for xc, km, transposed, dtype in zip(xcs, kms, layouts, dtypes, strict=True):
            if transposed:
                p = _patches_t(xc.astype(dtype), (kh, kw), strides, pads, (ho, wo)).T
            else:
                p = _patches(xc.astype(dtype), (kh, kw), strides, pads, (ho, wo))
            y = y + jnp.matmul(p, km, precision=precision, preferred_element_type=acc_dtype)
        return y.reshape(xcs[0].shape[0], ho, wo, cout)

    itemsize = max(jnp.dtype(d).itemsize for d in dtypes)
    size = _chunk_size(batch, ho * wo * kh * kw * cin * itemsize, chunk_bytes)
    n_full, rest = divmod(batch, size)
    parts = []
    if n_full == 1:
        parts.append(chunk([x[:size] for x in xs], kms))
    elif n_full > 1:
        stacked = [x[: n_full * size].reshape(n_full, size, height, width, cin) for x in xs]
        ys = lax.map(lambda xcs: chunk(xcs, kms), stacked)
        parts.append(ys.reshape(n_full * size, ho, wo, cout))
    if rest:
        parts.append(chunk([x[n_full * size :] for x in xs], kms))
    y = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
    return y.astype(out_dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _conv2d_matmul(x, kernel, strides, pads, precision, gemm):
    # gemm: (forward, input gradient) computed by chunked GEMMs instead of XLA's conv.
    if gemm[0]:
        return _conv_chunked(
            [(x, kernel, False, x.dtype)], strides, pads, precision, GEMM_CHUNK_BYTES
        )
    return lax.conv_general_dilated(
        x, kernel, strides, pads, dimension_numbers=_NHWC_SPEC, precision=precision
    )


@functools.partial(_conv2d_matmul.defjvp, symbolic_zeros=True)
def _conv2d_matmul_jvp(strides, pads, precision, gemm, primals, tangents):
    x, kernel = primals
    x_dot, kernel_dot = tangents
    y = _conv2d_matmul(x, kernel, strides, pads, precision, gemm)
    has_x, has_kernel = (not isinstance(t, SymbolicZero) for t in (x_dot, kernel_dot))
    terms, chunked = [], []
    if has_x and gemm[1]:
        # Transposes to chunked dy @ W^T GEMMs, each followed by a col2im.
        chunked.append((x_dot, kernel, False, x_dot.dtype))
    elif has_x:
        # Transposes to XLA's input-gradient convolution.
        terms.append(
            lax.conv_general_dilated(
                x_dot, kernel, strides, pads, dimension_numbers=_NHWC_SPEC, precision=precision
            )
        )
    if has_kernel:
        # Transposes to dW = sum over chunks of patches(x)^T @ dy.
        chunked.append((x, kernel_dot, True, None))
    # One loop per term: merging both into one loop over chunks measured no faster.
    for term in chunked:
        chunk_bytes = CONV_CHUNK_BYTES if term[2] else GEMM_CHUNK_BYTES
        terms.append(_conv_chunked([term], strides, pads, precision, chunk_bytes))
    if not terms:
        return y, jnp.zeros_like(y)
    return y, functools.reduce(jnp.add, terms)


def conv2d_matmul(
    x: jnp.ndarray,
    kernel: jnp.ndarray,
    strides: Sequence[int] = (1, 1),
    padding: Any = "SAME",
    precision: Any = None,
    *,
    forward: str = "xla",
    input_grad: str = "xla",
) -> jnp.ndarray:
    """2D NHWC/HWIO convolution whose kernel gradient is computed by matmuls.

    The value is ``lax.conv_general_dilated(x, kernel, strides, padding,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))``, computed by that very operation
    (``forward='xla'``) or by batch-chunked im2col GEMMs (``forward='gemm'``). The
    derivative is defined by a ``jax.custom_jvp`` (so reverse mode, forward mode and
    forward-over-reverse Hessian-vector products all work): the input part is XLA's own
    convolution JVP, the kernel part is an im2col matmul over batch chunks that JAX
    transposes, in reverse mode, into ``dW[i, j] = sum_b,h,w x_pad[b, h*s+i, w*s+j, :]^T
    dy[b, h, w, :]``: one ``(kh*kw*C, n) @ (n, D)`` GEMM per chunk instead of XLA:CPU's
    slow whole-feature-map convolution. With ``input_grad='gemm'`` the input part is
    written as chunked im2col GEMMs as well, which JAX transposes into ``dy_chunk @ W^T``
    GEMMs plus a col2im sum of shifted slices instead of XLA's input-gradient convolution.

    Args:
      x: ``(batch, height, width, in_features)``.
      kernel: ``(kh, kw, in_features, out_features)``; same dtype as ``x``.
      strides: window strides (an int or a pair).
      padding: ``'SAME'``, ``'VALID'`` or a sequence of two non-negative (low, high)
        pairs.
      precision: ``lax.Precision`` for the convolution and the matmuls.
      forward: ``'xla'``, ``'gemm'`` or ``'auto'`` (``'gemm'`` when ``kh*kw*in_features
        >= GEMM_MIN_DEPTH``, else ``'xla'``): how the value is computed.
      input_grad: ``'xla'`` or ``'gemm'``: how the input tangent / gradient is computed.

    Returns:
      ``(batch, out_height, out_width, out_features)`` in ``x.dtype``.

    Raises:
      ValueError: for unsupported settings (not 2D NHWC, grouped convolution,
        negative or unknown padding, mismatched dtypes); ``MatmulConv`` falls back to
        ``lax.conv_general_dilated`` in those cases instead.
    """
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(
            f"matmul conv needs NHWC x and HWIO kernel with matching channels "
            f"(no feature groups), got {x.shape} and {kernel.shape}"
        )
    if x.dtype != kernel.dtype:
        raise ValueError(f"matmul conv needs equal dtypes, got {x.dtype} and {kernel.dtype}")
    strides = (strides, strides) if isinstance(strides, int) else tuple(int(s) for s in strides)
    if len(strides) != 2 or min(strides) < 1:
        raise ValueError(f"strides must be two positive ints, got {strides}")
    pads = _conv_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
    if isinstance(precision, list):
        precision = tuple(precision)
    if forward not in ("xla", "gemm", "auto") or input_grad not in ("xla", "gemm"):
        raise ValueError(
            f"forward must be 'xla', 'gemm' or 'auto' and input_grad 'xla' or 'gemm', got "
            f"{forward!r}, {input_grad!r}"
        )
    if forward == "auto":
        depth = kernel.shape[0] * kernel.shape[1] * kernel.shape[2]
        forward = "gemm" if depth >= GEMM_MIN_DEPTH else "xla"
    gemm = (forward == "gemm", input_grad == "gemm")
    return _conv2d_matmul(x, kernel, strides, pads, precision, gemm)


def conv_general_dilated_matmul(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
    *,
    forward="xla",
    input_grad="xla",
):
    """``lax.conv_general_dilated`` with :func:`conv2d_matmul`'s gradient where supported.

    Supported: 2D NHWC/HWIO, no input or kernel dilation, one feature and batch group,
    'SAME'/'VALID'/explicit non-negative padding, equal input dtypes, no
    ``preferred_element_type``. Anything else is passed to ``lax.conv_general_dilated``
    unchanged (so values and gradients are XLA's).
    """
    kwargs = dict(
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    supported = (
        lhs.ndim == 4
        and rhs.ndim == 4
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
        and lhs.dtype == rhs.dtype
        and dimension_numbers is not None
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC_SPEC)
    )
    if supported:
        try:
            return conv2d_matmul(
                lhs, rhs, window_strides, padding, precision, forward=forward, input_grad=input_grad
            )
        except ValueError:
            pass
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)


class MatmulConv(nn.Conv):
    """``nn.Conv`` whose kernel gradient is computed by matmuls (see :func:`conv2d_matmul`).

    A drop-in subclass: same attributes, parameters (``kernel``, ``bias``), initialisers,
    dtype promotion and forward values as ``nn.Conv``; settings the matmul path does not
    support fall back to ``lax.conv_general_dilated``.
    """

    conv_general_dilated: Any = conv_general_dilated_matmul


class GemmConv(nn.Conv):
    """``nn.Conv`` computed entirely by batch-chunked im2col GEMMs on supported settings.

    Like :class:`MatmulConv` (same parameters, fallbacks), but the input gradient and,
    for GEMM depths ``kh*kw*in_features >= GEMM_MIN_DEPTH``, the forward value are chunked
    GEMMs too (:func:`conv2d_matmul` with ``forward='auto', input_grad='gemm'``), not
    XLA:CPU's convolutions.
    """

    conv_general_dilated: Any = functools.partial(
        conv_general_dilated_matmul, forward="auto", input_grad="gemm"
    )


def batch_norm(
    train: bool,
    *,
    dtype: Dtype,
    axis_name: str | None = None,
    name: str | None = None,
    scale_init: nn.initializers.Initializer = nn.initializers.ones,
) -> nn.BatchNorm:
    """Returns the BatchNorm layer used by every model.

    Args:
      train: if True, normalise with batch statistics and update the running
        averages in ``batch_stats``; if False, use the running averages.
      dtype: computation dtype (parameters stay float32).
      axis_name: optional ``pmap`` axis over which batch statistics are averaged.
      name: submodule name (the key in ``params`` and ``batch_stats``).
      scale_init: initialiser of the scale (gamma).

    Returns:
      An ``nn.BatchNorm`` with momentum 0.99 and epsilon 1e-3.
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
        axis_name=axis_name,
        scale_init=scale_init,
        name=name,
    )


def conv(
    features: int,
    kernel_size: int | tuple[int, int] = 3,
    *,
    strides: int = 1,
    padding: str = "SAME",
    use_bias: bool = False,
    dtype: Dtype,
    impl: str = "auto",
    kernel_init: nn.initializers.Initializer = conv_init,
    name: str | None = None,
) -> nn.Conv:
    """Returns a 2D convolution with He-normal kernels ('SAME' padding by default).

    Args:
      features: number of output channels.
      kernel_size: an int (square kernel) or a (height, width) pair.
      strides: spatial stride.
      padding: ``'SAME'`` or ``'VALID'``.
      use_bias: whether to add a bias (off by default: most convolutions are
        followed by BatchNorm, which makes a bias redundant).
      dtype: computation dtype (parameters stay float32).
      impl: ``'xla'`` (``nn.Conv``), ``'matmul'`` (:class:`MatmulConv`: same
        parameters and forward values, kernel gradient by matmuls), ``'gemm'``
        (:class:`GemmConv`: forward, input and kernel gradient by chunked GEMMs) or
        ``'auto'`` (``'gemm'`` on the CPU backend, ``'xla'`` elsewhere).
      kernel_init: kernel initialiser (default He-normal, :data:`conv_init`).
      name: submodule name.

    Returns:
      An ``nn.Conv`` (or its subclass :class:`MatmulConv` / :class:`GemmConv`).
    """
    if isinstance(kernel_size, int):
        kernel_size = (kernel_size, kernel_size)
    classes = {"xla": nn.Conv, "matmul": MatmulConv, "gemm": GemmConv}
    cls = classes[resolve_impl(impl, CPU_CONV_IMPL, CONV_IMPLS)]
    return cls(
        features,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        name=name,
    )


def dense(
    features: int,
    *,
    dtype: Dtype,
    kernel_init: nn.initializers.Initializer = dense_init,
    name: str | None = None,
) -> nn.Dense:
    """Returns a dense layer with Glorot-uniform kernels (by default) and a zero bias.

    Args:
      features: number of outputs.
      dtype: computation dtype (parameters stay float32).
      kernel_init: kernel initialiser (default Glorot-uniform, :data:`dense_init`).
      name: submodule name.

    Returns:
      An ``nn.Dense``.
    """
    return nn.Dense(
        features, dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init, name=name
    )


def _pool_windows(x, pad_value, padding):
    """``(b, h/2, 2, w/2, 2, c)`` view of ``x`` after 'SAME' padding or 'VALID' cropping."""
    _, height, width, _ = x.shape
    if padding == "SAME":
        ph, pw = height % 2, width % 2
        if ph or pw:
            x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), constant_values=pad_value)
    else:
        x = x[:, : height - height % 2, : width - width % 2, :]
    b, hp, wp, c = x.shape
    return x.reshape(b, hp // 2, 2, wp // 2, 2, c)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _max_pool_2x2_reshape(x, padding):
    # Undifferentiated (e.g. evaluation): XLA's reduce_window, as nn.max_pool.
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding=padding)


@_max_pool_2x2_reshape.defjvp
def _max_pool_2x2_reshape_jvp(padding, primals, tangents):
    (x,), (x_dot,) = primals, tangents
    # The barrier makes XLA materialise the input once: otherwise it may recompute a fused
    # producer (e.g. BatchNorm) separately for the maximum and for the comparisons below,
    # with different rounding, and route a derivative to no element or to two.
    xr = _pool_windows(lax.optimization_barrier(x), -jnp.inf, padding)
    e00, e01, e10, e11 = xr[:, :, 0, :, 0], xr[:, :, 0, :, 1], xr[:, :, 1, :, 0], xr[:, :, 1, :, 1]
    # Index of the first maximum in row-major window order (padding, -inf, never wins),
    # where XLA's select_and_scatter (the gradient of nn.max_pool) routes the derivative.
    top, bottom = jnp.maximum(e00, e01), jnp.maximum(e10, e11)
    first = jnp.where(bottom > top, jnp.where(e11 > e10, 3, 2), jnp.where(e01 > e00, 1, 0)).astype(
        jnp.int8
    )
    y = jnp.maximum(top, bottom)
    one_hot = first[:, :, None, :, None, :] == jnp.array([[0, 1], [2, 3]], jnp.int8).reshape(
        1, 1, 2, 1, 2, 1
    )
    y_dot = jnp.sum(jnp.where(one_hot, _pool_windows(x_dot, 0, padding), 0), axis=(2, 4))
    return y, y_dot


def max_pool_2x2(x: jnp.ndarray, impl: str = "auto", padding: str = "SAME") -> jnp.ndarray:
    """2x2 max-pooling with stride 2 ('SAME' padding: odd sizes round up).

    Args:
      x: ``(..., height, width, features)``.
      impl: ``'xla'`` (``nn.max_pool``), ``'reshape'`` or ``'auto'`` (``'reshape'`` on
        the CPU backend, ``'xla'`` elsewhere). ``'reshape'`` takes the maximum of the
        four elements of each window after a reshape and routes the derivative to the
        first maximum in row-major window order, which is where XLA's
        ``select_and_scatter`` sends it: values and gradients equal ``nn.max_pool``'s,
        ties included (for NaN-free inputs; the sign of a zero maximum may differ), while
        the backward pass is one fused elementwise select instead of XLA:CPU's slow
        ``select_and_scatter``.
      padding: ``'SAME'`` (pad odd sizes with -inf) or ``'VALID'`` (drop the last odd
        row / column), as in ``nn.max_pool``.

    Returns:
      ``(..., height / 2, width / 2, features)``, rounded up ('SAME') or down ('VALID').
    """
    impl = resolve_impl(impl, CPU_POOL_IMPL, POOL_IMPLS)
    if padding not in ("SAME", "VALID"):
        raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
    if impl == "xla" or x.ndim < 3 or not jnp.issubdtype(x.dtype, jnp.floating):
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding=padding)
    lead = x.shape[:-3]
    y = _max_pool_2x2_reshape(x.reshape((-1,) + x.shape[-3:]), padding)
    return y.reshape(lead + y.shape[1:])


def global_avg_pool(x: jnp.ndarray) -> jnp.ndarray:
    """Mean over the spatial axes of an NHWC tensor."""
    return jnp.mean(x, axis=(1, 2))
