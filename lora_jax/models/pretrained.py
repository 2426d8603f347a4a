"""``from_pretrained``: Hugging Face BERT/RoBERTa checkpoints into the Flax models, torch-free.

Weights come from ``model.safetensors`` (also sharded) or ``pytorch_model.bin``; names are mapped
to our tree (Linear weights transposed), and missing / unexpected keys are reported as
transformers does: a new task head is expected, any other missing weight is an error unless
``strict=False``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from .bert import HEAD_MODULES, TASK_MODELS, BertConfig
from .hub import resolve_model_dir
from ..config import LoraConfig
from ..quantize import KernelQuantizer
from ..safetensors_io import adopt, open_safetensors, release_freed_memory
from .torch_pickle import load_torch_bin

log = logging.getLogger(__name__)

_IGNORED_SUFFIXES = ("position_ids",)  # buffers, not weights


class Pretrained(NamedTuple):
    """What ``from_pretrained`` returns: ``model, params, tokenizer = from_pretrained(...)``."""

    model: Any
    params: dict
    tokenizer: Any


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None


def read_config(model_dir: Path, **overrides: Any) -> BertConfig:
    """The model's ``config.json`` as a BertConfig; implausible sizes are refused before anything is allocated."""
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    data = _read_json(config_path)
    if not isinstance(data, dict):
        raise ValueError(f"{config_path} holds a JSON {type(data).__name__}, not an object of model settings")
    try:
        config = BertConfig.from_dict(data, **overrides)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: {err}") from None
    need = 4 * config.param_count()
    if need > _memory_bytes():
        raise ValueError(f"{config_path} describes a model of {config.param_count():,} parameters ({need:,} bytes in "
                         f"float32), more than this machine's memory: check its sizes (vocab_size "
                         f"{config.vocab_size}, hidden_size {config.hidden_size}, num_hidden_layers "
                         f"{config.num_hidden_layers}, intermediate_size {config.intermediate_size}, "
                         f"max_position_embeddings {config.max_position_embeddings})")
    return config


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def read_state_dict(model_dir: Path) -> Mapping[str, np.ndarray]:
    """Every tensor of a checkpoint folder, keyed by its PyTorch name: a lazy Mapping over safetensors
    (one file, or shards with an index; each tensor read from the file when looked up),
    else the arrays of ``pytorch_model.bin`` (read whole, by a restricted reader: ``load_torch_bin``).

    Safetensors are preferred whenever present; ``pytorch_model.bin`` is read only when no
    safetensors file exists.
    """
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.exists():
        return open_safetensors(single)
    if index.exists():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index} has no valid 'weight_map' {{tensor name: shard file}}")
        shards = []
        for shard in sorted(set(weight_map.values())):
            shard_path = (model_dir / shard).resolve()
            if shard_path.parent != model_dir.resolve():
                raise ValueError(f"{index} names shard {shard!r} outside the model folder")
            shards.append(shard_path)
        return open_safetensors(*shards)
    if (model_dir / "pytorch_model.bin").exists():
        return load_torch_bin(model_dir / "pytorch_model.bin")
    raise FileNotFoundError(f"{model_dir} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def hf_key(path: tuple[str, ...], leaf: str) -> str:
    """Our leaf path -> the PyTorch state-dict name (LayerNorm scale -> weight, kernel -> weight)."""
    name = "weight" if leaf in ("kernel", "scale", "embedding") else leaf
    return ".".join(path + (name,))


def _candidates(key: str) -> list[str]:
    """Alternative spellings of a name in older checkpoints (LayerNorm gamma/beta)."""
    if ".LayerNorm." in key:
        return [key, key.replace(".weight", ".gamma").replace(".bias", ".beta")]
    return [key]


def _to_leaf(array: np.ndarray, leaf: str) -> np.ndarray:
    return array.T if leaf == "kernel" else array


def checkpoint_names(keys: list[tuple[str, ...]], state: Mapping[str, np.ndarray], config: BertConfig,
                     task: str) -> dict[tuple[str, ...], tuple[str, str | None]]:
    """For each leaf key of our tree: (the PyTorch name it has in a checkpoint, the name under which
    ``state`` holds it, or None where it is absent). Reads no tensor."""
    backbone = "roberta" if config.model_type == "roberta" else "bert"
    ckpt_prefix = backbone + "." if any(k.startswith(backbone + ".") for k in state) else ""
    out = {}
    for key in keys:
        module, leaf = key[:-1], key[-1]
        if task != "base" and module[0] == backbone:
            name = ckpt_prefix + hf_key(module[1:], leaf)
        elif task == "base":
            name = ckpt_prefix + hf_key(module, leaf)
        else:
            name = hf_key(module, leaf)
        out[key] = (name, next((c for c in _candidates(name) if c in state), None))
    return out


def load_weights(params: dict, state: Mapping[str, np.ndarray], config: BertConfig, task: str,
                 strict: bool = True, convert: Callable[[tuple[str, ...], jax.Array], Any] | None = None,
                 ) -> tuple[dict, dict[str, list[str]]]:
    """Fill ``params`` (a freshly initialised tree, or its ``jax.eval_shape``) from a PyTorch state dict.

    Tensors are read one at a time, in our tree's order, and each is handed to ``convert(key, leaf)``
    (e.g. ``lora_jax.KernelQuantizer``) before the next is read. Leaves the checkpoint lacks keep
    their value in ``params``.

    Returns the new params and a report {'missing', 'unexpected', 'new_head'} of key names.
    """
    heads = HEAD_MODULES[task]
    flat = traverse_util.flatten_dict(params)
    used: set[str] = set()
    missing, new_head = [], []
    for key, (name, found) in checkpoint_names(list(flat), state, config, task).items():
        value = flat[key]
        module, leaf = key[:-1], key[-1]
        if found is None:
            (new_head if module[0] in heads else missing).append(name)
            continue
        array = _to_leaf(state[found], leaf)
        if array.shape != value.shape:
            raise ValueError(f"checkpoint weight '{found}' has shape {tuple(state[found].shape)}, which does not "
                             f"fit our leaf '{'/'.join(key)}' of shape {tuple(value.shape)} (as stored: "
                             f"{tuple(_to_leaf(np.empty(value.shape), leaf).shape)})")
        leaf_value = adopt(array, value.dtype)  # no second host copy of a tensor already in its layout
        del array  # before converting: a quantized kernel's float copy is then the leaf's alone
        if convert is not None:
            converted = convert(key, leaf_value)
            if converted is not leaf_value:  # a kernel quantized: its float copy is gone, give the space back
                del leaf_value
                release_freed_memory()
            leaf_value = converted
        flat[key] = leaf_value
        used.add(found)
    unexpected = sorted(k for k in state if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    report = {"missing": sorted(missing), "unexpected": unexpected, "new_head": sorted(new_head)}
    if missing and strict:
        raise ValueError(f"checkpoint lacks {len(missing)} weight(s) of the model: {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}; pass strict=False to initialise them randomly")
    if missing:
        log.warning("newly initialised (not in checkpoint): %s", missing)
    if new_head:
        log.info("newly initialised task head: %s", new_head)
    if unexpected:
        log.warning("checkpoint weights not used by this model: %s", unexpected[:20])
    return traverse_util.unflatten_dict(flat), report


def from_pretrained(name_or_path: str | Path, task: str = "sequence_classification", num_labels: int | None = None,
                    *, rng: jax.Array | None = None, strict: bool = True, with_tokenizer: bool = True,
                    quantize: Literal["int8", "nf4"] | None = None, quantize_config: Any = None,
                    quantize_layers: Literal["targets", "all"] = "all", **config_overrides: Any) -> Pretrained:
    """Load a Hugging Face BERT/RoBERTa checkpoint into our Flax model.

    The param tree is built leaf by leaf from the checkpoint (safetensors are read tensor by tensor);
    only the leaves the checkpoint lacks (a new task head) are
    initialised. With ``quantize``, each selected kernel is quantized as soon as it is read, so the
    float32 tree never exists in memory: the result is ``lora_jax.quantize(params, ...)`` of the
    float load, without its peak.

    Args:
      name_or_path: a local folder, a Hub id (e.g. 'bert-base-uncased'), or 'packaged:minilm'. Weights
        come from safetensors whenever the folder has them; ``pytorch_model.bin`` only otherwise.
      task: 'base' (encoder + pooler), 'sequence_classification', 'token_classification',
        'question_answering'.
      num_labels: labels of a classification head (its weights are new unless the checkpoint has them).
      rng: key for the newly initialised head (default: key 0).
      strict: a missing non-head weight is an error (True) or random-initialised with a warning.
      with_tokenizer: also load ``transformers.AutoTokenizer`` from the same folder.
      quantize: None, 'int8' or 'nf4' (``lora_jax.quantize``'s formats) for the frozen kernels.
      quantize_config: the ``LoraConfig`` whose selection applies (its targets, or with
        ``quantize_layers='all'`` every kernel but its ``modules_to_save``); None: every kernel
        but the task head.
      quantize_layers: 'targets' | 'all', as in ``lora_jax.quantize``.

    >>> model, params, _ = from_pretrained("packaged:minilm", num_labels=3, with_tokenizer=False, quantize="nf4")
    >>> type(params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]).__name__
    'QuantizedKernel'
    """
    if task not in TASK_MODELS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASK_MODELS)}")
    convert = None
    if quantize is not None:
        if quantize_config is None:
            quantize_config = LoraConfig(targets=("re:.*",), modules_to_save=HEAD_MODULES[task])
        if not isinstance(quantize_config, LoraConfig):
            raise TypeError(f"quantize_config takes a lora_jax.LoraConfig (or None), got "
                            f"{type(quantize_config).__name__}")
        convert = KernelQuantizer(quantize_config, quantize, quantize_layers)
    model_dir = resolve_model_dir(name_or_path)
    if num_labels is not None:
        config_overrides["num_labels"] = num_labels
    config = read_config(model_dir, **config_overrides)
    model = TASK_MODELS[task](config)
    ids = jnp.zeros((1, 8), jnp.int32)
    rng = rng if rng is not None else jax.random.key(0)
    shapes = jax.eval_shape(model.init, rng, ids)["params"]
    params, _ = load_weights(shapes, read_state_dict(model_dir), config, task, strict=strict, convert=convert)
    flat = traverse_util.flatten_dict(params)  # what the checkpoint lacked is still a shape: initialise it
    flat.update(_initialise(model, [k for k, v in flat.items() if isinstance(v, jax.ShapeDtypeStruct)], rng, ids))
    params = traverse_util.unflatten_dict(flat)
    tokenizer = None
    if with_tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return Pretrained(model, params, tokenizer)


def _initialise(model: Any, keys: list[tuple[str, ...]], rng: jax.Array, ids: jax.Array) -> dict:
    """The leaves at ``keys`` as ``model.init`` would make them: one jitted init that returns only
    those, so XLA computes nothing else."""
    if not keys:
        return {}

    @jax.jit
    def init_some(rng: jax.Array) -> list:
        fresh = traverse_util.flatten_dict(model.init(rng, ids)["params"])
        return [fresh[key] for key in keys]

    return dict(zip(keys, init_some(rng)))
