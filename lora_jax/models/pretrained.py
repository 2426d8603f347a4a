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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from .bert import HEAD_MODULES, TASK_MODELS, BertConfig
from .hub import resolve_model_dir
from ..safetensors_io import read_safetensors
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


def read_state_dict(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint folder as numpy arrays, keyed by their PyTorch names.

    Safetensors (one file or shards with an index) are preferred whenever present; ``pytorch_model.bin``
    is read only when no safetensors file exists, by a restricted reader (``load_torch_bin``).
    """
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index} has no valid 'weight_map' {{tensor name: shard file}}")
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = (model_dir / shard).resolve()
            if shard_path.parent != model_dir.resolve():
                raise ValueError(f"{index} names shard {shard!r} outside the model folder")
            state.update(read_safetensors(shard_path))
        return state
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


def load_weights(params: dict, state: dict[str, np.ndarray], config: BertConfig, task: str,
                 strict: bool = True) -> tuple[dict, dict[str, list[str]]]:
    """Fill ``params`` (a freshly initialised tree) from a PyTorch state dict.

    Returns the new params and a report {'missing', 'unexpected', 'new_head'} of key names.
    """
    backbone = "roberta" if config.model_type == "roberta" else "bert"
    ckpt_prefix = backbone + "." if any(k.startswith(backbone + ".") for k in state) else ""
    heads = HEAD_MODULES[task]
    flat = traverse_util.flatten_dict(params)
    used: set[str] = set()
    missing, new_head = [], []
    for key, value in flat.items():
        module, leaf = key[:-1], key[-1]
        if task != "base" and module[0] == backbone:
            name = ckpt_prefix + hf_key(module[1:], leaf)
        elif task == "base":
            name = ckpt_prefix + hf_key(module, leaf)
        else:
            name = hf_key(module, leaf)
        found = next((c for c in _candidates(name) if c in state), None)
        if found is None:
            (new_head if module[0] in heads else missing).append(name)
            continue
        array = _to_leaf(state[found], leaf)
        if array.shape != value.shape:
            raise ValueError(f"checkpoint weight '{found}' has shape {tuple(state[found].shape)}, which does not "
                             f"fit our leaf '{'/'.join(key)}' of shape {tuple(value.shape)} (as stored: "
                             f"{tuple(_to_leaf(np.empty(value.shape), leaf).shape)})")
        flat[key] = jnp.asarray(array, dtype=value.dtype)
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
                    **config_overrides: Any) -> Pretrained:
    """Load a Hugging Face BERT/RoBERTa checkpoint into our Flax model.

    Args:
      name_or_path: a local folder, a Hub id (e.g. 'bert-base-uncased'), or 'packaged:minilm'. Weights
        come from safetensors whenever the folder has them; ``pytorch_model.bin`` only otherwise.
      task: 'base' (encoder + pooler), 'sequence_classification', 'token_classification',
        'question_answering'.
      num_labels: labels of a classification head (its weights are new unless the checkpoint has them).
      rng: key for the newly initialised head (default: key 0).
      strict: a missing non-head weight is an error (True) or random-initialised with a warning.
      with_tokenizer: also load ``transformers.AutoTokenizer`` from the same folder.
    """
    if task not in TASK_MODELS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASK_MODELS)}")
    model_dir = resolve_model_dir(name_or_path)
    if num_labels is not None:
        config_overrides["num_labels"] = num_labels
    config = read_config(model_dir, **config_overrides)
    model = TASK_MODELS[task](config)
    ids = jnp.zeros((1, 8), jnp.int32)
    params = jax.jit(model.init)(rng if rng is not None else jax.random.key(0), ids)["params"]
    params, _ = load_weights(params, read_state_dict(model_dir), config, task, strict=strict)
    tokenizer = None
    if with_tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return Pretrained(model, params, tokenizer)
