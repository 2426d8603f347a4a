"""Parameter targets (``LoraConfig.target_parameters``): LoRA on raw params, e.g. a mixture of
experts' stacked weights (experts, in, out), wherever the model reads them.

In a param tree the factors of a raw param ``P`` sit beside it in a small dict ``P_lora`` holding
``lora_A`` / ``lora_B`` (A (..., p, r), B (..., r, q) in P's own axis order; ``core.experts``), so
masking, merge, adapter folders, hotswap, banks and weighted adapters treat it as they treat a
layer: its base leaf is ``P`` (``base_leaf_key``).

While the model runs, ``P`` is read through an ``AdaptedParam`` box: flax unboxes it on every read
(``self.param(...)``, an NNX variable's ``[...]``) into ``W + scale·A·B``, so any use of the param is
adapted (the general path). A model written for lora_jax reads the box itself
(``self.param(name, unbox=False)`` in linen, ``variable.get_raw_value()`` in NNX) and passes it to
``ragged_dot`` or ``einsum`` here, which compute the update through the rank and never form an
(experts, in, out) delta (the grouped path); given a plain array they are jax's own.

    >>> import jax.numpy as jnp
    >>> box = AdaptedParam.of(jnp.zeros((2, 4, 3)), jnp.ones((2, 4, 1)), jnp.ones((2, 1, 3)), scale=0.5)
    >>> box.unbox().shape, float(box.unbox()[0, 0, 0])
    ((2, 4, 3), 0.5)
    >>> ragged_dot(jnp.ones((5, 4)), box, jnp.array([2, 3]))[0].tolist()
    [2.0, 2.0, 2.0]
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import struct, traverse_util
from flax.core import meta

from .boxes import stays_boxed
from .config import LoraConfig
from .core import experts
from .core.init import a_initializer
from .targets import matches, path_str

Array = jax.Array
Params = Mapping[str, Any]
FACTORS_SUFFIX = "_lora"  # the factors of raw param P sit in P_lora, beside it


def factors_key(param_key: tuple[str, ...]) -> tuple[str, ...]:
    """The key of the dict holding a raw param's factors: ('moe', 'w_in') -> ('moe', 'w_in_lora')."""
    return param_key[:-1] + (param_key[-1] + FACTORS_SUFFIX,)


def param_path_of(module: tuple[str, ...]) -> tuple[str, ...] | None:
    """The key of the raw param a factors dict is named for (('moe', 'w_in_lora') -> ('moe', 'w_in')),
    or None for a module whose name is not a factors dict's; the inverse of ``factors_key``."""
    if not module or not module[-1].endswith(FACTORS_SUFFIX):
        return None
    return module[:-1] + (module[-1][: -len(FACTORS_SUFFIX)],)


def param_key_of(module: tuple[str, ...], flat: Mapping[tuple[str, ...], Any]) -> tuple[str, ...] | None:
    """The raw param of ``flat`` whose factors ``module`` holds (('moe', 'w_in_lora') -> ('moe', 'w_in')), or None."""
    key = param_path_of(module)
    return key if key in flat else None


class AdaptedParam(struct.PyTreeNode, meta.AxisMetadata):
    """A raw param with its LoRA factors, read as ``W + scale·A·B``; see the module docstring.

    Attributes:
      shape_like: None, or a broadcast zero of a stored value's shape (``of``).
      value: the frozen param W (..., p, q).
      lora_a, lora_b: A (..., p, r), B (..., r, q) in W's axis order.
      scale: alpha / r.
      in_axis: which of W's last two axes is the input (-2: (.., in, out); -1: (.., out, in)).
    """

    shape_like: Any  # None, or for a stored (quantized) value a broadcast zero of its shape (see ``of``)
    value: Any
    lora_a: Any
    lora_b: Any
    scale: float = struct.field(pytree_node=False, default=1.0)
    in_axis: int = struct.field(pytree_node=False, default=-2)

    @classmethod
    def of(cls, value: Any, lora_a: Any, lora_b: Any, scale: float = 1.0, in_axis: int = -2) -> "AdaptedParam":
        """The box of ``value`` (an array, or a stored box such as a quantized kernel) and its factors.

        Flax checks a param's first leaf against the shape its module declares; a quantized value's
        first leaf is its codes, so such a box leads with ``shape_like``, a broadcast zero of the
        value's shape that nothing computes with (XLA drops it)."""
        stored = stays_boxed(value)
        shape_like = jnp.broadcast_to(jnp.zeros((), jnp.dtype(value.dtype)), value.shape) if stored else None
        return cls(shape_like, value, lora_a, lora_b, scale, in_axis)

    def unbox(self) -> Array:
        w = meta.unbox(self.value)
        update = jnp.matmul(self.lora_a.astype(jnp.float32), self.lora_b.astype(jnp.float32))
        return (w.astype(jnp.float32) + self.scale * update).astype(w.dtype)

    def replace_boxed(self, val: Any) -> "AdaptedParam":
        return self.replace(value=val)

    def add_axis(self, index: int, params: dict[Any, Any]) -> "AdaptedParam":
        return self  # W, A and B carry a stack's axes themselves

    def remove_axis(self, index: int, params: dict[Any, Any]) -> "AdaptedParam":
        return self


