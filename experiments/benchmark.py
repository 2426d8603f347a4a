"""LoRA speed and memory, side by side with full fine-tuning and with PyTorch + PEFT.

    python -m experiments.benchmark [--model minilm|bert-base-config|PATH] [--batch 32] [--seq 128]
                                    [--steps 10] [--out DIR] [--peft] [--no-scaling]

Every figure is a median over ``--steps`` timed steps after warm-up (compile time is reported
separately). Each training mode runs in its own process, so peak memories do not mix; the
ours-vs-PEFT timings interleave the two (A B A B ...) in one process, so drift hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .common import (machine_info, make_parser, output_dir, positive_int, print_table, run_cli, tree_bytes,
                     write_json)

TARGETS = ("query", "value")
RANK = 8
REMAT = "dots"  # the memory-saving variant measured beside the default LoRA run
# XLA's CPU scheduler favours concurrency over memory by default, which keeps rematerialised activations
# alive anyway; the remat run turns it off (a process-wide flag, so only in that worker's process).
REMAT_XLA_FLAGS = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
# Randomly initialised encoders of a given shape (no download): the bert-base shape, and a tiny one for smoke runs.
CONFIG_MODELS = {
    "bert-base-config": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "tiny-config": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=2000, max_position_embeddings=64),
}


# ----------------------------------------------------------------------------------- shared setup


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def median_time(fn: Callable[[], Any], steps: int, warmup: int = 2) -> tuple[float, float]:
    """(first call incl. compile, median of ``steps`` later calls), in seconds."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def jax_setup(model_name: str, batch: int, seq: int, rank: int = RANK, remat: str = "none"):
    """Our model, base params, LoRA model/params/mask/config and a batch, for ``model_name``
    (``remat``: the encoder's per-layer activation checkpointing, see ``BertConfig.remat``)."""
    import jax
    import jax.numpy as jnp

    import lora_jax
    from lora_jax.models import BertConfig, BertForSequenceClassification, from_pretrained

    if model_name in CONFIG_MODELS:
        model = BertForSequenceClassification(BertConfig(num_labels=3, remat=remat, **CONFIG_MODELS[model_name]))
        params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    else:
        model, params, _ = from_pretrained("packaged:minilm" if model_name == "minilm" else model_name, num_labels=3,
                                           with_tokenizer=False, remat=remat)
    rng = np.random.RandomState(0)
    vocab = model.config.vocab_size
    data = {"ids": jnp.asarray(rng.randint(vocab // 2, vocab, (batch, seq)), jnp.int32),
            "mask": jnp.ones((batch, seq), jnp.int32), "labels": jnp.asarray(rng.randint(0, 3, batch), jnp.int32)}
    config = lora_jax.LoraConfig(rank=rank, alpha=2 * rank, targets=TARGETS, modules_to_save=("classifier",))
    lora_model = lora_jax.lora(model, config)
    lora_params = lora_jax.init_lora_params(lora_model, params, jax.random.key(1), data["ids"][:1, :8])
    return model, params, lora_model, lora_params, config, data


def jax_step(net, params, mask, data):
    """Our jitted train step on ``data``: (step_fn, TrainStep, initial state); step_fn runs one step."""
    import jax
    import optax

    import lora_jax

    def loss_fn(p, batch, rng):
        logits = net.apply({"params": p}, batch["ids"], batch["mask"], deterministic=False,
                           rngs=lora_jax.dropout_rngs(rng, "dropout", "lora_dropout"))
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    tx = optax.adamw(1e-4)
    holder = {"state": lora_jax.TrainState.create(params, mask, tx, jax.random.key(0))}
    step = lora_jax.make_train_step(loss_fn, tx, mask)

    def run():
        holder["state"], metrics = step(holder["state"], data)
        jax.block_until_ready(metrics["loss"])

    return run, step, holder


def jax_train_step(net, params, mask, data, steps: int) -> dict[str, Any]:
    import lora_jax

    run, step, holder = jax_step(net, params, mask, data)
    start = time.perf_counter()
    stats = step.compiled_stats(holder["state"], data)  # lowers and compiles the step: that is the compile time
    compile_s = time.perf_counter() - start
    first, median = median_time(run, steps)
    trainable, total = lora_jax.count_parameters(params, mask)
    return {"step_s": median, "first_call_s": first, "compile_s": compile_s, "flops": stats["flops"],
            "xla_temp_bytes": stats["temp_bytes"],
            "opt_state_bytes": tree_bytes(holder["state"].opt_state), "trainable_params": trainable,
            "total_params": total}


# ----------------------------------------------------------------------------------- workers


def worker_train(args) -> dict[str, Any]:
    """One training mode ('full' or 'lora') of our implementation; peak memory is this process's."""
    import jax

    import lora_jax

    model, params, lora_model, lora_params, config, data = jax_setup(args.model, args.batch, args.seq, args.rank,
                                                                     args.remat)
    if args.mode == "full":
        result = jax_train_step(model, params, jax.tree.map(lambda _: True, params), data, args.steps)
    else:
        result = jax_train_step(lora_model, lora_params, lora_jax.trainable_mask(lora_params, config), data, args.steps)
    return {**result, "peak_rss_bytes": peak_rss_bytes()}


def worker_forward(args) -> dict[str, Any]:
    """Inference: base, LoRA unmerged, LoRA merged; interleaved so drift hits all three."""
    import jax

    import lora_jax

    model, params, lora_model, lora_params, config, data = jax_setup(args.model, args.batch, args.seq, args.rank)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(lora_params)
    lora_params = jax.tree_util.tree_unflatten(treedef, [0.01 * np.ones(v.shape, v.dtype) if p[-1].key == "lora_B" else v
                                                         for p, v in leaves])  # a trained-looking adapter
    merged = lora_jax.merge(lora_params, config)
    fns = {"base": (jax.jit(model.apply), params), "lora_unmerged": (jax.jit(lora_model.apply), lora_params),
           "lora_merged": (jax.jit(model.apply), merged)}
    for fn, p in fns.values():  # compile
        jax.block_until_ready(fn({"params": p}, data["ids"], data["mask"]))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.steps):
        for name, (fn, p) in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn({"params": p}, data["ids"], data["mask"]))
            times[name].append(time.perf_counter() - start)
    return {f"{k}_s": statistics.median(v) for k, v in times.items()}


