"""LoRA on raw weight params (``LoraConfig.target_parameters``): a 2-D param (p, q), or a stack of
experts (E, p, q) read by ``jnp.einsum`` or ``jax.lax.ragged_dot``.

The factors follow the param's own axis order: ``A`` (E, p, r) holds its axis -2, ``B`` (E, r, q)
its axis -1, and the update is ``scale · A·B`` per expert, already in the param's layout (no
transpose anywhere). Which of p, q is the input is the param's ``in_axis``: -2 for JAX's
``x @ W[e]`` layout (E, in, out), -1 for PyTorch's ``x @ W[e].T`` layout (E, out, in). The input
side's factor starts random, the other at zero, so the update starts at zero either way.

The updates here never form an (E, p, q) array: each is two grouped products through the rank
(``lora_jax.param_targets`` adds them to the frozen param's own product).

    >>> import jax.numpy as jnp
    >>> x = jnp.ones((5, 4))                                          # 5 tokens, 2 experts (4 -> 3)
    >>> a, b = jnp.ones((2, 4, 1)), jnp.ones((2, 1, 3))
    >>> ragged_low_rank(x, a, b, jnp.array([2, 3]), scale=0.5).tolist()[0]
    [2.0, 2.0, 2.0]
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any

import jax
import jax.numpy as jnp

from .kinds import FactorShapes

Array = jax.Array


def parameter_shapes(param_shape: tuple[int, ...], rank: int, in_axis: int = -2) -> FactorShapes:
    """The factors of a raw param of shape (..., p, q): A (..., p, r), B (..., r, q); the leading axes
    (experts, a stack of layers) are kept, one adapter per expert. ``in_axis`` (-2 or -1) says which
    of p, q is the input (its size is the fan-in of the drawn factor).

    >>> s = parameter_shapes((8, 16, 32), rank=4)
    >>> s.a, s.b, s.fan_in
    ((8, 16, 4), (8, 4, 32), 16)
    """
    if len(param_shape) < 2:
        raise ValueError(f"a parameter target is at least 2-D (in, out), got shape {tuple(param_shape)}")
    if in_axis not in (-2, -1):
        raise ValueError(f"a parameter's in_axis is -2 (x @ W, JAX's layout) or -1 (x @ W.T, PyTorch's), got {in_axis}")
    lead, (p, q) = tuple(param_shape[:-2]), tuple(param_shape[-2:])
    n_in, n_out = (p, q) if in_axis == -2 else (q, p)
    return FactorShapes(lead + (p, rank), lead + (rank, q), n_in, n_in, n_out, 1)


def as_input_major(a: Array, b: Array, in_axis: int) -> tuple[Array, Array]:
    """The factors as (input side (..., in, r), output side (..., r, out)) whatever the param's layout.

    >>> [t.shape for t in as_input_major(jnp.ones((2, 5, 1)), jnp.ones((2, 1, 3)), in_axis=-1)]
    [(2, 3, 1), (2, 1, 5)]
    """
    if in_axis == -2:
        return a, b
    return jnp.swapaxes(b, -1, -2), jnp.swapaxes(a, -1, -2)


def expert_of_rows(group_sizes: Array, n_rows: int) -> Array:
    """Each row's expert, for rows sorted by expert in groups of ``group_sizes`` (rows past the last
    group get ``len(group_sizes)``: no expert).

    >>> expert_of_rows(jnp.array([2, 0, 1]), 4).tolist()
    [0, 0, 2, 3]
    """
    return jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(n_rows), side="right")


def ragged_low_rank(x: Array, a: Array, b: Array, group_sizes: Array, scale: float, *, in_axis: int = -2,
                    dtype: Any = None, precision: Any = None, method: str = "auto") -> Array:
    """``scale · ragged_dot(ragged_dot(x, A_in), B_out)``: the update of rows x (T, in) sorted by
    expert, never an (E, in, out) array; A / B in the param's axis order (``in_axis``), in ``dtype``.

    ``method`` 'ragged': two ``ragged_dot`` through the rank (2·T·r·(in + out) multiply-adds with a
    grouped kernel, as on GPU / TPU). 'stacked': the experts' factors side by side, (in, E·r) and
    (E·r, out), as two dense matmuls with each row's other experts' rank columns zeroed between them
    (2·T·E·r·(in + out)); XLA's CPU backend lowers ``ragged_dot`` densely over every expert and
    keeps a (T, E, out) product, which this avoids. 'auto': 'stacked' on CPU, else 'ragged'.
    """
    dtype = dtype or x.dtype
    a_in, b_out = as_input_major(a, b, in_axis)
    if method == "auto":
        method = "stacked" if jax.default_backend() == "cpu" else "ragged"
    if method == "ragged":
        h = jax.lax.ragged_dot(x.astype(dtype), a_in.astype(dtype), group_sizes, precision=precision)
        return scale * jax.lax.ragged_dot(h, b_out.astype(dtype), group_sizes, precision=precision)
    if method != "stacked":
        raise ValueError(f"method must be 'auto', 'ragged' or 'stacked', got {method!r}")
    n_experts, n_in, rank = a_in.shape
    a_all = jnp.moveaxis(a_in, 0, 1).reshape(n_in, n_experts * rank).astype(dtype)  # (in, E·r)
    b_all = b_out.reshape(n_experts * rank, -1).astype(dtype)  # (E·r, out)
    own = jax.nn.one_hot(expert_of_rows(group_sizes, x.shape[0]), n_experts, dtype=dtype)  # (T, E)
    h = jnp.matmul(x.astype(dtype), a_all, precision=precision).reshape(-1, n_experts, rank) * own[:, :, None]
    return scale * jnp.matmul(h.reshape(-1, n_experts * rank), b_all, precision=precision)


@dataclasses.dataclass(frozen=True)
class ExpertEinsum:
    """An ``'x,kernel->out'`` spec whose kernel is a stack of experts: its letters split by role.

    Attributes:
      lhs, rhs, out: the input's, the kernel's and the output's letters.
    """

    lhs: str
    rhs: str
    out: str

    @property
    def batch(self) -> str:
        """The kernel's leading (expert) letters: in the output, and in the input or not (an input
        every expert sees, 'td,edf->tef')."""
        return "".join(c for c in self.rhs[:-2] if c in self.out)


def parse_expert_einsum(spec: str) -> ExpertEinsum:
    """Split an explicit ``'x,kernel->out'`` spec whose kernel's last two letters are the param's p and
    q axes (one contracted with the input, the other in the output) and whose leading kernel letters
    are in the output (experts: in the input too when tokens are dispatched per expert,
    'ecd,edf->ecf', or not when every expert sees every token, 'td,edf->tef').

    >>> parse_expert_einsum("ecd,edf->ecf").batch
    'e'
    """
    compact = spec.replace(" ", "")
    if "..." in compact or compact.count(",") != 1 or "->" not in compact:
        raise ValueError(f"an expert einsum needs an explicit 'x,kernel->out' spec without '...', got {spec!r}")
    lhs, rest = compact.split(",")
    rhs, out = rest.split("->")
    parsed = ExpertEinsum(lhs, rhs, out)
    p, q = rhs[-2:]
    roles_ok = (p in lhs and p not in out and q in out and q not in lhs) or \
        (q in lhs and q not in out and p in out and p not in lhs)
    if len(rhs) < 2 or not roles_ok or len(parsed.batch) != len(rhs) - 2:
        raise ValueError(f"expert einsum {spec!r}: the kernel's last two axes must be its input and output axes "
                         f"(one contracted, one kept) and every other kernel axis an expert axis kept in the output, "
                         f"e.g. 'ecd,edf->ecf' or 'td,edf->tef'")
    return parsed


def einsum_low_rank(spec: str, x: Array, a: Array, b: Array, scale: float, *, dtype: Any = None,
                    precision: Any = None) -> Array:
    """``scale · einsum(spec, x, A·B)`` through the rank, without forming A·B; A and B follow the
    kernel's axis order (A (..., p, r), B (..., r, q)), computed in ``dtype``.

    >>> einsum_low_rank("ecd,edf->ecf", jnp.ones((2, 3, 4)), jnp.ones((2, 4, 1)), jnp.ones((2, 1, 5)),
    ...                 scale=1.0)[0, 0].tolist()
    [4.0, 4.0, 4.0, 4.0, 4.0]
    """
    parsed = parse_expert_einsum(spec)
    dtype = dtype or x.dtype
    free = iter(c for c in string.ascii_letters if c not in parsed.lhs + parsed.rhs + parsed.out)
    r = next(free)
    lead, p, q = parsed.rhs[:-2], parsed.rhs[-2], parsed.rhs[-1]
    a_spec, b_spec = lead + p + r, lead + r + q
    input_first = p in parsed.lhs
    first, second = (a_spec, b_spec) if input_first else (b_spec, a_spec)
    first_factor, second_factor = (a, b) if input_first else (b, a)
    hidden = "".join(c for c in parsed.lhs if c != (p if input_first else q))
    hidden += "".join(c for c in lead if c not in hidden) + r
    h = jnp.einsum(f"{parsed.lhs},{first}->{hidden}", x.astype(dtype), first_factor.astype(dtype), precision=precision)
    return scale * jnp.einsum(f"{hidden},{second}->{parsed.out}", h, second_factor.astype(dtype), precision=precision)
