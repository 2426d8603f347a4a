"""Hugging Face PEFT interop: export a lora_jax adapter as a PEFT LoRA folder, and import one.

Layout of a PEFT folder: ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<torch module path>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r);
embeddings use ``lora_embedding_A`` (r, vocab) / ``lora_embedding_B`` (features, r); convs
``lora_A.weight`` (r, in, kh, kw) / ``lora_B.weight`` (out, r, 1, 1); modules_to_save leaves are
stored under their plain names; DoRA's magnitude is ``lora_magnitude_vector`` (out,) for Linear and
Embedding, (1, out, 1, 1) for Conv2d (ours keeps the kernel's rank: (1, out), (1, 1, 1, out)). Our
module paths are the torch paths with '/' for '.'.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from .adapters import Adapter, check_adapter_fits, check_targets_cover, extract_adapter
from .config import LoraConfig
from .core.kinds import BASE_LEAVES, BROADCAST, factor_layout
from .core.variants import PER_OUTPUT_LEAVES
from .finite import nonfinite_leaves
from .folder_swap import folder_path, locked, recover_folder, replace_folder
from .param_targets import factors_key, param_path_of
from .peft_param_targets import assign_pairs, export_tensors, target_keys, targeted_by_owner, wrapped_pairs
from .safetensors_io import read_safetensors
from .targets import REGEX_PREFIX, matches, path_str

Params = Mapping[str, Any]
PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
EXPORT_NOTES = "lora_jax_export.json"  # name_map / flatten_order of an export, for import_peft
EXPORT_NOTES_FORMAT = "lora_jax.peft_export"
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")  # PEFT inits that rewrite the base weight
_UNSUPPORTED_FLAGS = ("use_qalora", "use_bdlora", "lora_bias", "fan_in_fan_out")


def _module_name(module: tuple[str, ...]) -> str:
    return ".".join(module)


def _layout(flat: dict, module: tuple[str, ...], a: np.ndarray, b: np.ndarray) -> tuple[str, int | None]:
    """('embed' | 'linear' | 'einsum' | 'conv', number of stacked layers or None) of an adapted layer.

    'linear' covers Dense and DenseGeneral (A (n_in, r), B (r, n_out), the kernel's input and output
    axes each flattened in C order) and 'einsum' the broadcast layout, exported as the Linear map
    whose input and output axes are the kernel's, each in the kernel's own order. A leading axis
    shared by A, B and the kernel is a stack of layers (``nn.scan``)."""
    weight = flat.get(module + ("embedding",), flat.get(module + ("kernel",)))
    if weight is None:
        raise ValueError(f"'{_module_name(module)}' has LoRA leaves but no kernel or embedding")
    if module + ("embedding",) in flat:
        return ("embed", None) if a.ndim == 2 else ("embed", a.shape[0])
    if factor_layout(a.shape, weight.shape) == BROADCAST:
        stacked = a.shape[0] if a.shape[0] == b.shape[0] == weight.shape[0] > 1 and weight.ndim > 2 else None
        return "einsum", stacked
    if a.ndim == b.ndim == 2:
        return "linear", None
    if a.ndim == weight.ndim == 4 and b.shape[:2] == (1, 1):
        return "conv", None
    if a.ndim == b.ndim == 3 and a.shape[0] == b.shape[0] == weight.shape[0]:
        return "linear", a.shape[0]
    raise ValueError(f"layer '{_module_name(module)}' (kernel {weight.shape}, lora_A {a.shape}) has no PEFT "
                     f"equivalent: Dense, DenseGeneral, Einsum, 2-D Conv and Embed layers export, stacked or not")


def _as_plain_lora(adapter: dict, config: LoraConfig) -> dict:
    """``adapter`` (flat) with each layer's factors and variant leaves replaced by the variant's plain
    LoRA form (PiSSA: twice the rank, as PEFT's own conversion writes it), lora_B rescaled so the
    config's scale at the new rank gives the same update."""
    variant = config.variant
    out = {k: v for k, v in adapter.items() if k[-1] not in variant.leaves}
    for module in sorted({k[:-1] for k in adapter if k[-1] == "lora_A"}):
        a, b = adapter[module + ("lora_A",)], adapter[module + ("lora_B",)]
        scale = config.scale_for(a.shape[-1])
        leaves = {leaf: adapter[module + (leaf,)] for leaf in variant.leaves}
        a_plain, b_plain = (np.asarray(v, np.float32) for v in variant.as_plain_lora(a, b, leaves, scale))
        out[module + ("lora_A",)] = a_plain
        out[module + ("lora_B",)] = b_plain * (scale / config.scale_for(a_plain.shape[-1]))
    return out


def torch_module_name(path: str, name_map: Mapping[str, str] | None = None, index: int | None = None) -> str:
    """The PyTorch module name of our module ``path`` ('encoder/layer/0/query' -> 'encoder.layer.0.query').

    ``name_map`` {regex: replacement}: the first regex that matches the whole path rewrites it
    (``re.sub``; '/' then becomes '.'). Layer ``index`` of a stacked (scanned) module goes where the
    replacement says ``{i}``, or by default after the path's first component ('blocks/q', 2 ->
    'blocks.2.q'); ``{i}`` in the replacement of a layer that is not stacked is an error.

    >>> torch_module_name("blocks_0/attn/q", {r"blocks_(\\d+)/(.*)": r"blocks.\\1.\\2"})
    'blocks.0.attn.q'
    >>> torch_module_name("blocks/q", index=2)
    'blocks.2.q'
    """
    return _mapped_name(path, name_map, index)[0]


def _mapped_name(path: str, name_map: Mapping[str, str] | None, index: int | None) -> tuple[str, str | None]:
    """(torch name of ``path``, the ``name_map`` pattern that produced it or None)."""
    for pattern, replacement in (name_map or {}).items():
        if re.fullmatch(pattern, path):
            name = re.sub(pattern, replacement, path)
            if index is not None and "{i}" not in replacement:
                raise ValueError(f"'{path}' is a stack of layers: its name_map entry {pattern!r} -> "
                                 f"{replacement!r} needs '{{i}}' where the layer index goes")
            if index is None and "{i}" in replacement:
                raise ValueError(f"name_map entry {pattern!r} -> {replacement!r} has '{{i}}', but '{path}' is not a "
                                 f"stack of layers (nn.scan): write its index into the replacement")
            return name.replace("{i}", str(index)).replace("/", "."), pattern
    parts = path.split("/")
    if index is not None:
        parts = parts[:1] + [str(index)] + parts[1:]
    return ".".join(parts), None


def _check_name_map(name_map: Any) -> dict[str, str]:
    """``name_map`` as a dict of compiled-checked {regex: replacement} (an error names a bad entry)."""
    if name_map is None:
        return {}
    if not isinstance(name_map, Mapping):
        raise TypeError(f"name_map must be a dict {{regex on our module path: torch module name}}, got "
                        f"{type(name_map).__name__}")
    for pattern, replacement in name_map.items():
        if not isinstance(pattern, str) or not isinstance(replacement, str):
            raise TypeError(f"name_map entry {pattern!r} -> {replacement!r}: both must be strings")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"name_map pattern {pattern!r} is not a valid regex ({err})") from None
    return dict(name_map)


