"""Models: Flax BERT / RoBERTa with Hugging Face names and weight loading."""

from .bert import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    REMAT_POLICIES,
)
from .hub import PACKAGED_MINILM, packaged_minilm_path, resolve_model_dir
from .pretrained import Pretrained, from_pretrained, load_weights, read_config, read_state_dict
from .torch_pickle import load_torch_bin

__all__ = [
    "BertConfig",
    "BertForQuestionAnswering",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "PACKAGED_MINILM",
    "REMAT_POLICIES",
    "Pretrained",
    "from_pretrained",
    "load_torch_bin",
    "load_weights",
    "packaged_minilm_path",
    "read_config",
    "read_state_dict",
    "resolve_model_dir",
]
