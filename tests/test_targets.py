import pytest

from lora_jax.targets import matches


@pytest.mark.parametrize(
    "pattern, path, expected",
    [
        ("query", "encoder/layer/0/attention/self/query", True),
        ("self/query", "encoder/layer/0/attention/self/query", True),
        ("attention.self.query", "encoder/layer/0/attention/self/query", True),
        ("uery", "encoder/layer/0/attention/self/query", False),  # whole components only
        ("dense", "encoder/layer/0/attention/output/dense", True),
        ("attention.output.dense", "encoder/layer/0/output/dense", False),
        ("re:.*layer/[01]/.*query", "encoder/layer/1/attention/self/query", True),
        ("re:.*layer/[01]/.*query", "encoder/layer/2/attention/self/query", False),
        ("re:query", "encoder/layer/0/attention/self/query", False),  # regex must match the full path
    ],
)
def test_pattern_matching(pattern, path, expected):
    assert matches(pattern, path) is expected