def _check_flatten_order(flatten_order: Any) -> dict[str, dict[str, tuple[int, ...]]]:
    """``flatten_order`` as {pattern: {'in' / 'out': tuple of axes}} (an error names a bad entry)."""
    if flatten_order is None:
        return {}
    if not isinstance(flatten_order, Mapping):
        raise TypeError(f"flatten_order must be a dict {{layer pattern: {{'in': axes, 'out': axes}}}}, got "
                        f"{type(flatten_order).__name__}")
    checked = {}
    for pattern, orders in flatten_order.items():
        if not isinstance(pattern, str) or not isinstance(orders, Mapping) or not orders or set(orders) - {"in", "out"}:
            raise ValueError(f"flatten_order[{pattern!r}] must be a mapping with keys 'in' and/or 'out' "
                             f"(axis orders), got {orders!r}")
        entry = {}
        for side, order in orders.items():
            if isinstance(order, (str, bytes)) or not isinstance(order, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in order):
                raise ValueError(f"flatten_order[{pattern!r}][{side!r}] must be a list of axis numbers, got {order!r}")
            entry[side] = tuple(order)
        checked[pattern] = entry
    return checked


class _Usage:
    """Which ``name_map`` / ``flatten_order`` patterns matched a layer, and which layer each torch
    name came from: a pattern that matches nothing, or two layers given one name, is an error."""

    def __init__(self, name_map: Mapping[str, str], flatten_order: Mapping[str, Any]):
        self.name_map, self.flatten_order = name_map, flatten_order
        self.used: set[tuple[str, str]] = set()
        self.owner: dict[str, tuple[str, int | None]] = {}

    def name(self, path: str, index: int | None) -> str:
        name, pattern = _mapped_name(path, self.name_map, index)
        if pattern is not None:
            self.used.add(("name_map", pattern))
        first = self.owner.setdefault(name, (path, index))
        if first != (path, index):
            where = lambda p, i: f"'{p}'" + ("" if i is None else f" layer {i}")
            raise ValueError(f"name_map gives {where(*first)} and {where(path, index)} the same torch name '{name}': "
                             f"one would overwrite the other; make the replacements distinct")
        return name

    def orders(self, path: str) -> tuple[Any, Any]:
        for pattern, orders in self.flatten_order.items():
            if matches(pattern, path):
                self.used.add(("flatten_order", pattern))
                return orders.get("in"), orders.get("out")
        return None, None

    def check_all_used(self, what: str) -> None:
        unused = [f"{kind} {pattern!r}" for kind, table in (("name_map", self.name_map),
                                                             ("flatten_order", self.flatten_order))
                  for pattern in table if (kind, pattern) not in self.used]
        if unused:
            raise ValueError(f"{', '.join(unused)} match{'es' if len(unused) == 1 else ''} no layer {what}: a typo? "
                             f"(patterns match whole module paths such as 'encoder/layer/0/attention/self/query')")


