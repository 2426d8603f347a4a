"""The serving example: one batch mixing adapters, and its timing table, on a tiny BERT."""

import json

import pytest


def test_mixed_batch_and_throughput_table(tmp_path, tiny_bert_dir):
    from experiments import serve_adapters

    report = serve_adapters.main(["--model", str(tiny_bert_dir), "--counts", "1,2", "--rows", "4", "--seq", "8",
                                  "--repeats", "1", "--timing-models", "tiny-config", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["adapter"] for r in saved["predictions"]] == ["none (base)", "demo0", "demo1", "demo2", "none (base)",
                                                            "demo0"]
    assert [[r["adapters"] for r in rows] for rows in report["throughput"].values()] == [[1, 2]]
    assert list(report["throughput"]) == ["tiny-config"] and (tmp_path / "throughput.png").exists()


def test_rows_must_split_evenly_over_adapter_counts(capsys):
    from experiments import serve_adapters

    with pytest.raises(SystemExit):
        serve_adapters.parse_args(["--counts", "3", "--rows", "4"])
    assert "multiple of every --counts value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve_adapters.parse_args(["--timing-models", "gpt-9"])
    assert "bert-base-config" in capsys.readouterr().err


def test_slots_hold_the_largest_rank_of_any_layer_rank_pattern_included():
    import numpy as np

    import lora_jax
    from experiments.serve_adapters import slots_for

    plain = lora_jax.Adapter({"enc": {"query": {"lora_A": np.zeros((4, 2)), "lora_B": np.zeros((2, 4))}}},
                             lora_jax.LoraConfig(rank=2, targets=("query",)))
    patterned = lora_jax.Adapter({"enc": {"query": {"lora_A": np.zeros((4, 3)), "lora_B": np.zeros((3, 4))}}},
                                 lora_jax.LoraConfig(rank=2, targets=("query",), rank_pattern={"enc/query": 3}))
    assert slots_for([plain, patterned]).rank == 3


def test_adapters_trained_on_a_quantized_base_are_served_on_it(tmp_path, tiny_bert_dir):
    import jax
    import jax.numpy as jnp

    import lora_jax
    from experiments import serve_adapters
    from lora_jax.models import from_pretrained

    model, base, _ = from_pretrained(str(tiny_bert_dir), num_labels=3, with_tokenizer=False)
    example = jnp.ones((1, 8), jnp.int32)
    adapters = serve_adapters.demo_adapters(base, model, 2, example)
    paths = []
    for i, (adapter, fmt) in enumerate(zip(adapters + adapters[:1], ["nf4", "nf4", "none"])):
        params = lora_jax.apply_adapter(lora_jax.init_lora_params(lora_jax.lora(model, adapter.config), base,
                                                                  jax.random.key(0), example), adapter)
        if fmt != "none":
            params = lora_jax.quantize(params, adapter.config, fmt, layers="all")
        paths.append(str(lora_jax.save_adapter(tmp_path / f"a{i}", params, adapter.config,
                                               metadata={"quantize": fmt})))
    loaded, fmt = serve_adapters.load_adapters(paths[:2], str(tiny_bert_dir))
    assert fmt == "nf4" and len(loaded) == 2
    report = serve_adapters.main(["--model", str(tiny_bert_dir), "--adapters", *paths[:2], "--no-timing",
                                  "--out", str(tmp_path / "run")])
    assert {r["adapter"] for r in report["predictions"]} == {"none (base)", "a0", "a1"}
    with pytest.raises(ValueError, match="bases stored differently"):
        serve_adapters.load_adapters(paths, str(tiny_bert_dir))
    with pytest.raises(ValueError, match="different base model"):  # an NF4-trained adapter on the fp32 base
        lora_jax.apply_adapter(base, lora_jax.load_adapter(paths[0]))


def test_an_empty_adapter_list_and_sequences_beyond_the_positions_are_refused(tmp_path, tiny_bert_dir, capsys):
    from experiments import serve_adapters

    with pytest.raises(SystemExit):
        serve_adapters.parse_args(["--adapters"])
    assert "--adapters: expected at least one argument" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--seq 100000 exceeds the 64 tokens the position embeddings of "
                                         r"'tiny-config' cover"):
        serve_adapters.main(["--model", str(tiny_bert_dir), "--counts", "1", "--rows", "1", "--seq", "100000",
                             "--timing-models", "tiny-config", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
