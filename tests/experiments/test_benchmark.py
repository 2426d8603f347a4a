"""The benchmark harness: its timing loop, its workers on a tiny model, and its report (figures are not
asserted: timings are no test)."""

import argparse
import json

import pytest

from experiments import benchmark
from experiments.common import interleaved


def test_interleaved_timing_alternates_the_functions():
    calls = []
    result = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, steps=3, warmup=1)
    assert calls == ["a", "b"] * 5  # first calls, one warm-up round, three timed rounds: always A B A B
    assert set(result) == {"a", "b"} and all(r["min_s"] <= r["median_s"] and r["rounds"] == 3 for r in result.values())


def test_interleaved_timing_stops_at_its_time_budget_after_the_minimum_rounds():
    calls = []
    result = interleaved({"a": lambda: calls.append("a")}, steps=50, warmup=0, max_seconds=0.0,
                                   min_rounds=2)
    assert len(calls) == 3 and result["a"]["rounds"] == 2  # first call, then two timed rounds, not fifty


def _args(**overrides):
    defaults = dict(model="tiny-config", batch=2, seq=16, steps=1, rank=8, mode="lora", remat="dots", dtype="float32",
                    peft=False, no_scaling=True, no_bf16=False, in_process=True)
    return argparse.Namespace(**{**defaults, **overrides})


@pytest.mark.slow
def test_train_workers_count_parameters_flops_and_memory():
    full = benchmark.worker_train(_args(mode="full"))
    lora = benchmark.worker_train(_args())
    hidden, layers, labels, rank = 32, 2, 3, 8  # tiny-config: LoRA A and B on query and value, the classifier in full
    assert lora["trainable_params"] == layers * 2 * 2 * hidden * rank + hidden * labels + labels
    assert lora["opt_state_bytes"] == 2 * 4 * lora["trainable_params"] + 4  # adam mu, nu + count
    assert lora["flops"] < full["flops"]
    assert 0 < lora["xla_temp_bytes"] < full["xla_temp_bytes"]  # no kernel gradients kept


@pytest.mark.slow
def test_versus_peft_worker_times_both_sides():
    pytest.importorskip("peft")
    result = benchmark.worker_versus_peft(_args(no_bf16=True))  # the bf16 pair is the fp32 code path at bf16
    assert {"ours_fp32_step_s", "peft_fp32_step_s", "ours_forward_s", "transformers_forward_s"} <= set(result)
    assert "peft_bf16_step_s" not in result


def test_report_from_worker_results(tmp_path, monkeypatch):
    """The driver end to end, its workers replaced by fixed figures: ratios, verdicts, tables, plot."""
    train = {"step_s": 2.0, "compile_s": 1.0, "flops": 1e9, "xla_temp_bytes": 2**30, "opt_state_bytes": 100,
             "peak_rss_bytes": 2**31, "trainable_params": 10, "total_params": 1000, "first_call_s": 3.0}
    figures = {
        "train": lambda a: {**train, "step_s": 4.0 if a.mode == "full" else 2.0,
                            "opt_state_bytes": 10_000 if a.mode == "full" else 100},
        "ratios": lambda a: {"lora_step_s": 2.0, "full_step_s": 4.0, "base_s": 1.0, "lora_unmerged_s": 1.05,
                             "lora_merged_s": 1.0},
        "peft-memory": lambda a: {"step_s": 3.0, "first_call_s": 3.0, "peak_rss_bytes": 2**32},
        "versus-peft": lambda a: {"ours_fp32_step_s": 2.0, "ours_bf16_step_s": 1.0, "peft_fp32_step_s": 4.0,
                                  "peft_bf16_step_s": 4.0, "ours_forward_s": 1.0, "transformers_forward_s": 1.0,
                                  "rounds": 3},
        "scaling": lambda a: {axis: {v: 0.1 * v for v in values} for axis, values in benchmark.SCALING.items()},
    }
    monkeypatch.setattr(benchmark, "WORKERS", figures)
    monkeypatch.setattr(benchmark, "torch_available", lambda: True)
    report = benchmark.main(["--model", "tiny-config", "--peft", "--in-process", "--out", str(tmp_path)])
    ratios = json.loads((tmp_path / "results.json").read_text())["ratios"]["tiny-config"]
    assert ratios["lora_over_full_step"] == 0.5 and ratios["ours_over_peft_step_fp32"] == 0.5
    assert ratios["ours_over_peft_step_bf16"] == 0.25 and ratios["ours_over_peft_peak_rss"] == 0.5
    verdicts = {v["target"]: v["met"] for v in report["verdicts"]}
    assert verdicts["ours_over_peft_step_fp32 (tiny-config)"] and verdicts["lora_over_full_opt_state (tiny-config)"]
    assert not verdicts["ours_over_transformers_forward (tiny-config)"]  # 1.0 against a bound of 0.9
    assert "| model | mode | step (s)" in (tmp_path / "benchmark.md").read_text()
    assert (tmp_path / "scaling.png").stat().st_size > 1000


