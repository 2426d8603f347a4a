"""lora_jax: LoRA (low-rank adaptation) for JAX/Flax as a module transform.

    config = LoraConfig(rank=8, alpha=16, targets=("query", "value"))
    model = lora(base_model, config)                 # same call signature, lora_A/lora_B beside kernels
    params = model.init(rng, x)["params"]
    mask = trainable_mask(params, config)
    step = make_train_step(loss_fn, optax.adamw(1e-3), mask)
    merged = merge(params, config)                   # params for the untransformed base model
    save_adapter("adapters/task_a", params, config)  # kilobytes: only the trainable leaves

    lora(nnx_model, config, rngs=nnx.Rngs(0))        # flax.nnx: in place, LoRA params are nnx.LoRAParam
"""

from .adapters import (Adapter, add_weighted_adapter, apply_adapter, check_adapter_fits, check_targets_cover,
                       extract_adapter, hotswap_adapter)
from .bank import bank_apply, make_bank
from .adapter_folders import load_adapter, save_adapter
from .resume import CheckpointSaveError, TrainCheckpointer
from .fingerprint import BaseMismatchError, base_fingerprint
from . import nn, nnx_transform  # as attributes (lora_jax.nn.Dropout); not in __all__, where `nn` would shadow flax's
from .config import LoraConfig
from .core.dropout import dropout
from .masking import combine, lora_leaves, partition, trainable_mask
from .merge import merge, unmerge
from .nnx_trees import load_nnx_params, nnx_params
from .nnx_transform import nnx_functional, nnx_trainable
from .optim import lora_plus, lora_plus_labels
from .quantize import KernelQuantizer, QuantizedKernel, QuantizedParam, merge_requantized, quantize
from .safetensors_io import read_params, save_params
from .peft_io import export_peft, import_peft
from .summary import count_parameters, print_trainable_parameters, trainable_summary
from .train import TrainState, TrainStep, dropout_rngs, make_eval_step, make_train_step
from .transform import LoraModule, init_lora_params, lora

from .version import __version__

__all__ = [
    "Adapter",
    "BaseMismatchError",
    "CheckpointSaveError",
    "TrainCheckpointer",
    "add_weighted_adapter",
    "apply_adapter",
    "bank_apply",
    "base_fingerprint",
    "check_adapter_fits",
    "check_targets_cover",
    "export_peft",
    "extract_adapter",
    "hotswap_adapter",
    "import_peft",
    "load_adapter",
    "save_adapter",
    "LoraConfig",
    "LoraModule",
    "QuantizedKernel",
    "QuantizedParam",
    "TrainState",
    "TrainStep",
    "combine",
    "count_parameters",
    "dropout",
    "dropout_rngs",
    "init_lora_params",
    "lora",
    "load_nnx_params",
    "lora_leaves",
    "lora_plus",
    "lora_plus_labels",
    "make_bank",
    "make_eval_step",
    "make_train_step",
    "merge",
    "nnx_functional",
    "nnx_params",
    "nnx_trainable",
    "partition",
    "print_trainable_parameters",
    "quantize",
    "KernelQuantizer",
    "read_params",
    "save_params",
    "merge_requantized",
    "trainable_mask",
    "trainable_summary",
    "unmerge",
]
