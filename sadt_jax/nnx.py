"""flax.nnx models in :func:`sadt_jax.sadt_update` and :func:`sadt_jax.sam`: a linen-style adapter.

``sadt_update`` and the training loop treat a model as a pure function
``apply_fn(variables, images, *, train, rngs=None, mutable=False)`` over a
variables dict ``{"params": ..., "batch_stats": ...}`` (flax linen's
``Module.apply`` convention). An nnx model is a stateful object instead;
:func:`linen_style_apply` turns it into that pure function and its variables:

* ``nnx.Param`` leaves become ``variables["params"]`` and ``nnx.BatchStat``
  leaves ``variables["batch_stats"]`` (omitted when the model has none), as
  nested plain dicts with string keys (so ``sadt_jax.param_paths`` names and
  orbax checkpoints work as for linen models);
* ``train=True`` / ``False`` call the model after ``Module.train()`` /
  ``Module.eval()`` (dropout on and batch statistics, or dropout off and the
  running averages);
* ``rngs={"dropout": key}`` reseeds every RNG stream of the model (each
  ``nnx.Dropout`` owns one): the ``i``-th stream in ``nnx.iter_graph`` order
  gets key ``fold_in(key, i)`` and count 0 (a stream tagged ``t`` uses
  ``rngs[t]`` when given). Each call's masks come from the key it is given and
  nothing else, and different Dropout layers draw different masks;
* ``mutable=["batch_stats"]`` returns ``(outputs, {"batch_stats": new})``, the
  running statistics after the call; ``mutable=False`` returns the outputs.

The nnx model passed in is never modified: every call rebuilds a private copy
from its graph definition and the given variables. After training, write the
variables back with :func:`update_model`.

Example::

  from flax import nnx
  import sadt_jax, sadt_jax.nnx

  model = MyNnxCNN(rngs=nnx.Rngs(0))
  apply_fn, variables = sadt_jax.nnx.linen_style_apply(model)
  state = sadt_jax.TrainState.create(
      apply_fn=apply_fn, variables=variables, tx=sadt_jax.make_optimizer("sadt_t1"),
      key=jax.random.PRNGKey(0))
  state, metrics = sadt_jax.sadt_update(state, batch, config=sadt_jax.method_config("sadt_t1"))
  sadt_jax.nnx.update_model(model, {"params": state.params, **state.model_state})

See ``docs/nnx.md`` for a complete, runnable example.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["DEFAULT_COLLECTIONS", "linen_style_apply", "update_model"]

PyTree = Any

#: nnx variable types and the linen collection each one becomes.
DEFAULT_COLLECTIONS: Mapping[str, type[nnx.Variable]] = {
    "params": nnx.Param,
    "batch_stats": nnx.BatchStat,
}


def _pure(state: nnx.State) -> dict[str, Any]:
    """An nnx state as nested plain dicts with string keys (list indices become '0', '1', ...)."""

    def stringify(node):
        if isinstance(node, Mapping):
            return {str(k): stringify(v) for k, v in node.items()}
        return node

    return stringify(nnx.to_pure_dict(state))


def _fresh(state: nnx.State) -> nnx.State:
    """A copy of ``state`` with new Variable objects (so a call never mutates the template)."""
    return jax.tree.map(lambda x: x, state)


def _reseed(module: nnx.Module, rngs: Mapping[str, jax.Array]) -> None:
    """Reseeds every RNG stream: tag ``t`` from ``rngs[t]``, else from ``rngs['dropout']``."""
    streams = [node for _, node in nnx.iter_graph(module) if isinstance(node, nnx.RngStream)]
    for index, stream in enumerate(streams):
        key = rngs.get(stream.tag, rngs.get("dropout"))
        if key is None:
            raise ValueError(
                f"sadt_jax.nnx: the model has an RNG stream tagged {stream.tag!r} but rngs "
                f"has only {sorted(rngs)}; pass rngs={{'dropout': key}} (or a key for that tag)."
            )
        if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)
        stream.key.set_value(jax.random.fold_in(key, index))
        stream.count.set_value(jnp.zeros_like(stream.count.get_value()))


def linen_style_apply(
    model: nnx.Module,
    *,
    collections: Mapping[str, type[nnx.Variable]] | None = None,
) -> tuple[Callable[..., Any], dict[str, PyTree]]:
    """A pure, linen-style ``(apply_fn, variables)`` pair for an nnx model.

    Args:
      model: an ``nnx.Module`` whose ``__call__(x)`` returns the logits. Its
        train/eval behaviour must follow ``Module.train()`` / ``Module.eval()``
        (true of ``nnx.Dropout`` and ``nnx.BatchNorm``), and every stochastic
        layer must own an RNG stream (build ``nnx.Dropout(rate, rngs=rngs)``).
      collections: the linen collection name of each nnx variable type;
        default :data:`DEFAULT_COLLECTIONS` (``nnx.Param`` -> ``"params"``,
        ``nnx.BatchStat`` -> ``"batch_stats"``). Must contain ``"params"``.
        Variables of other types (RNG streams apart) are an error.

    Returns:
      ``(apply_fn, variables)``. ``variables`` holds ``"params"`` and every other
      collection the model has leaves in. ``apply_fn(variables, x, *, train,
      rngs=None, mutable=False, **kwargs)`` calls a private copy of the model
      (``**kwargs`` are passed to its ``__call__``) and returns its output, or
      ``(output, {name: new_collection})`` for the names in ``mutable``
      (``True``: every collection but ``"params"``). With ``train=True`` a model
      with RNG streams needs ``rngs={"dropout": key}``.

    Raises:
      ValueError: for a ``collections`` without ``"params"``, or a model holding
        variables of a type that no collection names.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from sadt_jax.nnx import linen_style_apply
      >>> class MLP(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.dense = nnx.Linear(4, 3, rngs=rngs)
      ...     self.bn = nnx.BatchNorm(3, rngs=rngs)
      ...     self.drop = nnx.Dropout(0.5, rngs=rngs)
      ...   def __call__(self, x):
      ...     return self.drop(self.bn(self.dense(x)))
      >>> apply_fn, variables = linen_style_apply(MLP(nnx.Rngs(0)))
      >>> sorted(variables)
      ['batch_stats', 'params']
      >>> logits, new = apply_fn(variables, jnp.ones((2, 4)), train=True,
      ...                        rngs={"dropout": jax.random.PRNGKey(1)},
      ...                        mutable=["batch_stats"])
      >>> apply_fn(variables, jnp.ones((2, 4)), train=False).shape
      (2, 3)
    """
    collections = dict(DEFAULT_COLLECTIONS if collections is None else collections)
    if "params" not in collections:
        raise ValueError(
            "sadt_jax.nnx: collections must map 'params' to a variable type; "
            f"got {list(collections)}"
        )
    names = list(collections)
    graphdef, *states, rest = nnx.split(model, *collections.values(), ...)
    templates = dict(zip(names, states, strict=True))
    unsupported = [
        "/".join(map(str, path))
        for path, value in nnx.to_flat_state(rest)
        if not isinstance(value, nnx.RngState)
    ]
    if unsupported:
        raise ValueError(
            f"sadt_jax.nnx: variables {unsupported} belong to no collection; add their type to "
            f"collections= (now {list(collections)})."
        )
    variables = {
        name: _pure(state)
        for name, state in templates.items()
        if name == "params" or jax.tree.leaves(state)
    }
    has_rng_streams = bool(jax.tree.leaves(rest))

    def apply_fn(
        variables: Mapping[str, PyTree],
        x: Any,
        *,
        train: bool,
        rngs: Mapping[str, jax.Array] | None = None,
        mutable: bool | Sequence[str] = False,
        **kwargs: Any,
    ):
        module = _merge(graphdef, templates, rest, variables)
        if train:
            module.train()
        else:
            module.eval()
        if train and has_rng_streams:
            if not rngs:
                raise ValueError(
                    "sadt_jax.nnx: train=True on a model with dropout needs rngs={'dropout': key}."
                )
            _reseed(module, rngs)
        outputs = module(x, **kwargs)
        if mutable is False:
            return outputs
        requested = [n for n in names if n != "params"] if mutable is True else list(mutable)
        unknown = [n for n in requested if n not in collections]
        if unknown:
            raise ValueError(f"sadt_jax.nnx: mutable={unknown} are not among {names}")
        return outputs, {n: _pure(nnx.state(module, collections[n])) for n in requested}

    return apply_fn, variables


def _merge(graphdef, templates, rest, variables) -> nnx.Module:
    """A private model built from the graph definition and ``variables``."""
    states = []
    for name, template in templates.items():
        state = _fresh(template)
        if name in variables:
            nnx.replace_by_pure_dict(state, variables[name])
        states.append(state)
    return nnx.merge(graphdef, *states, _fresh(rest))


def update_model(
    model: nnx.Module,
    variables: Mapping[str, PyTree],
    *,
    collections: Mapping[str, type[nnx.Variable]] | None = None,
) -> None:
    """Writes linen-style ``variables`` (e.g. trained ones) back into an nnx model, in place.

    Args:
      model: the nnx model that :func:`linen_style_apply` was called on.
      variables: ``{"params": ..., "batch_stats": ...}``, e.g.
        ``{"params": state.params, **state.model_state}`` of a ``TrainState``.
      collections: the same mapping as given to :func:`linen_style_apply`.
    """
    collections = dict(DEFAULT_COLLECTIONS if collections is None else collections)
    for name, pure in variables.items():
        state = nnx.state(model, collections[name])
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(model, state)
