"""PEFT's ``target_parameters`` files for our parameter targets (``lora_jax.param_targets``), both ways.

PEFT wraps a targeted ``nn.Parameter`` in a ``ParamWrapper`` around its module; several targeted
params of one module nest, the module's first param innermost, so the file names the module:
with two, the first param's factors are ``<module>.base_layer.lora_A.weight`` and the second's
``<module>.lora_A.weight``. For experts stored (E, out, in), ``lora_A`` is (r·E, in) expert-major
(row e·r + k) and ``lora_B`` (out, r·E) rank-major (column k·E + e), so that
``delta[e] = scale · B_e · A_e``; a 2-D param has the Linear layout (r, in) / (out, r).

Our factors follow the param's axis order (A on its axis -2, B on -1); ``parameter_in_axis`` says
which is the input, and each is turned into PEFT's (input, output) roles here.

    >>> import numpy as np
    >>> a, b = np.ones((4, 6, 2)), np.ones((4, 2, 3))            # (E, in, r), (E, r, out): in_axis -2
    >>> t = to_peft(a, b, in_axis=-2)
    >>> t["lora_A"].shape, t["lora_B"].shape
    ((8, 6), (3, 8))
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from .config import LoraConfig
from .param_targets import factors_key, param_key_of, targeted_keys
from .targets import matches, path_str

BASE_LAYER = "base_layer"


class AmbiguousLayout(ValueError):
    """A square param whose (in, out) order PEFT's factors cannot tell."""


def to_peft(a: np.ndarray, b: np.ndarray, in_axis: int) -> dict[str, np.ndarray]:
    """PEFT's lora_A / lora_B of one param target from our A (..., p, r), B (..., r, q)."""
    a_in, b_out = (a, b) if in_axis == -2 else (np.swapaxes(b, -1, -2), np.swapaxes(a, -1, -2))  # (.., in, r), (.., r, out)
    if a_in.ndim == 2:
        return {"lora_A": a_in.T, "lora_B": b_out.T}
    if a_in.ndim != 3:
        raise ValueError(f"PEFT's target_parameters hold 2-D params or 3-D experts, not factors of shape {a.shape}")
    n_experts, n_in, rank = a_in.shape
    return {"lora_A": np.transpose(a_in, (0, 2, 1)).reshape(n_experts * rank, n_in),
            "lora_B": np.transpose(b_out, (2, 1, 0)).reshape(b_out.shape[-1], rank * n_experts)}


def from_peft(lora_a: np.ndarray, lora_b: np.ndarray, param_shape: tuple[int, ...], in_axis: int) -> tuple:
    """Our (A, B) for a param of ``param_shape`` from PEFT's lora_A / lora_B; ValueError on a mismatch."""
    n_in = param_shape[in_axis]
    n_out = param_shape[-1 if in_axis == -2 else -2]
    if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[1] != n_in or lora_b.shape[0] != n_out:
        raise ValueError(f"lora_A {lora_a.shape} / lora_B {lora_b.shape} do not fit a param of shape {param_shape} "
                         f"whose input axis is {in_axis} (in {n_in}, out {n_out})")
    if len(param_shape) == 2:
        a_in, b_out = lora_a.T, lora_b.T
    else:
        n_experts = param_shape[0]
        if lora_a.shape[0] % n_experts or lora_b.shape[1] != lora_a.shape[0]:
            raise ValueError(f"lora_A {lora_a.shape} / lora_B {lora_b.shape} are not rank × {n_experts} experts")
        rank = lora_a.shape[0] // n_experts
        a_in = np.transpose(lora_a.reshape(n_experts, rank, n_in), (0, 2, 1))
        b_out = np.transpose(lora_b.reshape(n_out, rank, n_experts), (2, 1, 0))
    if in_axis == -2:
        return a_in, b_out
    return np.swapaxes(b_out, -1, -2), np.swapaxes(a_in, -1, -2)


def owner_order(params: list[tuple[str, ...]], config: LoraConfig) -> dict[tuple[str, ...], int]:
    """Each targeted param's nesting depth below PEFT's outermost wrapper of its module: a module's
    params nest in the order of the ``target_parameters`` entries that select them (list them in
    the torch module's parameter order, e.g. gate_up_proj before down_proj), the first innermost."""
    by_owner: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    for key in params:
        by_owner.setdefault(key[:-1], []).append(key)
    depth = {}
    for keys in by_owner.values():
        rank_of = lambda key: next(i for i, t in enumerate(config.target_parameters) if matches(t, path_str(key)))
        ordered = sorted(keys, key=lambda key: (rank_of(key), key))
        for i, key in enumerate(ordered):
            depth[key] = len(ordered) - 1 - i
    return depth


def target_keys(flat: Mapping[tuple[str, ...], Any]) -> list[tuple[str, ...]]:
    """The keys of the raw params of a flat LoRA tree that hold factors (``P`` beside ``P_lora``)."""
    return sorted({param_key_of(k[:-1], flat) for k in flat if k[-1] == "lora_A"} - {None})


