"""Flax BERT and RoBERTa encoders with Hugging Face module names, plus task heads.

Param paths mirror the PyTorch module paths with '/' for '.', e.g.
``encoder/layer/0/attention/self/query/kernel`` for ``encoder.layer.0.attention.self.query.weight``,
so LoRA targets read the same as in PEFT ("query", "value", "attention.output.dense", ...).
Shapes: ids and masks are (batch, seq); hidden states (batch, seq, hidden).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from ..nn import Dropout
from .precision import DTYPES, mixed_dot_general

_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "tanh": jnp.tanh,
}

# Activation checkpointing per encoder layer (``BertConfig.remat``): what the backward pass keeps.
REMAT_POLICIES = {
    "none": None,  # keep every activation: fastest, most memory
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projection outputs, recompute the rest
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input: least memory
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT/RoBERTa ``config.json`` this implementation uses."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    model_type: str = "bert"
    classifier_dropout: float | None = None
    num_labels: int = 2
    remat: str = "none"  # activation checkpointing per layer: one of REMAT_POLICIES (not a Hugging Face field)
    dtype: str = "float32"  # compute dtype of the matmuls (accumulation, LayerNorm, softmax stay float32)
    param_dtype: str = "float32"  # dtype the params are stored in

    @property
    def max_tokens(self) -> int:
        """The longest input the position embeddings cover (RoBERTa's positions start after its pad id)."""
        return self.max_position_embeddings - (self.pad_token_id + 1 if self.model_type == "roberta" else 0)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "num_labels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int) or self.pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a non-negative integer, got {self.pad_token_id!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            value = getattr(self, name)
            if value is None and name == "classifier_dropout":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < 1.0:
            raise ValueError(f"layer_norm_eps must be a small positive number, got {eps!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; supported: {sorted(_ACTIVATIONS)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat {self.remat!r}; choose from {sorted(REMAT_POLICIES)}")
        if self.model_type not in ("bert", "roberta"):
            raise ValueError(f"unsupported model_type {self.model_type!r}: expected 'bert' or 'roberta'")

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> "BertConfig":
        """Build from a (Hugging Face) config dict, ignoring the keys we do not use."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        if "num_labels" not in values and isinstance(data.get("id2label"), dict):
            values["num_labels"] = len(data["id2label"])
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def param_count(self) -> int:
        """Parameters of the encoder, pooler and a classifier (an estimate to check sizes before allocating)."""
        h, i = self.hidden_size, self.intermediate_size
        embeddings = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * h + 2 * h
        layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
        return embeddings + self.num_hidden_layers * layer + (h * h + h) + (h + 1) * self.num_labels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _dense(config: BertConfig, features: int, name: str) -> nn.Dense:
    """A Dense layer whose matmul takes ``config.dtype`` inputs and gives float32 outputs."""
    compute = DTYPES[config.dtype]
    return nn.Dense(features, name=name, kernel_init=nn.initializers.normal(0.02), param_dtype=DTYPES[config.param_dtype],
                    dtype=compute, dot_general=mixed_dot_general(compute))


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, name=name, dtype=jnp.float32,
                        param_dtype=DTYPES[config.param_dtype])


def _batched_matmul(spec: str, a: jax.Array, b: jax.Array, dtype: Any) -> jax.Array:
    """einsum with ``dtype`` inputs and a float32 result (attention's score and context products)."""
    if dtype == jnp.float32:
        return jnp.einsum(spec, a, b)
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def roberta_position_ids(input_ids: jax.Array, padding_idx: int) -> jax.Array:
    """RoBERTa numbers non-pad tokens from padding_idx + 1; pads keep padding_idx."""
    mask = (input_ids != padding_idx).astype(jnp.int32)
    return jnp.cumsum(mask, axis=1) * mask + padding_idx


class BertEmbeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool):
        c = self.config
        embed = lambda n, name: nn.Embed(n, c.hidden_size, embedding_init=nn.initializers.normal(0.02), name=name,
                                         dtype=jnp.float32, param_dtype=DTYPES[c.param_dtype])
        words = embed(c.vocab_size, "word_embeddings")(input_ids)
        positions = embed(c.max_position_embeddings, "position_embeddings")(position_ids)
        types = embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
        h = _layer_norm(c, "LayerNorm")(words + types + positions)
        return Dropout(c.hidden_dropout_prob)(h, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, h, mask_bias, deterministic: bool):
        """Head-major layout (batch, heads, seq, head_dim), 1/sqrt(head_dim) applied to the queries."""
        c = self.config
        batch, seq, _ = h.shape
        heads = lambda t: t.reshape(batch, seq, c.num_attention_heads, c.head_dim).transpose(0, 2, 1, 3)
        q = heads(_dense(c, c.hidden_size, "query")(h) * (1.0 / math.sqrt(c.head_dim)))
        k = heads(_dense(c, c.hidden_size, "key")(h))
        v = heads(_dense(c, c.hidden_size, "value")(h))
        compute = DTYPES[c.dtype]
        probs = jax.nn.softmax(_batched_matmul("bhqd,bhkd->bhqk", q, k, compute) + mask_bias, axis=-1)
        probs = Dropout(c.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        context = _batched_matmul("bhqk,bhkd->bhqd", probs, v, compute)
        return context.transpose(0, 2, 1, 3).reshape(batch, seq, c.hidden_size)


class BertSelfOutput(nn.Module):
    """Projection + dropout + residual + LayerNorm (used after attention and after the MLP)."""

    config: BertConfig

    @nn.compact
    def __call__(self, h, residual, deterministic: bool):
        h = _dense(self.config, self.config.hidden_size, "dense")(h)
        h = Dropout(self.config.hidden_dropout_prob)(h, deterministic=deterministic)
        return _layer_norm(self.config, "LayerNorm")(h + residual)


class BertAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, h, mask_bias, deterministic: bool):
        a = BertSelfAttention(self.config, name="self")(h, mask_bias, deterministic)
        return BertSelfOutput(self.config, name="output")(a, h, deterministic)


class BertIntermediate(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, h):
        return _ACTIVATIONS[self.config.hidden_act](_dense(self.config, self.config.intermediate_size, "dense")(h))


class BertLayer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, h, mask_bias, deterministic: bool):
        h = BertAttention(self.config, name="attention")(h, mask_bias, deterministic)
        inner = BertIntermediate(self.config, name="intermediate")(h)
        return BertSelfOutput(self.config, name="output")(inner, h, deterministic)


