"""The serving example: one batch mixing adapters, and its timing table, on a tiny BERT."""

import json

import pytest


def test_mixed_batch_and_throughput_table(tmp_path, tiny_bert_dir):
    from experiments import serve_adapters

    report = serve_adapters.main(["--model", str(tiny_bert_dir), "--counts", "1,2", "--rows", "4", "--seq", "8",
                                  "--repeats", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["adapter"] for r in saved["predictions"]] == ["none (base)", "demo0", "demo1", "demo2", "none (base)",
                                                            "demo0"]
    assert [r["adapters"] for r in report["throughput"]] == [1, 2] and (tmp_path / "throughput.png").exists()


def test_rows_must_split_evenly_over_adapter_counts(capsys):
    from experiments import serve_adapters

    with pytest.raises(SystemExit):
        serve_adapters.parse_args(["--counts", "3", "--rows", "4"])
    assert "multiple of every --counts value" in capsys.readouterr().err


def test_slots_hold_the_largest_rank_of_any_layer_rank_pattern_included():
    import numpy as np

    import lora_jax
    from experiments.serve_adapters import slots_for

    plain = lora_jax.Adapter({"enc": {"query": {"lora_A": np.zeros((4, 2)), "lora_B": np.zeros((2, 4))}}},
                             lora_jax.LoraConfig(rank=2, targets=("query",)))
    patterned = lora_jax.Adapter({"enc": {"query": {"lora_A": np.zeros((4, 3)), "lora_B": np.zeros((3, 4))}}},
                                 lora_jax.LoraConfig(rank=2, targets=("query",), rank_pattern={"enc/query": 3}))
    assert slots_for([plain, patterned]).rank == 3