def _factors_to_torch(name: str, layout: str, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """PEFT's tensors for one layer's factors: Linear lora_A (r, in) / lora_B (out, r), Conv2d
    (r, in, kh, kw) / (out, r, 1, 1), Embedding lora_embedding_A (r, vocab) / _B (features, r)."""
    rank = a.shape[-1]
    if layout == "embed":
        return {f"{name}.lora_embedding_A": a.T, f"{name}.lora_embedding_B": b.T}
    if layout == "conv":
        return {f"{name}.lora_A.weight": _torch_layout(a), f"{name}.lora_B.weight": _torch_layout(b)}
    b_flat = b.reshape(-1, rank).T if layout == "einsum" else b.reshape(rank, -1)  # einsum B keeps r last
    return {f"{name}.lora_A.weight": a.reshape(-1, rank).T, f"{name}.lora_B.weight": b_flat.T}


def _split_axes(kernel_shape: tuple[int, ...], n_in: int, path: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A Dense/DenseGeneral kernel's (input axes, output axes): the first axes whose sizes multiply to ``n_in``."""
    for k in range(1, len(kernel_shape)):
        if math.prod(kernel_shape[:k]) == n_in:
            return tuple(kernel_shape[:k]), tuple(kernel_shape[k:])
    raise ValueError(f"layer '{path}': kernel {kernel_shape} does not split into {n_in} inputs")


def _reorder(flat: np.ndarray, axes: tuple[int, ...], order: Any, rank_first: bool, inverse: bool, what: str) -> np.ndarray:
    """A factor's flattened non-rank axis viewed as ``axes`` and flattened again in ``order`` (a
    permutation of the axes; ``inverse``: back from that order to the kernel's)."""
    if order is None:
        return flat
    order = tuple(order)
    if sorted(order) != list(range(len(axes))):
        raise ValueError(f"{what}: flatten order {order} is not a permutation of the layer's {len(axes)} axes {axes}")
    rank = flat.shape[0] if rank_first else flat.shape[-1]
    shape = tuple(axes[i] for i in order) if inverse else axes
    perm = tuple(int(i) for i in (np.argsort(order) if inverse else order))
    if rank_first:
        return flat.reshape((rank,) + shape).transpose((0,) + tuple(1 + i for i in perm)).reshape(rank, -1)
    return flat.reshape(shape + (rank,)).transpose(perm + (len(perm),)).reshape(-1, rank)


def _torch_layout(value: np.ndarray) -> np.ndarray:
    """Our layout -> torch's: (in, out) -> (out, in); conv (kh, kw, in, out) -> (out, in, kh, kw)."""
    return value.T if value.ndim == 2 else np.transpose(value, (3, 2, 0, 1))


def _our_layout(value: np.ndarray) -> np.ndarray:
    """Inverse of ``_torch_layout``."""
    return value.T if value.ndim == 2 else np.transpose(value, (2, 3, 1, 0))


def _to_torch(leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """A modules_to_save leaf -> (torch parameter name, array in torch orientation)."""
    if leaf == "kernel":
        return "weight", _torch_layout(value)
    return {"embedding": "weight", "scale": "weight"}.get(leaf, leaf), value


def export_peft(directory: str | Path, params: Params, config: LoraConfig, base_model_name_or_path: str | None = None,
                task_type: str | None = None, *, name_map: Mapping[str, str] | None = None,
                flatten_order: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write ``params``' adapter as a PEFT LoRA folder that ``PeftModel.from_pretrained`` loads.

    ``params`` is the full LoRA param tree (the base leaves tell layer kinds apart); its paths must
    be the torch model's module paths (true for ``lora_jax.models``). ``task_type`` e.g. 'SEQ_CLS'.
    An NNX model with LoRA may stand for ``params``.

    Args:
      directory: the folder to write: new, empty, or a PEFT adapter folder, replaced as a whole
        atomically (``folder_swap``): a kill at any point leaves the old or the new adapter,
        never a mix. ``name_map`` and ``flatten_order`` are recorded beside PEFT's files
        (``lora_jax_export.json``, which PEFT ignores) and ``import_peft`` reads them back.
      params: the LoRA param tree (or NNX model); config: the adapter's config.
      base_model_name_or_path: recorded in adapter_config.json for ``PeftModel.from_pretrained``.
      name_map: {regex on our module path: torch module name}, for models whose flax names differ
        from the torch ones, and where a stacked (``nn.scan``) layer's index goes (``{i}``); see
        ``torch_module_name``. Stacked layers are written one torch module per layer.
      flatten_order: {layer pattern: {'in': axes, 'out': axes}} for DenseGeneral layers whose torch
        Linear orders its flattened inputs or outputs differently: by default the kernel's input
        axes, and its output axes, are each flattened in C order (a q kernel (dim, heads, head_dim)
        gives output ``h * head_dim + d``, as a torch Linear whose output is viewed as
        (heads, head_dim)); ``{'q': {'out': (1, 0)}}`` flattens as (head_dim, heads) instead.
        ``import_peft`` takes the same mapping.

    Returns:
      ``directory`` as a Path.

    >>> import tempfile, numpy as np
    >>> params = {"fc": {"kernel": np.zeros((4, 3), np.float32), "lora_A": np.ones((4, 2), np.float32),
    ...                  "lora_B": np.ones((2, 3), np.float32)}}
    >>> folder = export_peft(tempfile.mkdtemp(), params, LoraConfig(rank=2, targets=("fc",)))
    >>> adapter = import_peft(folder)
    >>> adapter.params["fc"]["lora_A"].shape, adapter.config.rank
    ((4, 2), 2)
    """
    if config.bias != "none":
        raise ValueError(f"export_peft supports bias='none' only, got bias={config.bias!r}")
    usage = _Usage(_check_name_map(name_map), _check_flatten_order(flatten_order))
    folder = folder_path(directory, "the PEFT adapter")
    flat = traverse_util.flatten_dict(dict(params))  # base leaves: only their shapes are read
    adapter = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(extract_adapter(params, config).params).items()}
    bad = nonfinite_leaves(traverse_util.unflatten_dict(adapter))
    if bad:
        raise ValueError(f"the adapter's leaves {bad[:5]} hold inf or NaN (training diverged?); nothing was exported")
    if config.variant.peft_config is None:
        adapter = _as_plain_lora(adapter, config)
    param_keys = target_keys(flat)
    param_modules = {factors_key(k) for k in param_keys}
    tensors, ranks, param_names = export_tensors(adapter, param_keys, config, lambda path: usage.name(path, None),
                                                 PREFIX)
    adapter = {k: v for k, v in adapter.items() if k[:-1] not in param_modules}
    for key, value in adapter.items():
        module, leaf = key[:-1], key[-1]
        path = "/".join(module)
        if leaf == "lora_A":
            a, b = value, adapter[module + ("lora_B",)]
            layout, stacked = _layout(flat, module, a, b)
            per_output = {leaf: adapter[module + (leaf,)] for leaf in PER_OUTPUT_LEAVES if module + (leaf,) in adapter}
            order_in, order_out = usage.orders(path)
            if (order_in, order_out) != (None, None) and layout != "linear":
                raise ValueError(f"flatten_order: layer '{path}' is a{'n' if layout[0] in 'ae' else ''} {layout} "
                                 f"layer; flatten orders apply to Dense / DenseGeneral layers")
            for index in (range(stacked) if stacked else (None,)):
                a_i, b_i = (a, b) if index is None else (a[index], b[index])
                if layout == "linear" and (order_in, order_out) != (None, None):
                    kernel = flat[module + ("kernel",)].shape[1 if index is not None else 0:]
                    ins, outs = _split_axes(tuple(kernel), a_i.shape[0], path)
                    a_i = _reorder(a_i, ins, order_in, False, False, f"layer '{path}' inputs")
                    b_i = _reorder(b_i, outs, order_out, True, False, f"layer '{path}' outputs")
                name = usage.name(path, index)
                ranks[name] = a_i.shape[-1]
                tensors.update(_factors_to_torch(PREFIX + name, layout, a_i, b_i))
                for leaf_name, magnitude in per_output.items():  # a variant's per-output leaf (DoRA's magnitude)
                    m = magnitude if index is None else magnitude[index]
                    if layout == "linear" and order_out is not None:
                        m = _reorder(m.reshape(1, -1), outs, order_out, True, False, f"layer '{path}' outputs")
                    n_out = m.shape[-1]
                    tensors[f"{PREFIX}{name}.{PER_OUTPUT_LEAVES[leaf_name]}"] = m.reshape(
                        (1, n_out, 1, 1) if layout == "conv" else (-1,))
        elif leaf != "lora_B" and leaf not in PER_OUTPUT_LEAVES:
            torch_leaf, converted = _to_torch(leaf, value)
            tensors[f"{PREFIX}{usage.name(path, None)}.{torch_leaf}"] = converted
    usage.check_all_used("of the adapter")
    plain = all(not t.startswith(REGEX_PREFIX) for t in config.targets + config.target_parameters) \
        and not config.exclude and not name_map
    adapter_config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "bias": "none",
        "use_rslora": config.rslora, "use_dora": False, **(config.variant.peft_config or {}), "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": [t.replace("/", ".") for t in config.targets] if plain else
        sorted(set(ranks) - set(param_names)),
        "target_parameters": ([t.replace("/", ".") for t in config.target_parameters] if plain else param_names)
        or None,
        "modules_to_save": [m.replace("/", ".") for m in config.modules_to_save] or None,
        "rank_pattern": {m: r for m, r in ranks.items() if r != config.rank}, "alpha_pattern": {},
    }
    layout_notes = {"format": EXPORT_NOTES_FORMAT, "name_map": usage.name_map,
                    "parameter_in_axis": {path_str(k): config.in_axis_for(path_str(k)) for k in param_keys},
                    "flatten_order": {p: {k: list(v) for k, v in o.items()} for p, o in usage.flatten_order.items()}}

    def write(tmp: Path) -> None:
        from safetensors.numpy import save_file

        tmp.mkdir()
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(adapter_config, indent=2))
        if usage.name_map or usage.flatten_order or layout_notes["parameter_in_axis"]:
            (tmp / EXPORT_NOTES).write_text(json.dumps(layout_notes, indent=2))
        _sync(tmp)

    return replace_folder(folder, write, _recognise_peft, "a PEFT adapter")


def _sync(folder: Path) -> None:
    """Flush ``folder``'s files to disk before it is swapped in."""
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _recognise_peft(folder: Path) -> str | None:
    """None if ``folder`` holds a PEFT LoRA adapter and nothing else (PEFT's README.md aside)."""
    present = sorted(p.name for p in folder.iterdir())
    if CONFIG not in present:
        return f"no {CONFIG}; it holds {present[:5]}"
    foreign = [name for name in present if name not in (CONFIG, WEIGHTS, EXPORT_NOTES, "README.md")]
    return f"it also holds {foreign[:5]}" if foreign else None


def _read_peft_config(directory: Path) -> dict:
    path = directory / "adapter_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory} has no adapter_config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object of PEFT settings")
    if data.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{directory} holds a PEFT {data.get('peft_type')} adapter; only LORA is supported")
    init = data.get("init_lora_weights")
    if isinstance(init, str) and init.split("_niter_")[0] in _BASE_CHANGING_INITS:
        raise ValueError(f"{directory} was saved with init_lora_weights={init!r}, which changes the base weights: its "
                         f"factors fit PEFT's residual base only. Save it from PEFT as plain LoRA "
                         f"(save_pretrained(..., path_initial_model_for_weight_conversion=...)) and import that")
    enabled = [flag for flag in _UNSUPPORTED_FLAGS if data.get(flag)]
    if enabled:
        raise ValueError(f"{directory}: PEFT option(s) {enabled} are not supported by lora_jax (DoRA is: use_dora)")
    for option in ("alpha_pattern", "layers_to_transform", "layer_replication"):
        if data.get(option):
            raise ValueError(f"{directory}: PEFT option {option}={data[option]!r} is not supported by lora_jax")
    if data.get("target_modules") is None and data.get("target_parameters"):
        data = {**data, "target_modules": []}  # PEFT allows parameters alone
    for field in ("r", "lora_alpha", "target_modules"):
        if data.get(field) is None:
            raise ValueError(f"{path} lacks the field {field!r}, which a PEFT LoRA adapter_config.json always has")
    for field, types, expected in _FIELD_TYPES:
        if data.get(field) is not None and not _is(data[field], types):
            raise ValueError(f"{path}: {field} is {data[field]!r} ({type(data[field]).__name__}); it must be {expected}")
    return data


# adapter_config.json fields and their JSON types (None / absent is always allowed)
_FIELD_TYPES = (
    ("use_rslora", (bool,), "true or false"), ("use_dora", (bool,), "true or false"),
    ("r", (int,), "an integer"), ("lora_alpha", (int, float), "a number"), ("lora_dropout", (int, float), "a number"),
    ("target_modules", (str, "list[str]"), "a regex string or a list of module names"),
    ("exclude_modules", (str, "list[str]"), "a regex string or a list of module names"),
    ("modules_to_save", ("list[str]",), "a list of module names"),
    ("target_parameters", ("list[str]",), "a list of parameter names"),
    ("rank_pattern", ("dict[str, int]",), "an object {module pattern: rank}"), ("bias", (str,), "a string"),
)


def _is(value: Any, types: tuple) -> bool:
    """Whether ``value`` has one of the JSON ``types`` (bool is not a number here)."""
    for kind in types:
        if kind == "list[str]" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return True
        if kind == "dict[str, int]" and isinstance(value, dict) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
            return True
        if isinstance(kind, type) and isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            return True
    return False


def _export_notes(directory: Path) -> dict:
    """``name_map`` / ``flatten_order`` that ``export_peft`` recorded in ``directory`` ({} if none)."""
    path = directory / EXPORT_NOTES
    if not path.exists():
        return {}
    try:
        notes = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(notes, dict) or notes.get("format") != EXPORT_NOTES_FORMAT:
        raise ValueError(f"{path} is not a lora_jax export record (delete it if the folder is a plain PEFT adapter)")
    in_axes = notes.get("parameter_in_axis") or {}
    if not isinstance(in_axes, dict) or any(not isinstance(k, str) or v not in (-2, -1) or isinstance(v, bool)
                                            for k, v in in_axes.items()):
        raise ValueError(f"{path}: parameter_in_axis must be an object {{param path: -2 or -1}}, got {in_axes!r}")
    return {"name_map": _check_name_map(notes.get("name_map")),
            "flatten_order": _check_flatten_order(notes.get("flatten_order")), "parameter_in_axis": in_axes}


def _config_from_peft(data: dict, path: Path) -> LoraConfig:
    targets = data.get("target_modules") or ()
    targets = (REGEX_PREFIX + targets,) if isinstance(targets, str) else tuple(targets)
    exclude = data.get("exclude_modules") or ()
    exclude = (REGEX_PREFIX + exclude,) if isinstance(exclude, str) else tuple(exclude)
    saved = tuple(dict.fromkeys(data.get("modules_to_save") or ()))
    try:
        return LoraConfig(rank=data["r"], alpha=data["lora_alpha"], targets=targets, exclude=exclude,
                          dropout=data.get("lora_dropout") or 0.0, rslora=bool(data.get("use_rslora")),
                          bias=data.get("bias", "none"), modules_to_save=saved,
                          rank_pattern=data.get("rank_pattern") or {}, use_dora=bool(data.get("use_dora")),
                          target_parameters=tuple(data.get("target_parameters") or ()))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err} (PEFT names: r, lora_alpha, lora_dropout, target_modules, rank_pattern)") \
            from None


def _check_lora_shapes(out: dict, config: LoraConfig, weights: Path) -> None:
    """Each layer has both factors, A (.., r) and B of rank r matching the config's rank for it."""
    modules = sorted({k[:-1] for k in out if k[-1] in ("lora_A", "lora_B")})
    for module in modules:
        if param_path_of(module) is not None:
            continue  # a parameter target's factors: read and checked by peft_param_targets
        name = ".".join(module)
        a, b = out.get(module + ("lora_A",)), out.get(module + ("lora_B",))
        if a is None or b is None:
            raise ValueError(f"{weights}: layer '{name}' has only one of lora_A / lora_B")
        rank = config.rank_for("/".join(module))
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError(f"{weights}: layer '{name}' has lora_A / lora_B of {a.ndim} and {b.ndim} dimensions")
        b_rank = b.shape[-1] if a.ndim == b.ndim and b.shape[-1] == a.shape[-1] else b.shape[-2]  # einsum: r last
        if a.shape[-1] != rank or b_rank != rank:  # ours: A (..., r), B (r, out), conv (1, 1, r, out), einsum (..., r)
            raise ValueError(f"{weights}: layer '{name}' has factors of rank {a.shape[-1]} (lora_A) and {b_rank} "
                             f"(lora_B), but adapter_config.json gives it rank {rank}")


def import_peft(directory: str | Path, base_params: Params | None = None, *,
                name_map: Mapping[str, str] | None = None,
                flatten_order: Mapping[str, Mapping[str, Any]] | None = None,
                parameter_in_axis: Mapping[str, int] | None = None) -> Adapter:
    """Read a PEFT LoRA folder (ours or PEFT's own) into an Adapter (params in our layout + LoraConfig).

    ``base_params`` (the model's param tree) resolves modules_to_save leaves exactly (kernel vs
    embedding vs LayerNorm scale), maps torch module names to ours (``name_map`` as for
    ``export_peft``), restacks per-layer modules of a scanned stack and reshapes DenseGeneral and
    Einsum factors into their layouts (Einsum needs the LoRA model's params, e.g. from
    ``init_lora_params``, whose lora_A / lora_B give the layout; ``flatten_order`` as for
    ``export_peft``; both default to what the export recorded in the folder). Without it, names are read as ours
    with '.' for '/', 2-D ``weight`` as a Dense kernel and 1-D as a LayerNorm scale. Modules the
    model does not have are named in the error of ``apply_adapter``.

    ``target_parameters`` (PEFT's LoRA on raw params, e.g. experts) need ``base_params``: each
    targeted param's layout ((E, in, out) or (E, out, in)) is read off its shape, or from
    ``parameter_in_axis`` {param path: -2 | -1} (needed for a square param) or the export's record.
    """
    directory = folder_path(directory, "the PEFT adapter")
    if not directory.exists() and directory.parent.is_dir():
        with locked(directory.parent):
            recover_folder(directory, _recognise_peft)  # an export killed between its renames
    data = _read_peft_config(directory)
    config = _config_from_peft(data, directory / CONFIG)
    weights = directory / WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"{directory} has no {WEIGHTS}")
    notes = _export_notes(directory)
    name_map = _agreed(_check_name_map(name_map), notes.get("name_map"), "name_map", directory)
    flatten_order = _agreed(_check_flatten_order(flatten_order), notes.get("flatten_order"), "flatten_order", directory)
    flat_base = traverse_util.flatten_dict(dict(base_params)) if base_params is not None else None
    out: dict[tuple[str, ...], np.ndarray] = {}
    tensors = read_safetensors(weights)
    if config.target_parameters:
        if flat_base is None:
            raise ValueError(f"{directory} adapts parameters (target_parameters {list(config.target_parameters)}): "
                             f"import_peft needs base_params to find them and their layouts")
        in_axes = {**notes.get("parameter_in_axis", {}), **dict(parameter_in_axis or {})}
        tensors, out, config = _read_parameter_targets(tensors, config, flat_base, _Usage(name_map, {}), in_axes,
                                                       weights)
    for name, value in tensors.items():
        if not name.startswith(PREFIX):
            raise ValueError(f"unexpected key {name!r} in {weights} (expected the '{PREFIX}' prefix)")
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise ValueError(f"{weights}: tensor {name!r} holds inf or NaN; the adapter would output NaN")
        try:
            key, converted = _read_tensor(name[len(PREFIX):].split("."), value, flat_base)
        except ValueError as err:
            raise ValueError(f"{weights}: tensor {name!r} of shape {value.shape}: {err}") from None
        out[key] = converted
    if flat_base is not None:
        usage = _Usage(name_map, flatten_order)
        out, config = _to_our_modules(out, config, flat_base, usage, weights)
        usage.check_all_used("of base_params")
    elif flatten_order or name_map:
        raise ValueError(f"import_peft: {'flatten_order' if flatten_order else 'name_map'} needs base_params (its "
                         f"module paths and kernels give each layer's name and axes)")
    _check_lora_shapes(out, config, weights)
    params = traverse_util.unflatten_dict({k: np.asarray(v) for k, v in out.items()})
    check_targets_cover(params, config, source=str(directory))
    if base_params is not None:
        check_adapter_fits(base_params, params)
    meta = {"peft_task_type": data.get("task_type"), "base_model": data.get("base_model_name_or_path"),
            "source": str(directory)}
    return Adapter(params, config, meta)


def _read_parameter_targets(tensors: dict, config: LoraConfig, flat_base: dict, usage: _Usage,
                            in_axes: Mapping[str, int], weights: Path) -> tuple[dict, dict, LoraConfig]:
    """(the tensors left, our factors of the parameter targets, the config with those targets as
    our param paths, innermost wrapper first, and their input axes)."""
    out, axes, used, order = {}, {}, set(), []
    for owner, keys in targeted_by_owner(flat_base, config, lambda path: usage.name(path, None)).items():
        try:
            assigned = assign_pairs(keys, wrapped_pairs(tensors, owner, PREFIX), tensors, flat_base, in_axes)
        except ValueError as err:
            raise ValueError(f"{weights}: module '{owner}': {err}") from None
        for key, (a_name, b_name, (a, b), axis) in assigned.items():
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise ValueError(f"{weights}: the factors of parameter '{path_str(key)}' hold inf or NaN")
            out[factors_key(key) + ("lora_A",)], out[factors_key(key) + ("lora_B",)] = a, b
            axes[path_str(key)] = axis
            used.update((a_name, b_name))
            order.append(key)
    if not out:
        raise ValueError(f"{weights}: no tensor of the target_parameters {list(config.target_parameters)} fits a param "
                         f"of base_params")
    rest = {name: value for name, value in tensors.items() if name not in used}
    config = config.replace(target_parameters=tuple(path_str(k) for k in order),
                            parameter_in_axis={w: axis for w, axis in axes.items() if axis != -2},
                            rank_pattern=_param_ranks(config, order, out))
    return rest, out, config


def _param_ranks(config: LoraConfig, keys: list, out: dict) -> dict[str, int]:
    """The config's rank_pattern with each parameter target's own rank where it differs."""
    pattern = dict(config.rank_pattern)
    for key in keys:
        rank = out[factors_key(key) + ("lora_A",)].shape[-1]
        if rank != config.rank:
            pattern["re:" + re.escape(path_str(key))] = rank
    return pattern


def _agreed(given: dict, recorded: dict | None, what: str, directory: Path) -> dict:
    """The ``name_map`` / ``flatten_order`` to import with: the one given, else the one the export
    recorded; both, and different, is an error (one of them describes another model)."""
    if recorded and given and given != recorded:
        raise ValueError(f"import_peft: the {what} given ({given}) differs from the one {directory} was exported "
                         f"with ({recorded}, in {EXPORT_NOTES}); leave it out to use the recorded one")
    return given or recorded or {}


def _read_tensor(parts: list[str], value: np.ndarray, flat_base: dict | None) -> tuple[tuple[str, ...], np.ndarray]:
    """A PEFT tensor's (our key with the torch module path, the array in our layout); a tensor of a
    shape its kind never has is a ValueError."""
    if parts[-2:] in (["lora_A", "weight"], ["lora_B", "weight"]) or parts[-1] in ("lora_embedding_A",
                                                                                    "lora_embedding_B"):
        if value.ndim not in (2, 4):
            raise ValueError(f"a LoRA factor is 2-D (Linear, Embedding) or 4-D (Conv2d), this one is {value.ndim}-D")
        leaf = parts[-2] if parts[-1] == "weight" else "lora_" + parts[-1][-1]
        return tuple(parts[:-2] if parts[-1] == "weight" else parts[:-1]) + (leaf,), _our_layout(value)
    ours = {peft_name: leaf for leaf, peft_name in PER_OUTPUT_LEAVES.items()}
    if parts[-1] in ours:  # a variant's per-output leaf (DoRA's lora_magnitude_vector)
        if value.ndim not in (1, 4) or (value.ndim == 4 and (value.shape[0], *value.shape[2:]) != (1, 1, 1)):
            raise ValueError(f"a per-output {parts[-1]} is (out,) or, for Conv2d, (1, out, 1, 1)")
        n_out = value.shape[1] if value.ndim == 4 else value.shape[-1]
        return tuple(parts[:-1]) + (ours[parts[-1]],), value.reshape((1, 1, 1, n_out) if value.ndim == 4 else (1, n_out))
    module = tuple(parts[:-1])
    leaf = _our_leaf(module, parts[-1], value, flat_base)
    if leaf == "kernel" and value.ndim not in (2, 4):
        raise ValueError(f"a saved module's weight read as a kernel is 2-D or 4-D, this one is {value.ndim}-D")
    return module + (leaf,), _our_layout(value) if leaf == "kernel" else value


def _to_our_modules(out: dict, config: LoraConfig, flat_base: dict, usage: _Usage, weights: Path):
    """Torch-named factors -> ours, through the names ``export_peft`` would give each layer of the
    model: per-layer modules of a stack are stacked again, Linear factors take the layer's layout."""
    names: dict[str, tuple[tuple[str, ...], int | None, str | None]] = {}
    for key, weight in flat_base.items():
        if key[-1] not in BASE_LEAVES:
            continue
        module = key[:-1]
        a = flat_base.get(module + ("lora_A",))
        layout, stacked = None, None
        if a is not None:
            b = flat_base[module + ("lora_B",)]
            layout, stacked = _layout(flat_base, module, np.zeros(a.shape), np.zeros(b.shape))
        for index in (range(stacked) if stacked else (None,)):
            names[usage.name("/".join(module), index)] = (module, index, layout)
    result: dict[tuple[str, ...], Any] = {}
    stacks: dict[tuple[str, ...], dict[int, Any]] = {}
    for key, value in out.items():
        torch_name, leaf = ".".join(key[:-1]), key[-1]
        if torch_name not in names:
            result[key] = value
            continue
        module, index, layout = names[torch_name]
        if (leaf in ("lora_A", "lora_B") or leaf in PER_OUTPUT_LEAVES) and layout is not None and \
                module + (leaf,) in flat_base:
            like = tuple(flat_base[module + (leaf,)].shape)
            like = like[1:] if index is not None else like
            order_in, order_out = usage.orders("/".join(module))
            try:
                if layout == "linear" and (order_in, order_out) != (None, None) and module + ("kernel",) in flat_base:
                    kernel = tuple(flat_base[module + ("kernel",)].shape)[1 if index is not None else 0:]
                    value = _from_torch_order(value, leaf, kernel, order_in, order_out, "/".join(module))
                value = _into_layout(value, leaf, layout, like)
            except ValueError as err:
                raise ValueError(f"{weights}: the {leaf} of '{torch_name}' (shape {value.shape} in our layout) does "
                                 f"not fit layer '{'/'.join(module)}' (its {leaf} is {like}): {err}") from None
        if index is None:
            result[module + (leaf,)] = value
        else:
            stacks.setdefault(module + (leaf,), {})[index] = value
    for key, layers in stacks.items():
        result[key] = np.stack([layers[i] for i in sorted(layers)])
    by_torch = {name: "/".join(module) for name, (module, _, _) in names.items()}
    targets = tuple(dict.fromkeys(by_torch.get(t.replace("/", "."), t) for t in config.targets))
    return result, config.replace(targets=targets)


def _from_torch_order(value: np.ndarray, leaf: str, kernel: tuple[int, ...], order_in: Any, order_out: Any,
                      path: str) -> np.ndarray:
    """A Linear factor as read from PEFT (A (in, r), B (r, out), magnitude (1, out)), its flattened
    axes put back from ``flatten_order``'s order into the kernel's."""
    n_in = value.shape[0] if leaf == "lora_A" else math.prod(kernel) // value.shape[-1]
    ins, outs = _split_axes(tuple(kernel), n_in, path)
    if leaf == "lora_A":
        return _reorder(value, ins, order_in, False, True, f"layer '{path}' inputs")
    flat = value.reshape(1, -1) if leaf in PER_OUTPUT_LEAVES else value
    return _reorder(flat, outs, order_out, True, True, f"layer '{path}' outputs").reshape(value.shape)


def _into_layout(value: np.ndarray, leaf: str, layout: str, like: tuple[int, ...]) -> np.ndarray:
    """A factor as read from PEFT (Linear: A (in, r), B (r, out)) in the ``layout`` of our leaf shaped
    ``like`` (one layer's shape; the rank may differ from ``like``'s)."""
    if leaf in PER_OUTPUT_LEAVES:
        return value.reshape(like)
    if leaf == "lora_A":
        return value.reshape(like[:-1] + (value.shape[-1],))
    if layout == "einsum":  # B keeps the rank last: (r, out) -> (out, r) -> kernel shape with in axes 1, r
        return value.T.reshape(like[:-1] + (value.shape[0],))
    rank = value.shape[-2]
    return value.reshape(like[:-2] + (rank, like[-1]))


def _our_leaf(module, torch_leaf, value, flat_base) -> str:
    """Our name for a modules_to_save leaf stored under a torch name ('weight' is ambiguous)."""
    if torch_leaf != "weight":
        return torch_leaf
    if flat_base is not None:
        for leaf in ("kernel", "embedding", "scale"):
            if module + (leaf,) in flat_base:
                return leaf
    return "kernel" if value.ndim >= 2 else "scale"
