r"""Gradient transformations of the paper's baselines, as the authors' release computes them.

* :func:`centralize_per_output_unit` — gradient centralization (the ``gc``
  method) over every axis but the last, i.e. per output unit of flax's HWIO
  convolution kernels and ``(in, out)`` dense kernels. ``optax.centralize``
  keeps axis 0 instead (PyTorch's OIHW layout), which on flax kernels
  centralises per kernel row or per *input* unit: a different transform.
* :func:`scale_by_keras_adam` and :func:`keras_adam` — Adam with Keras'
  placement of :math:`\varepsilon`: added to :math:`\sqrt{v}` *before* the bias
  correction, so the effective epsilon of the optax form grows as
  :math:`\varepsilon / \sqrt{1 - \beta_2^t}` in the first steps.

References:
  Yong et al., 2020, "Gradient Centralization: A New Optimization Technique for
  Deep Neural Networks" (arXiv 2004.01461).
  Kingma & Ba, 2015, "Adam: A Method for Stochastic Optimization"
  (arXiv 1412.6980), Algorithm 1 and the "more efficient" ordering of Sec. 2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["centralize_per_output_unit", "keras_adam", "scale_by_keras_adam"]


def _centralize_leaf(g: jax.Array | None) -> jax.Array | None:
    if g is None or g.ndim <= 1:
        return g
    return g - jnp.mean(g, axis=tuple(range(g.ndim - 1)), keepdims=True)


def centralize_per_output_unit() -> optax.GradientTransformation:
    r"""Gradient centralization per output unit (the last axis).

    Every gradient leaf of rank > 1 has its mean over all axes but the last
    subtracted: for a flax convolution kernel ``(H, W, I, O)``

    .. math::
      g_{h,w,i,o} \leftarrow g_{h,w,i,o} - \frac{1}{HWI} \sum_{h',w',i'} g_{h',w',i',o},

    and for a dense kernel ``(I, O)`` the mean over the inputs. Leaves of rank
    <= 1 (biases, BatchNorm scales and offsets) pass unchanged. This is the
    transform of the authors' release (Keras, channels-last) and of Yong et al.
    (who centralise each output filter); it is **not** ``optax.centralize``,
    which keeps axis 0.

    Returns:
      A stateless :class:`optax.GradientTransformation`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from sadt_jax.algorithm.transforms import centralize_per_output_unit
      >>> tx = optax.chain(centralize_per_output_unit(), optax.adam(1e-4))
      >>> g = {"kernel": jnp.arange(6.0).reshape(3, 2), "bias": jnp.ones(2)}
      >>> centralize_per_output_unit().update(g, optax.EmptyState())[0]["kernel"]
      Array([[-2., -2.],
             [ 0.,  0.],
             [ 2.,  2.]], dtype=float32)

    References:
      Yong et al., 2020 (arXiv 2004.01461).
    """

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(_centralize_leaf, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def scale_by_keras_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-7,
) -> optax.GradientTransformation:
    r"""Adam's rescaling with Keras' epsilon placement (before bias correction).

    With :math:`m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t`,
    :math:`v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2` and :math:`t = 1, 2, \ldots`,
    the update direction is

    .. math::
      u_t = \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}\,\frac{m_t}{\sqrt{v_t} + \varepsilon}
          = \frac{\hat m_t}{\sqrt{\hat v_t} + \varepsilon / \sqrt{1 - \beta_2^t}},

    as in Keras' and TensorFlow's ``Adam`` (and Kingma & Ba's "more efficient"
    ordering). ``optax.scale_by_adam`` computes :math:`\hat m_t / (\sqrt{\hat v_t}
    + \varepsilon)` instead; the two differ by how large :math:`\varepsilon` is
    relative to :math:`\sqrt{\hat v_t}` (at :math:`t = 1`, with
    :math:`\varepsilon = 10^{-7}`, Keras' effective epsilon is :math:`3.2 \cdot 10^{-6}`).

    The state is an :class:`optax.ScaleByAdamState`, so optimizer states and
    checkpoints have the same structure as with ``optax.scale_by_adam``.

    Args:
      b1: decay rate of the first moment.
      b2: decay rate of the second moment.
      eps: Keras' epsilon (its default is ``1e-7``), added to :math:`\sqrt{v_t}`.

    Returns:
      An :class:`optax.GradientTransformation`; chain it with a (negative)
      learning rate, or use :func:`keras_adam`.

    References:
      Kingma & Ba, 2015 (arXiv 1412.6980), Sec. 2.
    """

    def init_fn(params):
        return optax.ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=optax.tree.zeros_like(params),
        )

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count_inc = optax.safe_increment(state.count)
        t = count_inc.astype(jnp.float32)
        correction = jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t)
        updates = jax.tree.map(
            lambda m, v: None if m is None else correction * m / (jnp.sqrt(v) + eps),
            mu,
            nu,
            is_leaf=lambda x: x is None,
        )
        nu = optax.tree.cast_like(nu, state.nu)
        return updates, optax.ScaleByAdamState(count=count_inc, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def keras_adam(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-7,
) -> optax.GradientTransformation:
    r"""Adam as Keras computes it: :func:`scale_by_keras_adam` then the learning rate.

    .. math::
      \theta_t = \theta_{t-1} - \eta_{k}\,\frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
      \,\frac{m_t}{\sqrt{v_t} + \varepsilon}, \qquad k = t - 1,

    where a schedule :math:`\eta_k` is evaluated at the number of updates already
    applied (0 for the first), as Keras' ``LearningRateSchedule`` is.

    Args:
      learning_rate: a float or an optax schedule ``count -> lr``.
      b1: decay rate of the first moment.
      b2: decay rate of the second moment.
      eps: Keras' epsilon, added before the bias correction.

    Returns:
      An :class:`optax.GradientTransformation` (a drop-in for ``optax.adam``).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from sadt_jax.algorithm.transforms import keras_adam
      >>> sched = optax.exponential_decay(1e-4, transition_steps=1000, decay_rate=0.9)
      >>> tx = keras_adam(sched)
      >>> params = {"w": jnp.ones(3)}
      >>> updates, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)

    References:
      Kingma & Ba, 2015 (arXiv 1412.6980).
    """
    return optax.chain(
        scale_by_keras_adam(b1=b1, b2=b2, eps=eps),
        optax.scale_by_learning_rate(learning_rate),
    )
