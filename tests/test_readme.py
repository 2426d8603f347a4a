"""The README's API example runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_api_example_runs(capsys):
    block = re.search(r"## The API in 15 lines\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert "trainable params: 74,883 || all params:" in capsys.readouterr().out
    assert float(namespace["metrics"]["loss"]) > 0
    assert "lora_A" not in str(namespace["merged"]["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"])


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = re.search(r"Install and run the tests.*?```bash\n(.*?)\n```", text, re.S).group(1)
    install_and_test = test_command.split("&& ", 2)[2]  # after creating and activating the venv
    for part in install_and_test.split(" && "):
        assert part in ci, part


def test_readme_moe_example_runs(capsys):
    block = re.search(r"## Mixture of experts.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert "'lora_A': (8, 64, 4), 'lora_B': (8, 4, 256)" in capsys.readouterr().out
    mask, merged = namespace["mask"], namespace["merged"]
    assert mask["w_in_lora"]["lora_A"] and not mask["w_in"] and set(merged) == {"w_in", "w_out"}
