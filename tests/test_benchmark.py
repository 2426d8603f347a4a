"""The benchmark harness runs end to end on a tiny input (figures are not asserted: timings are no test)."""

import json

import pytest


@pytest.mark.slow
def test_benchmark_harness_smoke(tmp_path):
    from experiments import benchmark

    peft_available = benchmark.torch_available()
    args = ["--model", "tiny-config", "--batch", "2", "--seq", "16", "--steps", "1", "--no-scaling", "--out",
            str(tmp_path)]
    report = benchmark.main(args + (["--peft"] if peft_available else []))
    saved = json.loads((tmp_path / "results.json").read_text())
    result = saved["results"][0]
    assert result["lora"]["flops"] < result["full"]["flops"]
    assert result["lora"]["opt_state_bytes"] == 2 * 4 * result["lora"]["trainable_params"] + 4  # adam mu, nu + count
    hidden, layers, labels, rank = 32, 2, 3, 8  # tiny-config: LoRA A and B on query and value, the classifier in full
    lora_params = layers * 2 * (hidden * rank + rank * hidden) + hidden * labels + labels
    assert result["lora"]["trainable_params"] == lora_params
    # the rematerialised run recomputes part of the forward in the backward pass: same parameters, more FLOPs
    assert result["lora_remat"]["trainable_params"] == lora_params
    assert result["lora_remat"]["flops"] > result["lora"]["flops"]
    assert 0 < result["lora"]["xla_temp_bytes"] < result["full"]["xla_temp_bytes"]  # no kernel gradients kept
    assert {"base_s", "lora_unmerged_s", "lora_merged_s"} <= set(result["forward"])
    targets = {v["target"] for v in report["verdicts"]}
    assert "merged forward / base forward (tiny-config)" in targets
    if peft_available:
        assert "lora_jax LoRA step / PEFT LoRA step (tiny-config)" in targets
        assert result["peft_memory"]["peak_rss_bytes"] > 0
    assert "| model | mode | step (s)" in (tmp_path / "benchmark.md").read_text()
