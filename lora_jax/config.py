"""LoraConfig: every knob of a LoRA adapter in one frozen, validated, serialisable record."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Any, Literal, Sequence

import numpy as np

from .core.variants import Variant, variant_of
from .targets import matches, validate_patterns

BiasMode = Literal["none", "all", "lora_only"]
InitMode = Literal["kaiming_uniform", "gaussian", "pissa"]

DEFAULT_TARGETS = ("query", "value")  # BERT's attention projections, LoRA's classic targets
_INIT_MODES = ("kaiming_uniform", "gaussian", "pissa")
_BIAS_MODES = ("none", "all", "lora_only")
_PARAM_DTYPES = ("float32", "bfloat16", "float16", "float64")
_QUANTIZED_COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Hyper-parameters of a LoRA adapter.

    Patterns (``targets``, ``exclude``, ``modules_to_save``) are matched on module paths such as
    ``encoder/layer_3/attention/self/query``. A plain pattern matches a path suffix by whole
    components (``"query"`` or ``"self/query"``; dots are read as slashes, PEFT-style); a pattern
    starting with ``re:`` is a regex that must match the whole path.

    Attributes:
      rank: r, the inner dimension of A (in, r) and B (r, out).
      alpha: scaling numerator; the update is scaled by alpha / r (or alpha / sqrt(r) with rslora).
      targets: which layers get LoRA (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.Embed). Left
        out: ("query", "value") (BERT's attention), or none when ``target_parameters`` is given (as
        PEFT, whose target_modules may be empty beside target_parameters).
      exclude: layers never targeted, even if ``targets`` matches them.
      dropout: dropout rate on the LoRA input; active only when the ``dropout_rng`` stream is given.
      init: ``kaiming_uniform`` (PEFT's default for A), ``gaussian`` (A ~ N(0, 1/r)) or ``pissa``
        (PiSSA, PEFT's ``init_lora_weights='pissa'``: A and B start as the weight's top-r singular
        directions, the base left untouched; Dense, DenseGeneral and Embed layers; see
        ``core.variants.Pissa``).
      rslora: scale by alpha / sqrt(r) (rank-stabilised LoRA).
      bias: which bias leaves train: ``none``, ``all``, or ``lora_only`` (biases of targeted layers).
      modules_to_save: modules whose parameters train in full (a classifier head, LayerNorms).
      dropout_rng: name of the rng stream used by LoRA dropout.
      rank_pattern: per-layer rank overrides ``{pattern: rank}`` (PEFT's rank_pattern); the first
        matching pattern wins, and that layer's scale uses its own rank.
      param_dtype: dtype of lora_A / lora_B (and so of their optimizer state), whatever the base
        layer's dtype: float32 by default, as PEFT keeps adapters of a bf16 or quantized base.
        The update is computed in the layer's compute dtype.
      use_dora: DoRA (weight-decomposed LoRA, PEFT's ``use_dora``): a trainable ``lora_magnitude``
        per output rescales the normalised ``W + ΔW``. Dense, DenseGeneral, Conv and Embed layers.
      quantized_compute_dtype: on a quantized base (``lora_jax.quantize``), the dtype each kernel is
        dequantized into for its layer's product: None keeps the kernel's own dtype (float32 for an
        fp32 checkpoint), 'bfloat16' is the QLoRA paper's. None by default: on CPU a bf16 kernel
        meeting fp32 activations is converted back, and the step measured slower (README, QLoRA).
      target_parameters: raw params to adapt by path (PEFT's ``target_parameters``), e.g. a mixture of
        experts' ``experts/w_in`` of shape (experts, in, out): one (A, B) per expert, wherever the
        model reads the param (``lora_jax.param_targets``). Plain LoRA only; ``dropout`` does not
        reach them (read as a weight, the update has no input of its own to drop; PEFT refuses it).
      parameter_in_axis: ``{pattern: -2 | -1}``: which axis of a targeted param is its input; -2
        (default) for JAX's ``x @ W`` layout (experts, in, out), -1 for PyTorch's (experts, out, in).

    >>> config = LoraConfig(rank=8, alpha=16, targets=("query", "value"), rank_pattern={"value": 4})
    >>> config.scale, config.rank_for("encoder/layer/0/attention/self/value"), config.scale_for(4)
    (2.0, 4, 4.0)
    >>> LoraConfig.from_json(config.to_json()) == config
    True
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] | None = None  # None: ("query", "value"), or () beside target_parameters
    exclude: tuple[str, ...] = ()
    dropout: float = 0.0
    init: InitMode = "kaiming_uniform"
    rslora: bool = False
    bias: BiasMode = "none"
    modules_to_save: tuple[str, ...] = ()
    dropout_rng: str = "lora_dropout"
    rank_pattern: tuple[tuple[str, int], ...] = ()
    param_dtype: str = "float32"
    use_dora: bool = False
    quantized_compute_dtype: str | None = None
    target_parameters: tuple[str, ...] = ()
    parameter_in_axis: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.targets is None:
            object.__setattr__(self, "targets", () if self.target_parameters else DEFAULT_TARGETS)
        # Accept any sequence (or a single string) for the pattern fields, store tuples.
        for name in ("targets", "exclude", "modules_to_save", "target_parameters"):
            value = getattr(self, name)
            object.__setattr__(self, name, _as_tuple(value, name))
        object.__setattr__(self, "rank_pattern", _rank_pattern(self.rank_pattern))
        object.__setattr__(self, "parameter_in_axis", _in_axes(self.parameter_in_axis))
        object.__setattr__(self, "rank", _positive_int(self.rank, "rank"))
        object.__setattr__(self, "alpha", _finite_real(self.alpha, "alpha"))
        object.__setattr__(self, "dropout", _finite_real(self.dropout, "dropout"))
        if not 0 < self.alpha <= _MAX_ALPHA:
            raise ValueError(f"LoraConfig.alpha must be > 0 and at most {_MAX_ALPHA:g} (alpha / rank scales float32 "
                             f"updates: a larger one overflows them), got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.rslora, (bool, np.bool_)):
            raise ValueError(f"LoraConfig.rslora must be True or False, got {self.rslora!r} "
                             f"({type(self.rslora).__name__})")
        object.__setattr__(self, "rslora", bool(self.rslora))
        if not isinstance(self.use_dora, (bool, np.bool_)):
            raise ValueError(f"LoraConfig.use_dora must be True or False, got {self.use_dora!r} "
                             f"({type(self.use_dora).__name__})")
        object.__setattr__(self, "use_dora", bool(self.use_dora))
        if self.init not in _INIT_MODES:
            raise ValueError(f"LoraConfig.init must be one of {_INIT_MODES}, got {self.init!r}")
        variant_of(self)  # one variant: e.g. DoRA and PiSSA do not combine
        if self.bias not in _BIAS_MODES:
            raise ValueError(f"LoraConfig.bias must be one of {_BIAS_MODES}, got {self.bias!r}")
        if self.param_dtype not in _PARAM_DTYPES:
            raise ValueError(f"LoraConfig.param_dtype must be one of {_PARAM_DTYPES}, got {self.param_dtype!r}")
        if self.quantized_compute_dtype not in (None,) + _QUANTIZED_COMPUTE_DTYPES:
            raise ValueError(f"LoraConfig.quantized_compute_dtype must be None (the kernel's own dtype) or one of "
                             f"{_QUANTIZED_COMPUTE_DTYPES}, got {self.quantized_compute_dtype!r}")
        if not isinstance(self.dropout_rng, str) or not self.dropout_rng:
            raise ValueError(f"LoraConfig.dropout_rng must be the non-empty name of an rng stream, "
                             f"got {self.dropout_rng!r}")
        if not self.targets and not self.target_parameters:
            raise ValueError("LoraConfig.targets and target_parameters are empty: name at least one layer or "
                             "parameter to adapt")
        if self.target_parameters and self.variant.leaves:
            raise ValueError(f"LoraConfig.target_parameters supports plain LoRA only, not {self.variant.label} "
                             f"({self.variant.flag})")
        validate_patterns(self.targets + self.exclude + self.modules_to_save + self.target_parameters
                          + tuple(k for k, _ in self.rank_pattern + self.parameter_in_axis))

    @property
    def scale(self) -> float:
        """The factor applied to x·A·B: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.scale_for(self.rank)

    @property
    def variant(self) -> Variant:
        """How the update enters the layer and the merge: ``DORA`` with ``use_dora``, ``PISSA`` with
        ``init='pissa'``, else ``LORA`` (``core.variants.variant_of``)."""
        return variant_of(self)

    def selects(self, path: str) -> bool:
        """Whether the layer at ``path`` is adapted: some target matches it and no exclude pattern does.

        >>> LoraConfig(rank=2, targets=("query", "value"), exclude=("re:.*layer_0/.*",)).selects("enc/layer_1/query")
        True
        """
        return any(matches(t, path) for t in self.targets) and not any(matches(e, path) for e in self.exclude)

    def selects_parameter(self, path: str) -> bool:
        """Whether the raw param at ``path`` ('moe/experts/gate_up_proj') is a parameter target: some
        ``target_parameters`` pattern matches it (PEFT's rule: a suffix of whole names, '.' or '/'
        separated, or ``re:``) and no exclude pattern matches it.

        >>> LoraConfig(rank=2, targets=(), target_parameters=("mlp.experts.w_in",)).selects_parameter("l0/mlp/experts/w_in")
        True
        """
        return any(matches(t, path) for t in self.target_parameters) and not any(matches(e, path) for e in self.exclude)

    def in_axis_for(self, path: str) -> int:
        """Which axis of the raw param at ``path`` is its input: the first matching
        ``parameter_in_axis`` entry, else -2 (JAX's ``x @ W`` layout, (experts, in, out))."""
        return next((axis for pattern, axis in self.parameter_in_axis if matches(pattern, path)), -2)

    def scale_for(self, rank: int) -> float:
        """The scale of a layer of the given rank (layers may differ through ``rank_pattern``)."""
        return self.alpha / (math.sqrt(rank) if self.rslora else rank)

    def rank_for(self, path: str) -> int:
        """The rank of the layer at ``path``: the first matching ``rank_pattern`` entry, else ``rank``."""
        return next((r for pattern, r in self.rank_pattern if matches(pattern, path)), self.rank)

    def replace(self, **changes: Any) -> "LoraConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists, rank_pattern a dict)."""
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        data["rank_pattern"] = dict(self.rank_pattern)
        data["parameter_in_axis"] = dict(self.parameter_in_axis)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Inverse of ``to_dict``; unknown keys are an error, so typos do not pass silently."""
        if not isinstance(data, dict):
            raise ValueError(f"a LoraConfig is read from a JSON object, got {type(data).__name__}: {data!r:.80}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LoraConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LoraConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"LoraConfig JSON is malformed: {err}") from None
        return cls.from_dict(data)


def require_config(config: Any, where: str) -> LoraConfig:
    """``config`` if it is a LoraConfig, else a TypeError naming the function that needs one.

    >>> require_config(LoraConfig(rank=2), "merge").rank
    2
    """
    if not isinstance(config, LoraConfig):
        hint = " (a dict: LoraConfig.from_dict(...))" if isinstance(config, dict) else ""
        raise TypeError(f"{where} takes the adapter's LoraConfig, got {type(config).__name__}{hint}")
    return config


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"LoraConfig.{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    return int(value)


_MAX_ALPHA = 1e30  # float32 holds up to 3.4e38; alpha / rank times a factor product must stay below it


def _finite_real(value: Any, name: str) -> float:
    """A real number (not a bool or a string), finite: inf or NaN would poison every update."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"LoraConfig.{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"LoraConfig.{name} must be finite, got {value!r}")
    return float(value)


