"""from_pretrained(..., quantize=...): each kernel quantized as it is read, equal to quantizing the float
load, and no tensor read before the previous kernel is quantized."""

import jax
import numpy as np
import pytest
from flax import traverse_util

import lora_jax
from lora_jax.models import from_pretrained
from lora_jax.safetensors_io import LazySafetensors

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


def _small_bert(folder):
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=40)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quantized_load_equals_quantizing_the_float_load(tmp_path, fmt):
    _small_bert(tmp_path)
    _, params, _ = from_pretrained(tmp_path, num_labels=3, with_tokenizer=False)
    config = lora_jax.LoraConfig(targets=("query", "value"), modules_to_save=("classifier",))
    expected = traverse_util.flatten_dict(lora_jax.quantize(params, config, fmt, layers="all"))
    _, loaded, _ = from_pretrained(tmp_path, num_labels=3, with_tokenizer=False, quantize=fmt, quantize_config=config)
    loaded = traverse_util.flatten_dict(loaded)
    assert loaded.keys() == expected.keys()
    boxes = [key for key, value in loaded.items() if isinstance(value, lora_jax.QuantizedKernel)]
    assert len(boxes) == 2 * 6 + 1  # six kernels per layer, the pooler; not the classifier head
    for key in loaded:
        jax.tree.map(np.testing.assert_array_equal, loaded[key], expected[key])
    only_targets = from_pretrained(tmp_path, num_labels=3, with_tokenizer=False, quantize=fmt, quantize_config=config,
                                   quantize_layers="targets").params
    assert sum(isinstance(v, lora_jax.QuantizedKernel) for v in traverse_util.flatten_dict(only_targets).values()) == 4


def test_each_kernel_is_quantized_before_the_next_tensor_is_read(tmp_path, monkeypatch):
    _small_bert(tmp_path)
    events = []
    read = LazySafetensors.__getitem__
    monkeypatch.setattr(LazySafetensors, "__getitem__", lambda self, name: events.append(("read", name)) or read(self, name))
    quantize_one = lora_jax.KernelQuantizer.__call__

    def quantizing(self, key, value):
        out = quantize_one(self, key, value)
        if isinstance(out, lora_jax.QuantizedKernel):
            events.append(("quantized", "/".join(key)))
        return out

    monkeypatch.setattr(lora_jax.KernelQuantizer, "__call__", quantizing)
    from_pretrained(tmp_path, task="base", with_tokenizer=False, quantize="nf4")
    kernels = [i for i, (what, name) in enumerate(events) if what == "read" and name.endswith("dense.weight")
               or what == "read" and name.endswith(("query.weight", "key.weight", "value.weight"))]
    assert len(kernels) == 13
    for i in kernels:  # the tensor read next is read only after this kernel became codes
        assert events[i + 1][0] == "quantized", events[i: i + 2]


def test_bad_quantize_arguments_are_named(tmp_path):
    _small_bert(tmp_path)
    with pytest.raises(ValueError, match="format must be 'int8' or 'nf4'"):
        from_pretrained(tmp_path, with_tokenizer=False, quantize="int4")
    with pytest.raises(TypeError, match="quantize_config takes a lora_jax.LoraConfig"):
        from_pretrained(tmp_path, with_tokenizer=False, quantize="nf4", quantize_config={"targets": ["query"]})