def test_quantized_workers_load_quantized_and_measure(tmp_path, monkeypatch):
    pytest.importorskip("torch")  # the BERT checkpoint is written by transformers
    checkpoint = benchmark._write_checkpoint("tiny-config", tmp_path)
    memory = benchmark.worker_quantized_memory(_args(base_format="nf4", checkpoint=checkpoint))
    # in this process freed memory is reused, so a tiny load may add nothing to the resident set: the
    # window's peak can only grow from the load to the steps
    assert memory["peak_rss_bytes"] >= memory["load_peak_rss_bytes"]
    assert memory["xla_argument_bytes"] > 0 and memory["xla_temp_bytes"] > 0
    assert isinstance(benchmark.worker_load_memory(_args(base_format="int8", checkpoint=checkpoint))["load_peak_rss_bytes"], int)

    monkeypatch.setattr(benchmark, "DECODER_SIZE", dict(vocab=64, hidden=32, layers=2, heads=4))
    monkeypatch.setattr(benchmark, "DECODER_REMAT", (False,))  # remat=True and int8 run the same code, only slower
    monkeypatch.setattr(benchmark, "DECODER_FORMATS", ("fp32", "nf4"))
    decoder = benchmark._write_checkpoint("decoder", tmp_path)
    result = benchmark.worker_decoder(_args(checkpoint=decoder, batch=2, seq=8))
    assert {f"{f}_xla_bytes" for f in ("fp32", "nf4")} <= set(result)
    assert result["nf4_xla_bytes"] < result["fp32_xla_bytes"] and result["nf4_step_s"] > 0
    memory = benchmark.worker_decoder_memory(_args(checkpoint=decoder, batch=2, seq=8, base_format="nf4"))
    assert memory["peak_rss_bytes"] >= memory["load_peak_rss_bytes"]


def test_quantized_base_report_from_worker_results(tmp_path, monkeypatch):
    step = {"fp32": 800, "int8": 400, "nf4": 200}
    rss = {"fp32": 2**30, "int8": 2**29, "nf4": 2**28}
    monkeypatch.setattr(benchmark, "_write_checkpoint", lambda model, folder: "" if model == "minilm" else "ckpt")
    monkeypatch.setattr(benchmark, "WORKERS", {
        "decoder": lambda a: {**{f"{f}_step_s": 1.0 for f in step}, **{f"{f}_xla_bytes": b for f, b in step.items()},
                              **{f"{f}_remat_xla_bytes": b / 2 for f, b in step.items()}},
        "decoder-memory": lambda a: {"load_peak_rss_bytes": rss[a.base_format], "peak_rss_bytes": 2 * rss[a.base_format]},
        "quantized": lambda a: {**{f"{f}_step_s": 2.0 for f in step}, **{f"{f}_kernel_bytes": b for f, b in step.items()}},
        "quantized-memory": lambda a: {"load_peak_rss_bytes": 1, "peak_rss_bytes": rss[a.base_format],
                                       "xla_argument_bytes": step[a.base_format], "xla_temp_bytes": 1000},
        "load-memory": lambda a: {"load_peak_rss_bytes": rss[a.base_format] // 4}})
    for model in ("decoder", "tiny-config"):
        report = benchmark.main(["--model", model, "--quantized-base", "--in-process", "--out", str(tmp_path / model)])
        rows = {row[1]: row for row in report["rows"]}
        if model == "decoder":
            assert rows["nf4"][5] == 0.25 and rows["nf4"][6] == 0.25  # step bytes / fp32, with remat
            assert rows["int8"][8] == 0.5 and rows["nf4"][10] == 0.25  # load RSS / fp32, load + steps / fp32
        else:
            assert rows["int8"][5] == 1400 / 1800 and rows["nf4"][8] == 0.25  # XLA bytes / fp32; the load alone
        assert (tmp_path / model / "quantized_base.md").read_text().count("nf4") == 1
