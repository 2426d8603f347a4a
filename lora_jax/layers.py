"""Per-layer LoRA math: the shapes of lora_A / lora_B and the low-rank update for each layer kind.

Layouts (``r`` = rank; a leading stacked axis from ``nn.scan`` is allowed everywhere):

=================  ==============================  ===============================  =========
layer              lora_A                          lora_B                           base leaf
=================  ==============================  ===============================  =========
nn.Dense           (in, r)                         (r, out)                         kernel
nn.DenseGeneral    (prod(in_shape), r)             (r, prod(features))              kernel
nn.Conv            kernel_size + (in, r)           (1,) * n_spatial + (r, out)      kernel
nn.Embed           (num_embeddings, r)             (r, features)                    embedding
nn.Einsum          kernel shape, out axes -> 1,    kernel shape, in axes -> 1,      kernel
                   + (r,)                          + (r,)
=================  ==============================  ===============================  =========

Every layout but Einsum's gives the weight update as ``A @ B`` reshaped to the base leaf; Einsum's
"broadcast" layout (``A.ndim == kernel.ndim + 1``) gives it as ``sum_r A[..., r] * B[..., r]``,
which keeps any order of contracted and output axes in the kernel. ``weight_delta`` holds both.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import string
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from .config import LoraConfig
from .core.dropout import dropout

Array = jax.Array

SUPPORTED = (nn.Embed, nn.Conv, nn.Einsum, nn.DenseGeneral, nn.Dense)


def layer_kind(module: nn.Module) -> str | None:
    """'dense' | 'dense_general' | 'einsum' | 'conv' | 'embed', or None for layers LoRA cannot adapt."""
    if isinstance(module, nn.Embed):
        return "embed"
    if isinstance(module, nn.Conv):
        return "conv"
    if isinstance(module, nn.Einsum):
        return "einsum"
    if isinstance(module, nn.DenseGeneral):
        return "dense_general"
    if isinstance(module, nn.Dense):
        return "dense"
    return None


# The methods that apply a layer's weight: an Embed's table is also used, transposed, by ``attend``
# (tied input/output embeddings), so a targeted Embed adapts both and ``merge`` stays exact.
ADAPTED_METHODS = {"dense": ("__call__",), "dense_general": ("__call__",), "einsum": ("__call__",),
                   "conv": ("__call__",), "embed": ("__call__", "attend")}


def base_leaf_name(kind: str) -> str:
    return "embedding" if kind == "embed" else "kernel"


# --------------------------------------------------------------------------- initialisers


def _a_init(config: LoraConfig, fan_in: int, kind: str) -> Callable[[Array, tuple[int, ...], Any], Array]:
    """A's initialiser: PEFT's kaiming_uniform(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        if kind == "embed":  # a lookup table: unit gaussian, as PEFT inits the embedding factor
            return jax.random.normal(key, shape, dtype)
        if config.init == "gaussian":
            return jax.random.normal(key, shape, dtype) / config.rank
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# --------------------------------------------------------------------------- the update


def weight_delta(lora_a: Array, lora_b: Array, shape: tuple[int, ...]) -> Array:
    """The dense weight update A·B in the base leaf's ``shape`` (unscaled)."""
    if lora_a.ndim == len(shape) + 1:
        return _broadcast_delta(lora_a, lora_b, shape)
    return jnp.matmul(lora_a, lora_b).reshape(shape)


def _broadcast_delta(lora_a: Array, lora_b: Array, shape: tuple[int, ...]) -> Array:
    letters = iter(string.ascii_letters)
    rank_letter = next(letters)
    a_spec, b_spec, out_spec = [], [], []
    for a_dim, b_dim, dim in zip(lora_a.shape[:-1], lora_b.shape[:-1], shape):
        shared = next(letters)
        out_spec.append(shared)
        if a_dim == dim and b_dim == dim:  # stacked axis, or an axis of size one
            a_spec.append(shared)
            b_spec.append(shared)
        elif a_dim == dim:
            a_spec.append(shared)
            b_spec.append(next(letters))
        else:
            a_spec.append(next(letters))
            b_spec.append(shared)
    spec = f"{''.join(a_spec)}{rank_letter},{''.join(b_spec)}{rank_letter}->{''.join(out_spec)}"
    return jnp.einsum(spec, lora_a, lora_b)


# --------------------------------------------------------------------------- per-kind forward


def _accumulation(dtype: Any) -> Any:
    """Accumulate low-precision (bf16 / fp16) LoRA products in float32."""
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype


def _check_rank(config: LoraConfig, path: str, n_in: int, n_out: int) -> None:
    if config.rank > min(n_in, n_out):
        raise ValueError(
            f"LoRA rank {config.rank} exceeds min(in, out) = min({n_in}, {n_out}) at layer '{path}'; "
            f"a low-rank update cannot have a larger rank than the weight it adapts"
        )


def lora_update(
    module: nn.Module,
    kind: str,
    args: tuple,
    kwargs: dict,
    config: LoraConfig,
    path: str,
    dropout_key: Array | None,
    method: str = "__call__",
) -> Array:
    """scale · f(x; A, B) for one call of a targeted layer, creating lora_A / lora_B in its scope.

    ``method`` is the layer method being called: ``'attend'`` on an Embed computes the update of
    ``query @ embedding.T``, i.e. ``query @ (A·B).T``.
    """
    config = config.replace(rank=config.rank_for(path), rank_pattern=())  # this layer's rank and scale
    scope = module.scope
    weight = nn.meta.unbox(scope.get_variable("params", base_leaf_name(kind)))
    x = args[0] if args else kwargs.get("inputs", kwargs.get("query"))
    if method == "attend":
        return config.scale * _embed_attend(module, x, weight, config, path, dropout_key)
    make = {
        "dense": _dense,
        "dense_general": _dense_general,
        "einsum": _einsum,
        "conv": _conv,
        "embed": _embed,
    }[kind]
    return config.scale * make(module, x, weight, args, kwargs, config, path, dropout_key)


def _params(module, config, path, a_shape, b_shape, fan_in, kind):
    scope = module.scope
    dtype = jnp.dtype(config.param_dtype)
    if not scope.has_variable("params", "lora_A") and not scope.is_mutable_collection("params"):
        raise ValueError(
            f"layer '{path}' is a LoRA target but its params hold no lora_A/lora_B: initialise the "
            f"adapter with model.init(...) or lora_jax.init_lora_params(model, base_params, rng, ...)"
        )
    for name, want in (("lora_A", a_shape), ("lora_B", b_shape)):
        if scope.has_variable("params", name):
            have = tuple(scope.get_variable("params", name).shape)
            if have != tuple(want):
                raise ValueError(f"{name} at '{path}' has shape {have}, but this layer needs {tuple(want)}")
    if scope.has_variable("params", "lora_A") != scope.has_variable("params", "lora_B"):
        raise ValueError(f"layer '{path}' holds only one of lora_A / lora_B; an adapter needs both")
    if scope.has_variable("params", "lora_A"):  # read, not re-declared: a layer may run twice per call
        return scope.get_variable("params", "lora_A"), scope.get_variable("params", "lora_B")
    a = scope.param("lora_A", _a_init(config, fan_in, kind), a_shape, dtype)
    b = scope.param("lora_B", nn.initializers.zeros, b_shape, dtype)
    return a, b


def _dense(module, x, kernel, args, kwargs, config, path, key):
    n_in, n_out = kernel.shape
    _check_rank(config, path, n_in, n_out)
    a, b = _params(module, config, path, (n_in, config.rank), (config.rank, n_out), n_in, "dense")
    x = dropout(x, config.dropout, key)
    dtype = jnp.result_type(x, kernel) if module.dtype is None else module.dtype
    acc = _accumulation(dtype)
    h = jnp.matmul(x.astype(dtype), a.astype(dtype), precision=module.precision, preferred_element_type=acc)
    return jnp.matmul(h.astype(dtype), b.astype(dtype), precision=module.precision, preferred_element_type=acc)


def _dense_general(module, x, kernel, args, kwargs, config, path, key):
    if module.batch_dims:
        raise NotImplementedError(f"LoRA on nn.DenseGeneral with batch_dims is not supported (layer '{path}')")
    axes = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    axes = tuple(a % x.ndim for a in axes)
    in_shape, out_shape = kernel.shape[: len(axes)], kernel.shape[len(axes):]
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    _check_rank(config, path, n_in, n_out)
    a, b = _params(
        module, config, path, (n_in, config.rank), (config.rank, n_out), n_in, "dense_general")
    x = dropout(x, config.dropout, key)
    dtype = jnp.result_type(x, kernel) if module.dtype is None else module.dtype
    moved = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
    batch_shape = moved.shape[: x.ndim - len(axes)]
    flat = moved.reshape(batch_shape + (n_in,)).astype(dtype)
    acc = _accumulation(dtype)
    h = jnp.matmul(flat, a.astype(dtype), precision=module.precision, preferred_element_type=acc)
    out = jnp.matmul(h.astype(dtype), b.astype(dtype), precision=module.precision, preferred_element_type=acc)
    return out.reshape(batch_shape + tuple(out_shape))


def _einsum(module, x, kernel, args, kwargs, config, path, key):
    einsum_str = kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or module.einsum_str
    spec = einsum_str.replace(" ", "")
    if "..." in spec or spec.count(",") != 1 or "->" not in spec:
        raise NotImplementedError(f"LoRA on nn.Einsum needs an explicit 'x,kernel->out' spec without '...' "
                                  f"(layer '{path}' has {einsum_str!r})")
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    in_axes = [i for i, c in enumerate(rhs) if c in lhs and c not in out]
    out_axes = [i for i, c in enumerate(rhs) if c in out and c not in lhs]
    if len(in_axes) + len(out_axes) != len(rhs):
        raise NotImplementedError(
            f"LoRA on nn.Einsum '{einsum_str}' at '{path}': kernel axes that are both batch and weight "
            f"axes are not supported"
        )
    n_in = int(np.prod([kernel.shape[i] for i in in_axes]))
    n_out = int(np.prod([kernel.shape[i] for i in out_axes]))
    _check_rank(config, path, n_in, n_out)
    a_shape = tuple(1 if i in out_axes else d for i, d in enumerate(kernel.shape)) + (config.rank,)
    b_shape = tuple(1 if i in in_axes else d for i, d in enumerate(kernel.shape)) + (config.rank,)
    a, b = _params(module, config, path, a_shape, b_shape, n_in, "einsum")
    x = dropout(x, config.dropout, key)
    dtype = jnp.result_type(x, kernel) if module.dtype is None else module.dtype
    free = iter(c for c in string.ascii_letters if c not in spec)
    rank_letter = next(free)
    a_in = a.reshape([kernel.shape[i] for i in in_axes] + [config.rank]).astype(dtype)
    b_out = jnp.moveaxis(b.reshape([kernel.shape[i] for i in out_axes] + [config.rank]), -1, 0).astype(dtype)
    in_letters = "".join(rhs[i] for i in in_axes)
    out_letters = "".join(rhs[i] for i in out_axes)
    hidden = "".join(c for c in lhs if c not in in_letters) + rank_letter
    h = jnp.einsum(f"{lhs},{in_letters}{rank_letter}->{hidden}", x.astype(dtype), a_in, precision=module.precision)
    return jnp.einsum(f"{hidden},{rank_letter}{out_letters}->{out}", h, b_out, precision=module.precision)


def _conv(module, x, kernel, args, kwargs, config, path, key):
    if module.feature_group_count != 1 or module.mask is not None:
        raise NotImplementedError(f"LoRA on grouped or masked nn.Conv is not supported (layer '{path}')")
    spatial, (n_in, n_out) = kernel.shape[:-2], kernel.shape[-2:]
    fan_in = int(np.prod(spatial)) * n_in
    _check_rank(config, path, fan_in, n_out)
    a_shape = tuple(spatial) + (n_in, config.rank)
    b_shape = (1,) * len(spatial) + (config.rank, n_out)
    a, b = _params(module, config, path, a_shape, b_shape, fan_in, "conv")
    x = dropout(x, config.dropout, key)
    # A is a conv with the base's geometry into r channels: reuse the module's own conv code on it.
    down = module.clone(parent=None, features=config.rank, use_bias=False, name=None)
    with _internal_call():
        h = down.apply({"params": {"kernel": a}}, x)
    return jnp.matmul(h, b.reshape(config.rank, n_out).astype(h.dtype), precision=module.precision)


def _embed(module, x, embedding, args, kwargs, config, path, key):
    n_in, n_out = embedding.shape
    _check_rank(config, path, n_in, n_out)
    a, b = _params(module, config, path, (n_in, config.rank), (config.rank, n_out), n_in, "embed")
    dtype = module.dtype or embedding.dtype
    return jnp.matmul(jnp.take(a, x, axis=0).astype(dtype), b.astype(dtype))


def _embed_attend(module, query, embedding, config, path, key):
    """The update of ``Embed.attend``: query (..., features) @ (A (vocab, r) · B (r, features)).T."""
    n_in, n_out = embedding.shape
    _check_rank(config, path, n_in, n_out)
    a, b = _params(module, config, path, (n_in, config.rank), (config.rank, n_out), n_in, "embed")
    query = dropout(query, config.dropout, key)
    dtype = module.dtype or embedding.dtype
    h = jnp.matmul(query.astype(dtype), b.astype(dtype).T)
    return jnp.matmul(h, a.astype(dtype).T)


# --------------------------------------------------------------------------- re-entrancy guard

_INTERNAL = contextvars.ContextVar("lora_jax_internal_call", default=False)


@contextlib.contextmanager
def _internal_call():
    """Calls made while computing an update (e.g. A's conv) must not be intercepted again."""
    token = _INTERNAL.set(True)
    try:
        yield
    finally:
        _INTERNAL.reset(token)


def in_internal_call() -> bool:
    return _INTERNAL.get()