class BertLayerStack(nn.Module):
    """Holds the layers as children '0', '1', ... so paths read ``encoder/layer/3/...``.
    With ``config.remat`` each layer is rematerialised (same params and paths; dropout masks replay)."""

    config: BertConfig

    @nn.compact
    def __call__(self, h, mask_bias, deterministic: bool):
        policy = REMAT_POLICIES[self.config.remat]
        layer = BertLayer if policy is None else nn.remat(BertLayer, static_argnums=(3,), policy=policy)
        for i in range(self.config.num_hidden_layers):
            h = layer(self.config, name=str(i))(h, mask_bias, deterministic)
        return h


class BertEncoder(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, h, mask_bias, deterministic: bool):
        return BertLayerStack(self.config, name="layer")(h, mask_bias, deterministic)


class BertPooler(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, h):
        return jnp.tanh(_dense(self.config, self.config.hidden_size, "dense")(h[:, 0]))


class BertModel(nn.Module):
    """The encoder: returns (last_hidden_state (B, T, H), pooled (B, H) or None)."""

    config: BertConfig
    add_pooling_layer: bool = True

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 deterministic: bool = True):
        c = self.config
        if position_ids is None and input_ids.shape[-1] > c.max_tokens:
            raise ValueError(f"input of {input_ids.shape[-1]} tokens: this model's position embeddings cover "
                             f"{c.max_tokens} (max_position_embeddings); truncate the input (e.g. a tokenizer's "
                             f"max_length)")
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            if c.model_type == "roberta":
                position_ids = roberta_position_ids(input_ids, c.pad_token_id)
            else:
                position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        h = BertEmbeddings(c, name="embeddings")(input_ids, token_type_ids, position_ids, deterministic)
        # Additive mask as in transformers: 0 where attended, the dtype's minimum where masked.
        mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(h.dtype).min).astype(h.dtype)
        h = BertEncoder(c, name="encoder")(h, mask_bias, deterministic)
        pooled = BertPooler(c, name="pooler")(h) if self.add_pooling_layer else None
        return h, pooled