def torch_setup(model_name: str, batch: int, seq: int, mode: str, rank: int = RANK):
    import peft
    import torch
    import transformers

    from lora_jax.models import packaged_minilm_path

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    if model_name in CONFIG_MODELS:
        model = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=3,
                                                                                   **CONFIG_MODELS[model_name]))
    else:
        path = str(packaged_minilm_path()) if model_name == "minilm" else model_name
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    if mode == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS),
                                                           task_type="SEQ_CLS"))
    model.train()
    rng = np.random.RandomState(0)
    ids = torch.tensor(rng.randint(model.config.vocab_size // 2, model.config.vocab_size, (batch, seq)))
    labels = torch.tensor(rng.randint(0, 3, batch))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def worker_peft_memory(args) -> dict[str, Any]:
    """PyTorch + PEFT training alone in a process: its step time and peak memory."""
    _, step = torch_setup(args.model, args.batch, args.seq, args.mode, args.rank)
    first, median = median_time(step, max(3, args.steps // 3))
    return {"step_s": median, "first_call_s": first, "peak_rss_bytes": peak_rss_bytes()}


def worker_versus_peft(args) -> dict[str, Any]:
    """Our LoRA step vs PEFT's (and forwards vs transformers), alternating A B A B in one process."""
    import jax
    import torch

    import lora_jax

    model, params, lora_model, lora_params, config, data = jax_setup(args.model, args.batch, args.seq, args.rank)
    ours = jax_step(lora_model, lora_params, lora_jax.trainable_mask(lora_params, config), data)[0]
    base_fwd = jax.jit(model.apply)
    torch_model, theirs = torch_setup(args.model, args.batch, args.seq, "lora", args.rank)
    ids = torch.tensor(np.asarray(data["ids"]))

    def ours_fwd():
        jax.block_until_ready(base_fwd({"params": params}, data["ids"], data["mask"]))

    def theirs_fwd():  # transformers' own forward: PEFT's adapter layers switched off
        with torch.no_grad(), torch_model.disable_adapter():
            torch_model(input_ids=ids, attention_mask=torch.ones_like(ids))

    pairs = {"train": (ours, theirs), "forward": (ours_fwd, theirs_fwd)}
    result = {}
    for name, (a, b) in pairs.items():
        torch_model.train(name == "train")  # dropout on for training steps (ours too), off for inference
        a(), b(), a(), b()  # warm-up and compile
        times_a, times_b = [], []
        for _ in range(args.steps):
            for fn, times in ((a, times_a), (b, times_b)):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        result[f"ours_{name}_s"], result[f"peft_{name}_s"] = statistics.median(times_a), statistics.median(times_b)
    result["torch_threads"] = torch.get_num_threads()
    return result


def worker_scaling(args) -> dict[str, Any]:
    """LoRA step time against rank and against sequence length."""
    import lora_jax

    out: dict[str, Any] = {"rank": {}, "seq": {}}
    for rank in (1, 4, 16, 64):
        _, _, lora_model, lora_params, config, data = jax_setup(args.model, args.batch, args.seq, rank)
        run = jax_step(lora_model, lora_params, lora_jax.trainable_mask(lora_params, config), data)[0]
        out["rank"][rank] = median_time(run, args.steps)[1]
    for seq in (64, 128, 256):
        _, _, lora_model, lora_params, config, data = jax_setup(args.model, args.batch, seq, RANK)
        run = jax_step(lora_model, lora_params, lora_jax.trainable_mask(lora_params, config), data)[0]
        out["seq"][seq] = median_time(run, args.steps)[1]
    return out


WORKERS = {"train": worker_train, "forward": worker_forward, "peft-memory": worker_peft_memory,
           "versus-peft": worker_versus_peft, "scaling": worker_scaling}


# ----------------------------------------------------------------------------------- driver


def spawn(task: str, args, xla_flags: str = "", **overrides) -> dict[str, Any]:
    """Run one worker in a fresh process (``xla_flags`` appended to its XLA_FLAGS) and return its JSON result."""
    settings = {"model": args.model, "batch": args.batch, "seq": args.seq, "steps": args.steps, "rank": RANK,
                "mode": "lora", "remat": "none", **overrides}
    cmd = [sys.executable, "-m", "experiments.benchmark", "--worker", task] + \
          [x for k, v in settings.items() for x in (f"--{k}", str(v))]
    print(f"  running {task} {overrides or ''} ...", flush=True)
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {task} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def torch_available() -> bool:
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def verdict(name: str, value: float, bound: float) -> dict[str, Any]:
    return {"target": name, "measured": round(value, 4), "bound": bound, "met": bool(value <= bound)}


def benchmark_model(model: str, args) -> dict[str, Any]:
    print(f"[{model}] batch {args.batch} x {args.seq} tokens")
    a = argparse.Namespace(**{**vars(args), "model": model})
    full = spawn("train", a, mode="full")
    lora = spawn("train", a, mode="lora")
    lora_remat = spawn("train", a, REMAT_XLA_FLAGS, mode="lora", remat=REMAT)
    forward = spawn("forward", a)
    result = {"model": model, "full": full, "lora": lora, "lora_remat": lora_remat, "forward": forward}
    if args.peft:
        if torch_available():
            result["peft_memory"] = spawn("peft-memory", a, mode="lora")
            result["versus_peft"] = spawn("versus-peft", a)
        else:
            print("  --peft: torch/peft not installed, skipped")
    return result


def summarize(results: list[dict[str, Any]], scaling: dict | None) -> tuple[str, list[dict]]:
    lines, verdicts = [], []
    rows = []
    for r in results:
        for label, key in (("full FT", "full"), ("LoRA r=8 q,v", "lora"), (f"LoRA r=8 q,v, remat={REMAT}", "lora_remat")):
            run = r[key]
            rows.append([r["model"], label, run["step_s"], run["compile_s"], f"{run['flops']:.3e}",
                         run["opt_state_bytes"], run["xla_temp_bytes"] / 2**30, run["peak_rss_bytes"] / 2**30])
        if "peft_memory" in r:
            rows.append([r["model"], "PEFT LoRA (torch)", r["peft_memory"]["step_s"], "-", "-", "-", "-",
                         r["peft_memory"]["peak_rss_bytes"] / 2**30])
    lines.append(print_table("Train step (median)", ["model", "mode", "step (s)", "compile (s)", "XLA FLOPs",
                                                      "optimizer state (bytes)", "XLA temp (GiB)", "peak RSS (GiB)"],
                             rows))
    ratio_rows = []
    for r in results:
        full, lora, fwd = r["full"], r["lora"], r["forward"]
        step_ratio, flop_ratio = lora["step_s"] / full["step_s"], lora["flops"] / full["flops"]
        opt_ratio = lora["opt_state_bytes"] / full["opt_state_bytes"]
        merged, unmerged = fwd["lora_merged_s"] / fwd["base_s"], fwd["lora_unmerged_s"] / fwd["base_s"]
        row = [r["model"], step_ratio, flop_ratio, opt_ratio, merged, unmerged]
        if r["model"] == "bert-base-config":
            verdicts.append(verdict("LoRA step / full step (bert-base config)", step_ratio, 0.75))
        verdicts += [verdict(f"merged forward / base forward ({r['model']})", merged, 1.02),
                     verdict(f"unmerged LoRA forward / base forward ({r['model']})", unmerged, 1.10),
                     verdict(f"LoRA optimizer state / full ({r['model']})", opt_ratio, 0.01)]
        if "versus_peft" in r:
            vs = r["versus_peft"]
            ours_vs_peft = vs["ours_train_s"] / vs["peft_train_s"]
            peft_rss = r["peft_memory"]["peak_rss_bytes"]
            row += [ours_vs_peft, vs["ours_forward_s"] / vs["peft_forward_s"], lora["peak_rss_bytes"] / peft_rss,
                    r["lora_remat"]["peak_rss_bytes"] / peft_rss]
            verdicts += [verdict(f"lora_jax LoRA step / PEFT LoRA step ({r['model']})", ours_vs_peft, 0.80),
                         verdict(f"peak memory lora_jax LoRA / PEFT LoRA ({r['model']})",
                                 lora["peak_rss_bytes"] / peft_rss, 1.0),
                         verdict(f"peak memory lora_jax LoRA remat={REMAT} / PEFT LoRA ({r['model']})",
                                 r["lora_remat"]["peak_rss_bytes"] / peft_rss, 1.0)]
        else:
            row += ["-", "-", "-", "-"]
        ratio_rows.append(row)
    lines.append(print_table("Ratios", ["model", "LoRA/full step", "LoRA/full FLOPs", "LoRA/full opt state",
                                        "merged/base fwd", "unmerged/base fwd", "ours/PEFT LoRA step",
                                        "ours/torch base fwd", "ours/PEFT peak mem",
                                        f"ours remat={REMAT}/PEFT peak mem"], ratio_rows))
    if scaling:
        lines.append(print_table(f"LoRA step vs rank ({scaling['model']})", ["rank", "step (s)"],
                                 [[k, v] for k, v in scaling["rank"].items()]))
        lines.append(print_table(f"LoRA step vs sequence length ({scaling['model']})", ["seq", "step (s)"],
                                 [[k, v] for k, v in scaling["seq"].items()]))
    lines.append(print_table("Targets", ["target", "measured", "bound", "verdict"],
                             [[v["target"], v["measured"], v["bound"], "met" if v["met"] else "NOT met"]
                              for v in verdicts]))
    return "\n\n".join(lines), verdicts


def plot_scaling(scaling: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    ranks = [int(k) for k in scaling["rank"]]
    ax1.plot(ranks, list(scaling["rank"].values()), "o-")
    ax1.set(xscale="log", xlabel="LoRA rank", ylabel="train step (s)", title="step time vs rank")
    seqs = [int(k) for k in scaling["seq"]]
    ax2.plot(seqs, list(scaling["seq"].values()), "o-")
    ax2.set(xlabel="sequence length", ylabel="train step (s)", title="step time vs sequence length")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(f"LoRA r=8 on query+value, {scaling['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = make_parser("benchmark", __doc__)
    p.add_argument("--model", default=None, help="minilm | bert-base-config | tiny-config | a model folder; "
                   "none: minilm and bert-base-config")
    p.add_argument("--batch", type=positive_int, default=32, help="examples per step")
    p.add_argument("--seq", type=positive_int, default=128, help="tokens per example")
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps per figure (after warm-up)")
    p.add_argument("--out", default=None, help="output folder (default runs/benchmark/<timestamp>)")
    p.add_argument("--peft", action="store_true", help="also measure PyTorch + PEFT (needs torch and peft)")
    p.add_argument("--no-scaling", action="store_true", help="skip the rank / sequence-length sweep")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--mode", default="lora", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=RANK, help=argparse.SUPPRESS)
    p.add_argument("--remat", default="none", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return {}
    with output_dir(args.out, "benchmark") as out:
        return _run(args, out)


def _run(args, out: Path) -> dict[str, Any]:
    models = [args.model] if args.model else ["minilm", "bert-base-config"]
    start = time.perf_counter()
    results = [benchmark_model(m, args) for m in models]
    scaling = None
    if not args.no_scaling:
        print(f"[{models[0]}] scaling sweep")
        scaling = {"model": models[0], **spawn("scaling", argparse.Namespace(**{**vars(args), "model": models[0]}))}
    markdown, verdicts = summarize(results, scaling)
    report = {"machine": machine_info(), "settings": {k: v for k, v in vars(args).items() if k != "worker"},
              "results": results, "scaling": scaling, "verdicts": verdicts, "wall_s": time.perf_counter() - start}
    if torch_available():
        import torch

        report["machine"]["torch"] = torch.__version__
    write_json(out / "results.json", report)
    (out / "benchmark.md").write_text(markdown + "\n")
    if scaling:
        plot_scaling(scaling, out / "scaling.png")
    for v in verdicts:
        print(f"{'met    ' if v['met'] else 'NOT met'}  {v['target']}: {v['measured']} (bound {v['bound']})")
    print(f"results: {out / 'results.json'}  table: {out / 'benchmark.md'}")
    return report


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