def _raw(rhs: Any) -> Any:
    """An NNX variable's raw value (a box stays a box); anything else as it is."""
    getter = getattr(rhs, "get_raw_value", None)
    return getter() if callable(getter) else rhs


def _through(weight: Any, product: Callable[[Array, Array], Array], x: Array) -> Array:
    """``product(x, W)``; a stored (quantized) W is dequantized at the point of use, in the forward
    and the backward pass (its box's ``apply``), so no dequantized expert stack outlives the product."""
    if stays_boxed(weight):
        return weight.apply(lambda x, w, _: product(x, w), x)
    return product(x, meta.unbox(weight))


def ragged_dot(lhs: Array, rhs: Any, group_sizes: Array, *, in_axis: int = -2, precision: Any = None,
               preferred_element_type: Any = None) -> Array:
    """``jax.lax.ragged_dot`` for rows sorted by expert, on experts laid out (E, in, out)
    (``in_axis`` -2, JAX's) or (E, out, in) (-1, PyTorch's: each expert applied as ``W[e].T``); an
    ``AdaptedParam`` ``rhs`` adds its update through the rank (``core.experts.ragged_low_rank``), and
    its config's ``parameter_in_axis`` must agree with ``in_axis``. Quantized experts
    (``lora_jax.quantize``) are dequantized at the point of use."""
    rhs = _raw(rhs)
    adapter = rhs if isinstance(rhs, AdaptedParam) else None
    if adapter is not None:
        if adapter.in_axis != in_axis:
            raise ValueError(f"ragged_dot(in_axis={in_axis}) on a parameter target whose LoraConfig.parameter_in_axis "
                             f"is {adapter.in_axis}: set the config's parameter_in_axis for it to {in_axis}")
        rhs = adapter.value

    def product(x: Array, w: Array) -> Array:
        return jax.lax.ragged_dot(x, w if in_axis == -2 else jnp.swapaxes(w, -1, -2), group_sizes,
                                  precision=precision, preferred_element_type=preferred_element_type)

    try:
        out = _through(rhs, product, lhs)
    except NotImplementedError as err:
        if "vmap" not in str(err):
            raise
        raise NotImplementedError(
            "lora_jax.ragged_dot under jax.vmap with an expert stack shared by the batch (an adapter bank's rows "
            "run under vmap): jax's ragged_dot has no batching rule for an operand that is not batched. In a bank, "
            "read the experts as weights (self.param(...) unboxed, jax.lax.ragged_dot on it): each row then has its "
            f"own W + scale·A·B and jax batches it ({err})") from None
    if adapter is None:
        return out
    update = experts.ragged_low_rank(lhs, adapter.lora_a, adapter.lora_b, group_sizes, adapter.scale,
                                     in_axis=in_axis, dtype=out.dtype, precision=precision)
    return out + update.astype(out.dtype)