def _rank_pattern(value: Any) -> tuple[tuple[str, int], ...]:
    """``{pattern: rank}`` or a sequence of (pattern, rank) pairs -> a tuple of pairs, validated."""
    try:
        items = list(value.items()) if isinstance(value, dict) else [tuple(pair) for pair in value]
    except TypeError:
        raise ValueError(f"LoraConfig.rank_pattern must be a dict {{pattern: rank}}, got {value!r}") from None
    out = []
    for pair in items:
        if len(pair) != 2 or not isinstance(pair[0], str) or not pair[0]:
            raise ValueError(f"LoraConfig.rank_pattern entry {pair!r} is not a (pattern, rank) pair with a "
                             f"non-empty string pattern")
        out.append((pair[0], _positive_int(pair[1], f"rank_pattern[{pair[0]!r}]")))
    return tuple(out)


def _in_axes(value: Any) -> tuple[tuple[str, int], ...]:
    """``{pattern: -2 | -1}`` or a sequence of pairs -> a tuple of pairs, validated."""
    try:
        items = list(value.items()) if isinstance(value, dict) else [tuple(pair) for pair in value]
    except TypeError:
        raise ValueError(f"LoraConfig.parameter_in_axis must be a dict {{pattern: -2 or -1}}, got {value!r}") from None
    for pair in items:
        if len(pair) != 2 or not isinstance(pair[0], str) or not pair[0] or isinstance(pair[1], bool) \
                or pair[1] not in (-2, -1):
            raise ValueError(f"LoraConfig.parameter_in_axis entry {pair!r} is not a (pattern, -2 or -1) pair: -2 is "
                             f"JAX's x @ W layout (experts, in, out), -1 PyTorch's x @ W.T layout (experts, out, in)")
    return tuple((str(p), int(a)) for p, a in items)


def _as_tuple(value: str | Sequence[str], name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"LoraConfig.{name} must be a string or a sequence of strings, got {value!r}") from None
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"LoraConfig.{name} holds {item!r}; every pattern must be a non-empty string")
    return items
