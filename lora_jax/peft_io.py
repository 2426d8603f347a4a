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
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from .adapters import Adapter, check_adapter_fits, check_targets_cover, extract_adapter
from .config import LoraConfig
from .nnx_trees import as_param_tree
from .safetensors_io import read_safetensors
from .targets import REGEX_PREFIX, matches

Params = Mapping[str, Any]
PREFIX = "base_model.model."
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
    if a.ndim == weight.ndim + 1:
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


def torch_module_name(path: str, name_map: Mapping[str, str] | None = None, index: int | None = None) -> str:
    """The PyTorch module name of our module ``path`` ('encoder/layer/0/query' -> 'encoder.layer.0.query').

    ``name_map`` {regex: replacement}: the first regex that matches the whole path rewrites it
    (``re.sub``; '/' then becomes '.'). Layer ``index`` of a stacked (scanned) module goes where the
    replacement says ``{i}``, or by default after the path's first component ('blocks/q', 2 ->
    'blocks.2.q').

    >>> torch_module_name("blocks_0/attn/q", {r"blocks_(\\d+)/(.*)": r"blocks.\\1.\\2"})
    'blocks.0.attn.q'
    >>> torch_module_name("blocks/q", index=2)
    'blocks.2.q'
    """
    for pattern, replacement in (name_map or {}).items():
        if re.fullmatch(pattern, path):
            name = re.sub(pattern, replacement, path)
            if index is not None:
                if "{i}" not in replacement:
                    raise ValueError(f"'{path}' is a stack of layers: its name_map entry {pattern!r} -> "
                                     f"{replacement!r} needs '{{i}}' where the layer index goes")
                name = name.replace("{i}", str(index))
            return name.replace("/", ".")
    parts = path.split("/")
    if index is not None:
        parts = parts[:1] + [str(index)] + parts[1:]
    return ".".join(parts)


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


def _axis_orders(path: str, flatten_order: Mapping[str, Mapping[str, Any]] | None) -> tuple[Any, Any]:
    """The ('in', 'out') axis orders ``flatten_order`` gives the layer at ``path`` (None: the kernel's own)."""
    for pattern, orders in (flatten_order or {}).items():
        if matches(pattern, path):
            if not isinstance(orders, Mapping) or set(orders) - {"in", "out"}:
                raise ValueError(f"flatten_order[{pattern!r}] must be a mapping with keys 'in' and/or 'out' "
                                 f"(axis orders), got {orders!r}")
            return orders.get("in"), orders.get("out")
    return None, None


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
      directory: the folder to write (created; its two files are replaced atomically).
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
    from safetensors.numpy import save_file

    if config.bias != "none":
        raise ValueError(f"export_peft supports bias='none' only, got bias={config.bias!r}")
    params = as_param_tree(params)  # an NNX model: its params as a nested dict
    flat = traverse_util.flatten_dict(dict(params))  # base leaves: only their shapes are read
    adapter = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(extract_adapter(params, config).params).items()}
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    for key, value in adapter.items():
        module, leaf = key[:-1], key[-1]
        path = "/".join(module)
        if leaf == "lora_A":
            a, b = value, adapter[module + ("lora_B",)]
            layout, stacked = _layout(flat, module, a, b)
            magnitude = adapter.get(module + ("lora_magnitude",))
            order_in, order_out = _axis_orders(path, flatten_order)
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
                name = torch_module_name(path, name_map, index)
                ranks[name] = a_i.shape[-1]
                tensors.update(_factors_to_torch(PREFIX + name, layout, a_i, b_i))
                if magnitude is not None:
                    m = magnitude if index is None else magnitude[index]
                    if layout == "linear" and order_out is not None:
                        m = _reorder(m.reshape(1, -1), outs, order_out, True, False, f"layer '{path}' outputs")
                    n_out = m.shape[-1]
                    tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = m.reshape(
                        (1, n_out, 1, 1) if layout == "conv" else (-1,))
        elif leaf not in ("lora_B", "lora_magnitude"):
            torch_leaf, converted = _to_torch(leaf, value)
            tensors[f"{PREFIX}{torch_module_name(path, name_map)}.{torch_leaf}"] = converted
    plain = all(not t.startswith(REGEX_PREFIX) for t in config.targets) and not config.exclude and not name_map
    adapter_config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "bias": "none",
        "use_rslora": config.rslora, "use_dora": config.use_dora, "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": [t.replace("/", ".") for t in config.targets] if plain else sorted(ranks),
        "modules_to_save": [m.replace("/", ".") for m in config.modules_to_save] or None,
        "rank_pattern": {m: r for m, r in ranks.items() if r != config.rank}, "alpha_pattern": {},
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".adapter_model.safetensors.tmp-{uuid.uuid4().hex[:8]}"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, directory / "adapter_model.safetensors")
    tmp_config = directory / f".adapter_config.json.tmp-{uuid.uuid4().hex[:8]}"
    tmp_config.write_text(json.dumps(adapter_config, indent=2))
    os.replace(tmp_config, directory / "adapter_config.json")
    return directory


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
    enabled = [flag for flag in _UNSUPPORTED_FLAGS if data.get(flag)]
    if enabled:
        raise ValueError(f"{directory}: PEFT option(s) {enabled} (e.g. DoRA) are not supported by lora_jax")
    for option in ("alpha_pattern", "layers_to_transform", "layer_replication", "target_parameters"):
        if data.get(option):
            raise ValueError(f"{directory}: PEFT option {option}={data[option]!r} is not supported by lora_jax")
    for field in ("r", "lora_alpha", "target_modules"):
        if data.get(field) is None:
            raise ValueError(f"{path} lacks the field {field!r}, which a PEFT LoRA adapter_config.json always has")
    return data


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
                          rank_pattern=data.get("rank_pattern") or {}, use_dora=bool(data.get("use_dora")))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err} (PEFT names: r, lora_alpha, lora_dropout, target_modules, rank_pattern)") \
            from None


