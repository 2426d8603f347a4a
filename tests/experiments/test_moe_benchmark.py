"""experiments.moe_benchmark on a tiny block, in process: every step measured, the JSON and table written."""

import json

from experiments import benchmark


def test_moe_flag_measures_every_path_against_the_frozen_block(tmp_path):
    report = benchmark.main(["--moe", "--experts", "4", "--hidden", "16", "--ffn", "8", "--tokens", "12",
                             "--rank", "2", "--steps", "1", "--out", str(tmp_path)])
    steps = {row["step"] for row in report["rows"]}
    assert steps == {"frozen fp32", "(a) read as W fp32", "(b) grouped fp32", "(a) read as W nf4", "(b) grouped nf4"}
    assert all(row["median_s"] > 0 and row["temp_bytes"] >= 0 for row in report["rows"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [v["step"] for v in saved["verdicts"]] == ["(b) grouped fp32"]
    assert "(b) grouped nf4" in (tmp_path / "moe_benchmark.md").read_text()