def export_tensors(adapter: Mapping[tuple[str, ...], Any], params: list[tuple[str, ...]], config: LoraConfig,
                   torch_name: Callable[[str], str], prefix: str) -> tuple[dict[str, np.ndarray], dict[str, int], list[str]]:
    """(PEFT tensors, {torch param name: rank}, torch param names) of the parameter targets ``params``
    (``target_keys``) in the flat ``adapter``; ``torch_name(module path)`` names the owning module."""
    depth = owner_order(params, config)
    tensors, ranks, names = {}, {}, []
    for key in params:
        factors = factors_key(key)
        a, b = np.asarray(adapter[factors + ("lora_A",)]), np.asarray(adapter[factors + ("lora_B",)])
        owner = torch_name(path_str(key[:-1]))
        wrapped = ".".join([owner] + [BASE_LAYER] * depth[key])
        try:
            converted = to_peft(a, b, config.in_axis_for(path_str(key)))
        except ValueError as err:
            raise ValueError(f"parameter '{path_str(key)}': {err} (a stack of layers has no PEFT form)") from None
        for leaf, value in converted.items():
            tensors[f"{prefix}{wrapped}.{leaf}.weight"] = value
        names.append(f"{owner}.{key[-1]}")
        ranks[names[-1]] = a.shape[-1]
    return tensors, ranks, names


def targeted_by_owner(flat_base: Mapping[tuple[str, ...], Any], config: LoraConfig,
                      torch_name: Callable[[str], str]) -> dict[str, list[tuple[str, ...]]]:
    """{torch name of the owning module: our keys of the params ``config.target_parameters`` selects
    there (``param_targets.targeted_keys``, at least 2-D)}."""
    out: dict[str, list[tuple[str, ...]]] = {}
    for key in targeted_keys(flat_base, config):
        if np.ndim(flat_base[key]) >= 2:
            out.setdefault(torch_name(path_str(key[:-1])), []).append(key)
    return out


def wrapped_pairs(tensors: Mapping[str, np.ndarray], owner: str, prefix: str) -> list[tuple[str, str]]:
    """The (lora_A, lora_B) tensor names of ``owner``'s nested wrappers present in ``tensors``, the
    innermost (the module's first param) first."""
    pairs, wrapped = [], owner
    while True:  # the outermost wrapper names the module; each one inside adds a base_layer
        names = (f"{prefix}{wrapped}.lora_A.weight", f"{prefix}{wrapped}.lora_B.weight")
        if names[0] not in tensors and names[1] not in tensors:
            return pairs[::-1]
        pairs.append(names)
        wrapped += "." + BASE_LAYER


def assign_pairs(keys: list[tuple[str, ...]], pairs: list[tuple[str, str]], tensors: Mapping[str, np.ndarray],
                 flat_base: Mapping[tuple[str, ...], Any], in_axes: Mapping[str, int]) -> dict:
    """{our param key: (lora_A name, lora_B name, our (A, B), in_axis)}: each wrapper's factors
    matched to the one param of the module whose shape they fit (and read into our layout once);
    ValueError where that is not unique."""
    out = {}
    for a_name, b_name in pairs:
        if a_name not in tensors or b_name not in tensors:
            raise ValueError(f"'{a_name if a_name not in tensors else b_name}' is missing: a parameter target needs "
                             f"both lora_A and lora_B")
        fits = []
        for key in keys:
            try:
                axis = in_axis_of(tuple(np.shape(flat_base[key])), tensors[a_name], tensors[b_name],
                                  in_axes.get(path_str(key)), path_str(key))
                factors = from_peft(tensors[a_name], tensors[b_name], tuple(np.shape(flat_base[key])), axis)
                fits.append((key, factors, axis))
            except AmbiguousLayout:
                raise
            except ValueError:
                continue
        fits = [fit for fit in fits if fit[0] not in out]
        if len(fits) != 1:
            names = [path_str(fit[0]) for fit in fits] or [path_str(k) for k in keys]
            raise ValueError(f"the factors {a_name} {np.shape(tensors[a_name])} / {np.shape(tensors[b_name])} fit "
                             f"{'no param' if not fits else 'more than one param'} of {names}")
        key, factors, axis = fits[0]
        out[key] = (a_name, b_name, factors, axis)
    return out


def in_axis_of(param_shape: tuple[int, ...], lora_a: np.ndarray, lora_b: np.ndarray, given: int | None,
               where: str) -> int:
    """Which axis of our param is the input, read off PEFT's factors (in = lora_A's columns, out =
    lora_B's rows) unless ``given``; a square param needs it given."""
    n_in, n_out = lora_a.shape[-1], lora_b.shape[0]
    fits = [axis for axis in (-2, -1) if param_shape[axis] == n_in and param_shape[-1 if axis == -2 else -2] == n_out]
    if given is not None:
        return given
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise ValueError(f"PEFT's factors of '{where}' (in {n_in}, out {n_out}) fit no axis order of the param "
                         f"{param_shape}")
    raise AmbiguousLayout(f"param '{where}' {param_shape} is square: whether it is (in, out) or (out, in) cannot be read "
                     f"off its shape; pass import_peft(..., parameter_in_axis={{'{where}': -2 or -1}})")