def _check_lora_shapes(out: dict, config: LoraConfig, weights: Path) -> None:
    """Each layer has both factors, A (.., r) and B of rank r matching the config's rank for it."""
    modules = sorted({k[:-1] for k in out if k[-1] in ("lora_A", "lora_B")})
    for module in modules:
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
                flatten_order: Mapping[str, Mapping[str, Any]] | None = None) -> Adapter:
    """Read a PEFT LoRA folder (ours or PEFT's own) into an Adapter (params in our layout + LoraConfig).

    ``base_params`` (the model's param tree) resolves modules_to_save leaves exactly (kernel vs
    embedding vs LayerNorm scale), maps torch module names to ours (``name_map`` as for
    ``export_peft``), restacks per-layer modules of a scanned stack and reshapes DenseGeneral and
    Einsum factors into their layouts (Einsum needs the LoRA model's params, e.g. from
    ``init_lora_params``, whose lora_A / lora_B give the layout; ``flatten_order`` as for
    ``export_peft``). Without it, names are read as ours
    with '.' for '/', 2-D ``weight`` as a Dense kernel and 1-D as a LayerNorm scale. Modules the
    model does not have are named in the error of ``apply_adapter``.
    """
    directory = Path(directory)
    data = _read_peft_config(directory)
    config = _config_from_peft(data, directory / "adapter_config.json")
    weights = directory / "adapter_model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{directory} has no adapter_model.safetensors")
    flat_base = traverse_util.flatten_dict(dict(base_params)) if base_params is not None else None
    out: dict[tuple[str, ...], np.ndarray] = {}
    for name, value in read_safetensors(weights).items():
        if not name.startswith(PREFIX):
            raise ValueError(f"unexpected key {name!r} in {weights} (expected the '{PREFIX}' prefix)")
        parts = name[len(PREFIX):].split(".")
        if parts[-2:] in (["lora_A", "weight"], ["lora_B", "weight"]):
            out[tuple(parts[:-2]) + (parts[-2],)] = _our_layout(value)
        elif parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
            out[tuple(parts[:-1]) + ("lora_" + parts[-1][-1],)] = _our_layout(value)
        elif parts[-1] == "lora_magnitude_vector":
            n_out = value.shape[1] if value.ndim == 4 else value.shape[-1]
            out[tuple(parts[:-1]) + ("lora_magnitude",)] = value.reshape((1, 1, 1, n_out) if value.ndim == 4 else (1, n_out))
        else:
            module = tuple(parts[:-1])
            leaf = _our_leaf(module, parts[-1], value, flat_base)
            out[module + (leaf,)] = _our_layout(value) if leaf == "kernel" else value
    if flat_base is not None:
        out, config = _to_our_modules(out, config, flat_base, name_map, flatten_order)
    elif flatten_order:
        raise ValueError("import_peft: flatten_order needs base_params (the kernels give each layer's axes)")
    _check_lora_shapes(out, config, weights)
    params = traverse_util.unflatten_dict({k: np.asarray(v) for k, v in out.items()})
    check_targets_cover(params, config, source=str(directory))
    if base_params is not None:
        check_adapter_fits(base_params, params)
    meta = {"peft_task_type": data.get("task_type"), "base_model": data.get("base_model_name_or_path"),
            "source": str(directory)}
    return Adapter(params, config, meta)


