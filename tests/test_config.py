import pytest

from lora_jax import LoraConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": -2}, "rank must be a positive integer"),
        ({"rank": 2.5}, "rank must be a positive integer"),
        ({"alpha": 0}, "alpha must be > 0"),
        ({"alpha": -1.0}, "alpha must be > 0"),
        ({"alpha": 1e300}, "alpha must be > 0 and at most 1e\+30"),
        ({"init": "xavier"}, "init must be one of"),
        ({"bias": "some"}, "bias must be one of"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"targets": ()}, "targets and target_parameters are empty"),
        ({"targets": ("re:(unclosed",)}, "invalid regex"),
        ({"targets": ("",)}, "non-empty string"),
    ],
)
def test_invalid_config_raises_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_scale_plain_and_rslora():
    assert LoraConfig(rank=8, alpha=16).scale == 2.0
    assert LoraConfig(rank=16, alpha=8, rslora=True).scale == 2.0


def test_json_round_trip_and_unknown_field():
    config = LoraConfig(rank=4, alpha=8, targets=["query", "re:.*value"], modules_to_save="classifier")
    assert config.targets == ("query", "re:.*value") and config.modules_to_save == ("classifier",)
    assert LoraConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown LoraConfig fields"):
        LoraConfig.from_dict({"rank": 4, "lora_alpha": 8})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": float("inf")}, "alpha must be finite"),
        ({"alpha": float("nan")}, "alpha must be finite"),
        ({"alpha": "16"}, "alpha must be a number"),
        ({"rslora": "no"}, "rslora must be True or False"),
        ({"rslora": 1}, "rslora must be True or False"),
        ({"dropout": "0.1"}, "dropout must be a number"),
        ({"dropout": float("nan")}, "dropout must be finite"),
        ({"rank": True}, "rank must be a positive integer"),
        ({"rank_pattern": {"fc1": 0}}, r"rank_pattern\['fc1'\] must be a positive integer"),
        ({"rank_pattern": 3}, "rank_pattern must be a dict"),
        ({"dropout_rng": ""}, "dropout_rng must be the non-empty name"),
    ],
)
def test_wrong_types_and_non_finite_numbers_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_malformed_json_and_non_object_are_clear_errors():
    with pytest.raises(ValueError, match="LoraConfig JSON is malformed"):
        LoraConfig.from_json("{rank: 4")
    with pytest.raises(ValueError, match="read from a JSON object, got list"):
        LoraConfig.from_dict([4, 8])


def test_default_targets_are_bert_attention_or_none_beside_parameter_targets():
    assert LoraConfig().targets == ("query", "value")
    assert LoraConfig(target_parameters=("experts/w_in",)).targets == ()
    assert LoraConfig(targets=("fc",), target_parameters=("w",)).targets == ("fc",)
    saved = LoraConfig(target_parameters=("w",))
    assert LoraConfig.from_json(saved.to_json()) == saved