def einsum(spec: str, x: Array, rhs: Any, *, precision: Any = None, preferred_element_type: Any = None) -> Array:
    """``jnp.einsum(spec, x, rhs)``; an ``AdaptedParam`` ``rhs`` adds its update through the rank
    (``core.experts.einsum_low_rank``: the kernel's last two letters are its input and output axes).
    Quantized experts are dequantized at the point of use."""
    rhs = _raw(rhs)
    adapter = rhs if isinstance(rhs, AdaptedParam) else None
    if adapter is not None:
        rhs = adapter.value
    out = _through(rhs, lambda x, w: jnp.einsum(spec, x, w, precision=precision,
                                                preferred_element_type=preferred_element_type), x)
    if adapter is None:
        return out
    update = experts.einsum_low_rank(spec, x, adapter.lora_a, adapter.lora_b, adapter.scale, dtype=out.dtype,
                                     precision=precision)
    return out + update.astype(out.dtype)


def _shape(leaf: Any) -> tuple[int, ...]:
    """A leaf's shape, a box's without unboxing it (a quantized param is not dequantized to be measured)."""
    if isinstance(leaf, meta.AxisMetadata):
        return tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(jnp.shape(leaf.unbox()))
    return tuple(jnp.shape(leaf))


def targeted_keys(flat: Mapping[tuple[str, ...], Any], config: LoraConfig) -> list[tuple[str, ...]]:
    """The keys of the raw params of a flat tree that ``config.target_parameters`` selects (LoRA
    factors and the weights of layers LoRA adapts as layers are never raw params)."""
    return [key for key in flat if key[-1] not in ("lora_A", "lora_B") and key[:-1] + ("lora_A",) not in flat
            and param_key_of(key[:-1], flat) is None and config.selects_parameter(path_str(key))]



def init_parameter_factors(params: Params, config: LoraConfig, key: Array) -> dict:
    """The factors of every parameter target of ``params``: {factors key + ('lora_A' | 'lora_B'): array},
    the input side's factor drawn (``config.init``), the other zero (so the model starts unchanged).

    ValueError names a pattern that matches no raw param (listing the params that exist) and a
    rank above the param's widths.
    """
    leaves = traverse_util.flatten_dict(dict(params))
    flat = {k: _shape(v) for k, v in leaves.items()}
    chosen = targeted_keys(leaves, config)
    missing = [t for t in config.target_parameters if not any(matches(t, path_str(k)) for k in chosen)]
    if missing:
        listing = "\n".join(f"  {path_str(k)}  {shape}" for k, shape in sorted(flat.items())
                            if len(shape) >= 2 and k[-1] not in ("lora_A", "lora_B"))
        raise ValueError(f"target_parameters {missing} matched no param (of at least 2 dimensions). The params:\n"
                         f"{listing}")
    out = {}
    for i, param_key in enumerate(chosen):
        where = path_str(param_key)
        rank, in_axis = config.rank_for(where), config.in_axis_for(where)
        shapes = experts.parameter_shapes(flat[param_key], rank, in_axis)
        if rank > min(shapes.n_in, shapes.n_out):
            raise ValueError(f"LoRA rank {rank} exceeds min(in, out) = min({shapes.n_in}, {shapes.n_out}) of "
                             f"parameter '{where}'")
        dtype = jnp.dtype(config.param_dtype)
        drawn = a_initializer(config.init, shapes.fan_in, rank)(jax.random.fold_in(key, i),
                                                               shapes.a if in_axis == -2 else shapes.b, dtype)
        zero = jnp.zeros(shapes.b if in_axis == -2 else shapes.a, dtype)
        a, b = (drawn, zero) if in_axis == -2 else (zero, drawn)
        out[factors_key(param_key) + ("lora_A",)], out[factors_key(param_key) + ("lora_B",)] = a, b
    return out


def box_parameter_targets(params: Params, config: LoraConfig) -> dict:
    """``params`` with every raw param that has factors beside it replaced by its ``AdaptedParam``
    (the tree a model reads while it runs); the factor dicts stay."""
    flat = traverse_util.flatten_dict(dict(params))
    out = dict(flat)
    for key in list(flat):
        if key[-1] != "lora_A":
            continue
        param_key = param_key_of(key[:-1], flat)
        if param_key is None:
            continue
        a, b = meta.unbox(flat[key]), meta.unbox(flat[key[:-1] + ("lora_B",)])
        where = path_str(param_key)
        out[param_key] = AdaptedParam.of(flat[param_key], a, b, config.scale_for(a.shape[-1]), config.in_axis_for(where))
    return traverse_util.unflatten_dict(out)
