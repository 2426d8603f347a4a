"""lora_jax: LoRA (low-rank adaptation) for JAX/Flax as a module transform.

    config = LoraConfig(rank=8, alpha=16, targets=("query", "value"))
    model = lora(base_model, config)                 # same call signature, lora_A/lora_B beside kernels
    params = model.init(rng, x)["params"]
    mask = trainable_mask(params, config)
    step = make_train_step(loss_fn, optax.adamw(1e-3), mask)
    merged = merge(params, config)                   # params for the untransformed base model
    save_adapter("adapters/task_a", params, config)  # kilobytes: only the trainable leaves

    lora(nnx_model, config, rngs=nnx.Rngs(0))        # flax.nnx: in place, LoRA params are nnx.LoRAParam
    LoraConfig(target_parameters=("moe/w_in",))      # raw params (mixture-of-experts weights) by path
"""

from . import nn  # lora_jax.nn.Dropout; not in __all__, where `nn` would shadow flax.linen
from .adapter_folders import load_adapter
from .adapters import Adapter, add_weighted_adapter, check_adapter_fits, check_targets_cover
from .api import (apply_adapter, bank_apply, count_parameters, export_peft, extract_adapter, hotswap_adapter, lora,
                  make_bank, merge, merge_requantized, print_trainable_parameters, quantize, save_adapter,
                  trainable_mask, trainable_summary)
from .config import LoraConfig
from .core.dropout import dropout
from .fingerprint import BaseMismatchError, base_fingerprint
from .masking import combine, lora_leaves, partition
from .merge import unmerge
from .nnx.transform import nnx_functional, nnx_trainable
from .nnx.trees import load_nnx_params, nnx_params
from .nnx.variables import QuantizedParam
from .optim import lora_plus, lora_plus_labels
from .param_targets import AdaptedParam, einsum, ragged_dot  # einsum / ragged_dot: not in __all__ (jax's names)
from .peft_io import import_peft
from .quantize import KernelQuantizer, QuantizedKernel
from .resume import CheckpointSaveError, TrainCheckpointer
from .safetensors_io import read_params, save_params
from .train import TrainState, TrainStep, dropout_rngs, make_eval_step, make_train_step
from .linen.transform import LoraModule, init_lora_params

from .version import __version__

__all__ = [
    "AdaptedParam",
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