def _to_our_modules(out: dict, config: LoraConfig, flat_base: dict, name_map: Mapping[str, str] | None,
                    flatten_order: Mapping[str, Mapping[str, Any]] | None = None):
    """Torch-named factors -> ours, through the names ``export_peft`` would give each layer of the
    model: per-layer modules of a stack are stacked again, Linear factors take the layer's layout."""
    names: dict[str, tuple[tuple[str, ...], int | None, str | None]] = {}
    for key, weight in flat_base.items():
        if key[-1] not in ("kernel", "embedding"):
            continue
        module = key[:-1]
        a = flat_base.get(module + ("lora_A",))
        layout, stacked = None, None
        if a is not None:
            b = flat_base[module + ("lora_B",)]
            layout, stacked = _layout(flat_base, module, np.zeros(a.shape), np.zeros(b.shape))
        for index in (range(stacked) if stacked else (None,)):
            names[torch_module_name("/".join(module), name_map, index)] = (module, index, layout)
    result: dict[tuple[str, ...], Any] = {}
    stacks: dict[tuple[str, ...], dict[int, Any]] = {}
    for key, value in out.items():
        torch_name, leaf = ".".join(key[:-1]), key[-1]
        if torch_name not in names:
            result[key] = value
            continue
        module, index, layout = names[torch_name]
        if leaf in ("lora_A", "lora_B", "lora_magnitude") and layout is not None and module + (leaf,) in flat_base:
            like = tuple(flat_base[module + (leaf,)].shape)
            like = like[1:] if index is not None else like
            order_in, order_out = _axis_orders("/".join(module), flatten_order)
            if layout == "linear" and (order_in, order_out) != (None, None) and module + ("kernel",) in flat_base:
                kernel = tuple(flat_base[module + ("kernel",)].shape)[1 if index is not None else 0:]
                value = _from_torch_order(value, leaf, kernel, order_in, order_out, "/".join(module))
            value = _into_layout(value, leaf, layout, like)
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
    flat = value.reshape(1, -1) if leaf == "lora_magnitude" else value
    return _reorder(flat, outs, order_out, True, True, f"layer '{path}' outputs").reshape(value.shape)


def _into_layout(value: np.ndarray, leaf: str, layout: str, like: tuple[int, ...]) -> np.ndarray:
    """A factor as read from PEFT (Linear: A (in, r), B (r, out)) in the ``layout`` of our leaf shaped
    ``like`` (one layer's shape; the rank may differ from ``like``'s)."""
    if leaf == "lora_magnitude":
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