def _backbone_name(config: BertConfig) -> str:
    return "roberta" if config.model_type == "roberta" else "bert"


def _backbone(config: BertConfig, pooler: bool, *inputs):
    """The encoder under the name transformers uses ('bert' / 'roberta'); call inside a compact method."""
    return BertModel(config, add_pooling_layer=pooler, name=_backbone_name(config))(*inputs)


def _classifier_dropout(config: BertConfig) -> float:
    return config.hidden_dropout_prob if config.classifier_dropout is None else config.classifier_dropout


class RobertaClassificationHead(nn.Module):
    """RoBERTa's head: <s> token -> dropout -> dense -> tanh -> dropout -> out_proj."""

    config: BertConfig

    @nn.compact
    def __call__(self, h, deterministic: bool):
        rate = _classifier_dropout(self.config)
        x = Dropout(rate)(h[:, 0], deterministic=deterministic)
        x = jnp.tanh(_dense(self.config, self.config.hidden_size, "dense")(x))
        x = Dropout(rate)(x, deterministic=deterministic)
        return _dense(self.config, self.config.num_labels, "out_proj")(x)


class BertForSequenceClassification(nn.Module):
    """Logits (B, num_labels). BERT: pooler -> dropout -> classifier; RoBERTa: its own head, no pooler."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 deterministic: bool = True):
        c = self.config
        is_roberta = c.model_type == "roberta"
        h, pooled = _backbone(c, not is_roberta, input_ids, attention_mask, token_type_ids, position_ids, deterministic)
        if is_roberta:
            return RobertaClassificationHead(c, name="classifier")(h, deterministic)
        x = Dropout(_classifier_dropout(c))(pooled, deterministic=deterministic)
        return _dense(c, c.num_labels, "classifier")(x)


class BertForTokenClassification(nn.Module):
    """Per-token logits (B, T, num_labels): sequence output -> dropout -> classifier."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 deterministic: bool = True):
        c = self.config
        h, _ = _backbone(c, False, input_ids, attention_mask, token_type_ids, position_ids, deterministic)
        h = Dropout(_classifier_dropout(c))(h, deterministic=deterministic)
        return _dense(c, c.num_labels, "classifier")(h)


class BertForQuestionAnswering(nn.Module):
    """Span logits: (start (B, T), end (B, T)) from ``qa_outputs``."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 deterministic: bool = True):
        c = self.config
        h, _ = _backbone(c, False, input_ids, attention_mask, token_type_ids, position_ids, deterministic)
        logits = _dense(c, 2, "qa_outputs")(h)
        return logits[..., 0], logits[..., 1]


TASK_MODELS = {
    "base": BertModel,
    "sequence_classification": BertForSequenceClassification,
    "token_classification": BertForTokenClassification,
    "question_answering": BertForQuestionAnswering,
}

# Modules a task head adds on top of the backbone (new at load time, trainable with LoRA).
HEAD_MODULES = {
    "base": (),
    "sequence_classification": ("classifier",),
    "token_classification": ("classifier",),
    "question_answering": ("qa_outputs",),
}
