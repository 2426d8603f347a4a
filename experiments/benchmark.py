"""LoRA speed and memory, side by side with full fine-tuning and with PyTorch + PEFT.

    python -m experiments.benchmark [--model minilm|bert-base-config|tiny-config|PATH] [--batch 32] [--seq 128]
                                    [--steps 10] [--out DIR] [--peft] [--no-scaling]

Figures are medians over ``--steps`` timed steps after warm-up (compile time is reported apart).
Every ratio is measured in one process, the two sides alternating (A B A B ...) so that a change in
the machine's load hits both; absolute times move with the load (±15% on a shared machine), the
ratios much less. Each training mode also runs alone in its own process for its peak memory.
Dropout is on in every training step (ours and PEFT's: the models' hidden and attention dropout).

``--moe`` measures LoRA on mixture-of-experts weights instead (``experiments.moe_benchmark``).

Reported: our LoRA step against PEFT's in float32 and in bfloat16 compute (PEFT under
``torch.autocast``), our inference forward against transformers', LoRA against full fine-tuning,
merged and unmerged LoRA forwards against the base forward, peak memory against PEFT's, and (unless
``--no-scaling``) the LoRA step against rank, sequence length and batch size (``scaling.png``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .common import (CONFIG_MODELS, config_model, interleaved, machine_info, make_parser, output_dir, positive_int,
                     print_table, run_cli, tree_bytes, write_json)

TARGETS = ("query", "value")
RANK = 8
REMAT = "dots"  # the experiments' default (per-layer activation checkpointing); 'none' is measured beside it
# Every worker is a ``python -m experiments.benchmark`` process, so it runs with the XLA flag that
# ``experiments/__init__.py`` sets (the concurrency-optimised CPU scheduler off).
SCALING = {"rank": (1, 4, 16, 64), "seq": (64, 128, 256), "batch": (8, 16, 32)}


# ----------------------------------------------------------------------------------- timing


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _proc_status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------- our side


def jax_setup(model_name: str, batch: int, seq: int, rank: int = RANK, remat: str = "none", dtype: str = "float32"):
    """Our model, base params, LoRA model/params/config and a batch, for ``model_name``
    (``remat``: per-layer activation checkpointing; ``dtype``: the compute dtype, see ``BertConfig``)."""
    import jax
    import jax.numpy as jnp

    import lora_jax
    from lora_jax.models import from_pretrained

    if model_name in CONFIG_MODELS:
        model, params = config_model(model_name, 3, remat=remat, dtype=dtype)
    else:
        model, params, _ = from_pretrained("packaged:minilm" if model_name == "minilm" else model_name, num_labels=3,
                                           with_tokenizer=False, remat=remat, dtype=dtype)
    rng = np.random.RandomState(0)
    vocab = model.config.vocab_size
    data = {"ids": jnp.asarray(rng.randint(vocab // 2, vocab, (batch, seq)), jnp.int32),
            "mask": jnp.ones((batch, seq), jnp.int32), "labels": jnp.asarray(rng.randint(0, 3, batch), jnp.int32)}
    config = lora_jax.LoraConfig(rank=rank, alpha=2 * rank, targets=TARGETS, modules_to_save=("classifier",))
    lora_model = lora_jax.lora(model, config)
    lora_params = lora_jax.init_lora_params(lora_model, params, jax.random.key(1), data["ids"][:1, :8])
    return model, params, lora_model, lora_params, config, data


def jax_step(net, params, mask, data, loss_fn=None):
    """Our jitted train step on ``data`` with dropout on: (run_one_step, TrainStep, state holder).
    ``loss_fn(params, batch, rng)``: the classifier's cross-entropy unless given."""
    import jax
    import optax

    import lora_jax

    def classifier_loss(p, batch, rng):
        logits = net.apply({"params": p}, batch["ids"], batch["mask"], deterministic=False,
                           rngs=lora_jax.dropout_rngs(rng, "dropout", "lora_dropout"))
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    loss_fn = loss_fn or classifier_loss

    tx = optax.adamw(1e-4)
    holder = {"state": lora_jax.TrainState.create(params, mask, tx, jax.random.key(0))}
    step = lora_jax.make_train_step(loss_fn, tx, mask)

    def run():
        holder["state"], metrics = step(holder["state"], data)
        jax.block_until_ready(metrics["loss"])

    return run, step, holder


def jax_forward(net, params, data):
    """Our jitted inference forward (dropout off)."""
    import jax

    forward = jax.jit(net.apply)
    return lambda: jax.block_until_ready(forward({"params": params}, data["ids"], data["mask"]))


def lora_step(args, dtype: str = "float32", remat: str = REMAT, rank: int = RANK, seq: int | None = None,
              batch: int | None = None):
    import lora_jax

    _, _, lora_model, lora_params, config, data = jax_setup(args.model, batch or args.batch, seq or args.seq, rank,
                                                            remat, dtype)
    return jax_step(lora_model, lora_params, lora_jax.trainable_mask(lora_params, config), data)


# ----------------------------------------------------------------------------------- PyTorch + PEFT


def torch_setup(model_name: str, batch: int, seq: int, mode: str, rank: int = RANK, dtype: str = "float32"):
    """transformers' model (+ PEFT LoRA in mode 'lora') with AdamW; returns (model, train_step, forward)."""
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
    rng = np.random.RandomState(0)
    vocab = model.config.vocab_size
    ids = torch.tensor(rng.randint(vocab // 2, vocab, (batch, seq)))
    labels = torch.tensor(rng.randint(0, 3, batch))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bfloat16" else contextlib.nullcontext

    def step():
        model.train()
        with autocast():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward():  # transformers' own forward: PEFT's adapter layers switched off, dropout off
        model.eval()
        context = model.disable_adapter() if mode == "lora" else contextlib.nullcontext()
        with torch.no_grad(), context:
            model(input_ids=ids, attention_mask=torch.ones_like(ids))

    return model, step, forward


def compiled_stats(lowered: Any) -> dict[str, float]:
    """XLA's own figures for a lowered step, deterministic unlike wall time: ``flops``, ``temp_bytes``
    (activations and scratch beside the arguments) and ``argument_bytes``."""
    compiled = lowered.compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    memory = compiled.memory_analysis()
    return {"flops": float(cost["flops"]), "temp_bytes": float(memory.temp_size_in_bytes),
            "argument_bytes": float(memory.argument_size_in_bytes)}


def torch_available() -> bool:
    """Whether torch and peft are installed (found, not imported: importing torch takes seconds)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("torch", "peft"))


# ----------------------------------------------------------------------------------- workers


def worker_train(args) -> dict[str, Any]:
    """One training mode ('full' or 'lora') of ours, alone in this process (for its peak memory)."""
    import jax
    import time as _time

    import lora_jax

    model, params, lora_model, lora_params, config, data = jax_setup(args.model, args.batch, args.seq, args.rank,
                                                                     args.remat, args.dtype)
    net, p, mask = ((model, params, jax.tree.map(lambda _: True, params)) if args.mode == "full" else
                    (lora_model, lora_params, lora_jax.trainable_mask(lora_params, config)))
    run, step, holder = jax_step(net, p, mask, data)
    start = _time.perf_counter()
    stats = compiled_stats(step.lower(holder["state"], data))  # compiling the step: that is the compile time
    compile_s = _time.perf_counter() - start
    timing = interleaved({"step": run}, args.steps)["step"]
    trainable, total = lora_jax.count_parameters(p, mask)
    return {"step_s": timing["median_s"], "first_call_s": timing["first_s"], "compile_s": compile_s,
            "flops": stats["flops"], "xla_temp_bytes": stats["temp_bytes"],
            "opt_state_bytes": tree_bytes(holder["state"].opt_state), "trainable_params": trainable,
            "total_params": total, "peak_rss_bytes": peak_rss_bytes()}


def worker_ratios(args) -> dict[str, Any]:
    """In one process, alternating: LoRA vs full step; merged, unmerged and base forwards."""
    import jax

    import lora_jax

    model, params, lora_model, lora_params, config, data = jax_setup(args.model, args.batch, args.seq, args.rank,
                                                                     args.remat)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(lora_params)
    trained = jax.tree_util.tree_unflatten(treedef, [0.01 * np.ones(v.shape, v.dtype) if p[-1].key == "lora_B" else v
                                                     for p, v in leaves])  # a trained-looking adapter
    merged = lora_jax.merge(trained, config)
    steps = interleaved({"lora": jax_step(lora_model, lora_params, lora_jax.trainable_mask(lora_params, config),
                                          data)[0],
                         "full": jax_step(model, params, jax.tree.map(lambda _: True, params), data)[0]}, args.steps)
    forwards = interleaved({"base": jax_forward(model, params, data),
                            "lora_unmerged": jax_forward(lora_model, trained, data),
                            "lora_merged": jax_forward(model, merged, data)}, args.steps)
    return {"lora_step_s": steps["lora"]["median_s"], "full_step_s": steps["full"]["median_s"],
            **{f"{k}_s": v["median_s"] for k, v in forwards.items()}}


def worker_versus_peft(args) -> dict[str, Any]:
    """Ours vs PyTorch + PEFT in one process, alternating: LoRA steps in float32 and bfloat16, and the
    inference forward (ours vs transformers')."""
    import torch

    import lora_jax

    model, params, lora_model, lora_params, config, data = jax_setup(args.model, args.batch, args.seq, args.rank,
                                                                     args.remat)
    ours_fp32 = jax_step(lora_model, lora_params, lora_jax.trainable_mask(lora_params, config), data)[0]
    _, peft_fp32, theirs_forward = torch_setup(args.model, args.batch, args.seq, "lora", args.rank)
    fp32 = interleaved({"ours_fp32": ours_fp32, "peft_fp32": peft_fp32}, args.steps)
    forwards = interleaved({"ours": jax_forward(model, params, data), "theirs": theirs_forward}, args.steps)
    bf16 = {}
    if not args.no_bf16:
        # bf16 apart: PEFT's bf16 autocast takes about a minute a step on CPUs without bf16 instructions, so
        # past a time budget this pair stops after one timed round (its first calls are the warm-up).
        _, peft_bf16, _ = torch_setup(args.model, args.batch, args.seq, "lora", args.rank, dtype="bfloat16")
        bf16 = interleaved({"ours_bf16": lora_step(args, dtype="bfloat16", remat=args.remat)[0],
                            "peft_bf16": peft_bf16}, args.steps, warmup=0, max_seconds=60, min_rounds=1)
    steps = {**fp32, **bf16}
    return {**{f"{k}_step_s": v["median_s"] for k, v in steps.items()},
            **{f"{k}_rounds": v["rounds"] for k, v in steps.items()}, "rounds": fp32["ours_fp32"]["rounds"],
            "ours_forward_s": forwards["ours"]["median_s"], "transformers_forward_s": forwards["theirs"]["median_s"],
            "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def worker_peft_memory(args) -> dict[str, Any]:
    """PyTorch + PEFT training alone in a process: its step time and peak memory."""
    _, step, _ = torch_setup(args.model, args.batch, args.seq, args.mode, args.rank)
    timing = interleaved({"step": step}, max(3, args.steps // 2))["step"]
    return {"step_s": timing["median_s"], "first_call_s": timing["first_s"], "peak_rss_bytes": peak_rss_bytes()}


def worker_scaling(args) -> dict[str, Any]:
    """LoRA step time against rank, sequence length and batch size (one axis varied at a time)."""
    out: dict[str, Any] = {axis: {} for axis in SCALING}
    for axis, values in SCALING.items():
        for value in values:
            run = lora_step(args, remat=args.remat, **{axis: value})[0]
            out[axis][value] = interleaved({"step": run}, 3, warmup=0)["step"]["median_s"]
    return out


def worker_quantized(args) -> dict[str, Any]:
    """The LoRA step on an fp32, int8 and NF4 base (every encoder and pooler kernel quantized), alternating
    in one process, and the bytes of those kernels."""
    import lora_jax

    _, _, lora_model, lora_params, config, data = jax_setup(args.model, args.batch, args.seq, args.rank, args.remat)
    trees = {"fp32": lora_params, **{fmt: lora_jax.quantize(lora_params, config, fmt, layers="all")
                                     for fmt in ("int8", "nf4")}}

    def kernel_bytes(tree) -> int:  # encoder and pooler kernels; the classifier trains and stays fp32
        from flax import traverse_util

        from lora_jax.quantize import QuantizedKernel

        return sum(v.nbytes if isinstance(v, QuantizedKernel) else int(np.asarray(v).nbytes)
                   for key, v in traverse_util.flatten_dict(tree).items() if key[-1] == "kernel" and "classifier" not in key)

    steps = interleaved({fmt: jax_step(lora_model, tree, lora_jax.trainable_mask(tree, config), data)[0]
                         for fmt, tree in trees.items()}, args.steps)
    return {**{f"{fmt}_step_s": v["median_s"] for fmt, v in steps.items()},
            **{f"{fmt}_kernel_bytes": kernel_bytes(tree) for fmt, tree in trees.items()}}


def worker_quantized_memory(args) -> dict[str, Any]:
    """Memory of loading a BERT model and training LoRA on it in one base format (``--base-format``), in a
    process of its own. The base is loaded with ``from_pretrained(..., quantize=fmt)`` (each kernel
    quantized as it is read; ``--checkpoint``: a folder written by ``transformers``, else the packaged
    MiniLM), then 3 steps run. Reported: XLA's argument and temporary bytes of the compiled step, and
    the process's peak RSS less its RSS after imports (load + compile + steps)."""
    import jax

    import lora_jax
    from lora_jax.models import from_pretrained

    reset_peak_rss()  # the window starts here (a no-op in a fresh process; needed in one that ran before)
    before = _proc_status_bytes("VmRSS")
    fmt = None if args.base_format == "fp32" else args.base_format
    config = lora_jax.LoraConfig(rank=args.rank, alpha=2 * args.rank, targets=TARGETS, modules_to_save=("classifier",))
    model, params, _ = from_pretrained(args.checkpoint or "packaged:minilm", num_labels=3, with_tokenizer=False,
                                       remat=args.remat, quantize=fmt, quantize_config=config)
    jax.block_until_ready(params)
    loaded = _proc_status_bytes("VmHWM")
    rng = np.random.RandomState(0)
    vocab = model.config.vocab_size
    data = {"ids": jax.numpy.asarray(rng.randint(vocab // 2, vocab, (args.batch, args.seq)), "int32"),
            "mask": jax.numpy.ones((args.batch, args.seq), "int32"),
            "labels": jax.numpy.asarray(rng.randint(0, 3, args.batch), "int32")}
    lora_model = lora_jax.lora(model, config)
    params = lora_jax.init_lora_params(lora_model, params, jax.random.key(1), data["ids"][:1, :8])
    run, step, holder = jax_step(lora_model, params, lora_jax.trainable_mask(params, config), data)
    del params
    xla = compiled_stats(step.lower(holder["state"], data))  # XLA's own buffers: deterministic, unlike RSS
    for _ in range(3):
        run()
    return {"rss_after_imports_bytes": before, "load_peak_rss_bytes": loaded - before,
            "peak_rss_bytes": _proc_status_bytes("VmHWM") - before, "xla_argument_bytes": xla["argument_bytes"],
            "xla_temp_bytes": xla["temp_bytes"]}


def _decoder_setup(args, remat: bool, params: Any = None):
    """The decoder, its LoRA config (every linear layer of every block), a batch, and the LoRA model."""
    import jax
    import jax.numpy as jnp

    import lora_jax
    from .decoder import LINEAR_LAYERS, Decoder

    model = Decoder(remat=remat, **DECODER_SIZE)
    config = lora_jax.LoraConfig(rank=args.rank, alpha=2 * args.rank, targets=LINEAR_LAYERS)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, model.vocab, (args.batch, args.seq)), jnp.int32)
    return model, config, ids, lora_jax.lora(model, config)


def _decoder_step(lora_model, params, config, ids):
    """``jax_step`` with the decoder's next-token loss on the batch ``ids``."""
    import lora_jax
    from .decoder import next_token_loss

    return jax_step(lora_model, params, lora_jax.trainable_mask(params, config), ids,
                    loss_fn=lambda p, batch, rng: next_token_loss(lora_model.apply({"params": p}, batch), batch))


def _decoder_params(args, lora_model, ids, fmt: str | None, config):
    """The decoder's LoRA params, its base read from ``--checkpoint`` (``save_params``' file), each
    kernel quantized as it is read when ``fmt`` is set."""
    import jax

    import lora_jax

    shapes = jax.eval_shape(lora_model.init, jax.random.key(0), ids[:1, :8])["params"]
    base_shapes = _without_lora(shapes)
    convert = None if fmt is None else lora_jax.KernelQuantizer(config, fmt, "all")
    base = lora_jax.read_params(args.checkpoint, base_shapes, convert)
    return lora_jax.init_lora_params(lora_model, base, jax.random.key(1), ids[:1, :8])


def _without_lora(tree: dict) -> dict:
    return {k: _without_lora(v) if isinstance(v, dict) else v for k, v in tree.items() if not k.startswith("lora_")}


def worker_decoder(args) -> dict[str, Any]:
    """The weight-dominated decoder on fp32, int8 and NF4 bases: XLA argument + temporary bytes of the LoRA
    step with and without remat, and the step times alternating in one process (no remat)."""
    out: dict[str, Any] = {}
    runs = {}
    for remat in DECODER_REMAT:
        model, config, ids, lora_model = _decoder_setup(args, remat)
        for fmt in DECODER_FORMATS:
            params = _decoder_params(args, lora_model, ids, None if fmt == "fp32" else fmt, config)
            run, step, holder = _decoder_step(lora_model, params, config, ids)
            xla = compiled_stats(step.lower(holder["state"], ids))
            out[f"{fmt}{'_remat' if remat else ''}_xla_bytes"] = xla["argument_bytes"] + xla["temp_bytes"]
            out[f"{fmt}{'_remat' if remat else ''}_xla_temp_bytes"] = xla["temp_bytes"]
            if not remat:
                runs[fmt] = run
            del params
    steps = interleaved(runs, args.steps)
    out.update({f"{fmt}_step_s": v["median_s"] for fmt, v in steps.items()})
    return out


def worker_decoder_memory(args) -> dict[str, Any]:
    """Peak RSS of loading the decoder (``read_params``, each kernel quantized as it is read) and 3 LoRA
    steps on one base format, less the RSS after imports, in a process of its own."""
    import jax

    reset_peak_rss()  # the window starts here (a no-op in a fresh process; needed in one that ran before)
    before = _proc_status_bytes("VmRSS")
    model, config, ids, lora_model = _decoder_setup(args, False)
    params = _decoder_params(args, lora_model, ids, None if args.base_format == "fp32" else args.base_format, config)
    jax.block_until_ready(params)
    loaded = _proc_status_bytes("VmHWM")
    run, _, _ = _decoder_step(lora_model, params, config, ids)
    del params
    for _ in range(3):
        run()
    return {"load_peak_rss_bytes": loaded - before, "peak_rss_bytes": _proc_status_bytes("VmHWM") - before}


def worker_load_memory(args) -> dict[str, Any]:
    """Peak RSS of ``from_pretrained(--checkpoint, quantize=...)`` alone (every encoder and pooler kernel
    in ``--base-format``), less the RSS after imports, in a process of its own."""
    import jax

    from lora_jax.models import from_pretrained

    reset_peak_rss()  # the window starts here (a no-op in a fresh process; needed in one that ran before)
    before = _proc_status_bytes("VmRSS")
    _, params, _ = from_pretrained(args.checkpoint, num_labels=3, with_tokenizer=False,
                                   quantize=None if args.base_format == "fp32" else args.base_format)
    jax.block_until_ready(params)
    return {"load_peak_rss_bytes": _proc_status_bytes("VmHWM") - before}


WORKERS = {"train": worker_train, "ratios": worker_ratios, "versus-peft": worker_versus_peft,
           "peft-memory": worker_peft_memory, "scaling": worker_scaling, "quantized": worker_quantized,
           "quantized-memory": worker_quantized_memory, "decoder": worker_decoder,
           "decoder-memory": worker_decoder_memory, "load-memory": worker_load_memory}


# ----------------------------------------------------------------------------------- driver


def spawn(task: str, args, **overrides) -> dict[str, Any]:
    """Run one worker in a fresh process and return its JSON result."""
    settings = {"model": args.model, "batch": args.batch, "seq": args.seq, "steps": args.steps, "rank": RANK,
                "mode": "lora", "remat": REMAT, "dtype": "float32", **overrides}
    if args.in_process:  # one process for everything (a quick check of the harness; peak memories mix)
        return WORKERS[task](argparse.Namespace(**{**vars(args), **settings}))
    cmd = [sys.executable, "-m", "experiments.benchmark", "--worker", task] + \
          [x for k, v in settings.items() if v is not False
           for x in ((f"--{k.replace('_', '-')}",) if v is True else (f"--{k.replace('_', '-')}", str(v)))]
    print(f"  {task} {' '.join(f'{k}={v}' for k, v in overrides.items())} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {task} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def benchmark_model(model: str, args) -> dict[str, Any]:
    print(f"[{model}] batch {args.batch} x {args.seq} tokens", flush=True)
    a = argparse.Namespace(**{**vars(args), "model": model})
    result = {"model": model, "full": spawn("train", a, mode="full"), "lora": spawn("train", a, mode="lora"),
              "lora_no_remat": spawn("train", a, mode="lora", remat="none"), "ratios": spawn("ratios", a)}
    if args.peft:
        if torch_available():
            result["peft_memory"] = spawn("peft-memory", a, mode="lora")
            result["versus_peft"] = spawn("versus-peft", a, no_bf16=args.no_bf16)
        else:
            print("  --peft: torch/peft not installed, skipped")
    return result


def verdict(name: str, value: float, bound: float) -> dict[str, Any]:
    return {"target": name, "measured": round(value, 4), "bound": bound, "met": bool(value <= bound)}


def ratios_of(r: dict[str, Any]) -> dict[str, float]:
    """Every ratio of one model's results (each from one process, both sides alternating)."""
    q = r["ratios"]
    out = {"lora_over_full_step": q["lora_step_s"] / q["full_step_s"],
           "lora_over_full_flops": r["lora"]["flops"] / r["full"]["flops"],
           "lora_over_full_opt_state": r["lora"]["opt_state_bytes"] / r["full"]["opt_state_bytes"],
           "merged_over_base_forward": q["lora_merged_s"] / q["base_s"],
           "unmerged_over_base_forward": q["lora_unmerged_s"] / q["base_s"]}
    if "versus_peft" in r:
        vs, peft_rss = r["versus_peft"], r["peft_memory"]["peak_rss_bytes"]
        out.update(ours_over_peft_step_fp32=vs["ours_fp32_step_s"] / vs["peft_fp32_step_s"])
        if "ours_bf16_step_s" in vs:  # not with --no-bf16
            out.update(ours_over_peft_step_bf16=vs["ours_bf16_step_s"] / vs["peft_bf16_step_s"])
        out.update(ours_over_transformers_forward=vs["ours_forward_s"] / vs["transformers_forward_s"],
                   ours_over_peft_peak_rss=r["lora"]["peak_rss_bytes"] / peft_rss,
                   ours_no_remat_over_peft_peak_rss=r["lora_no_remat"]["peak_rss_bytes"] / peft_rss)
    return out


TARGET_BOUNDS = {"lora_over_full_step": 0.72, "merged_over_base_forward": 1.02, "unmerged_over_base_forward": 1.10,
                 "lora_over_full_opt_state": 0.01, "ours_over_peft_step_fp32": 0.80, "ours_over_peft_step_bf16": 0.65,
                 "ours_over_transformers_forward": 0.90, "ours_over_peft_peak_rss": 1.0}


def summarize(results: list[dict[str, Any]], scaling: dict | None) -> tuple[str, list[dict]]:
    lines, verdicts, rows = [], [], []
    for r in results:
        for label, key in (("full FT", "full"), ("LoRA r=8 q,v", "lora"), ("LoRA r=8 q,v, remat=none", "lora_no_remat")):
            run = r[key]
            rows.append([r["model"], label, run["step_s"], run["compile_s"], f"{run['flops']:.3e}",
                         run["opt_state_bytes"], run["xla_temp_bytes"] / 2**30, run["peak_rss_bytes"] / 2**30])
        if "peft_memory" in r:
            rows.append([r["model"], "PEFT LoRA (torch)", r["peft_memory"]["step_s"], "-", "-", "-", "-",
                         r["peft_memory"]["peak_rss_bytes"] / 2**30])
        if "versus_peft" in r:
            vs = r["versus_peft"]
            for label, key in (("LoRA fp32, with PEFT", "ours_fp32"), ("LoRA bf16, with PEFT", "ours_bf16"),
                               ("PEFT fp32, with ours", "peft_fp32"), ("PEFT bf16 autocast, with ours", "peft_bf16")):
                if f"{key}_step_s" in vs:
                    rows.append([r["model"], label, vs[f"{key}_step_s"], "-", "-", "-", "-", "-"])
    lines.append(print_table(f"Train step (median; remat={REMAT} unless marked; each process alone, or alternating "
                             f"where marked 'with')",
                             ["model", "mode", "step (s)", "compile (s)", "XLA FLOPs", "optimizer state (bytes)",
                              "XLA temp (GiB)", "peak RSS (GiB)"], rows))
    ratio_rows = []
    for r in results:
        ratios = ratios_of(r)
        ratio_rows += [[r["model"], name, value, TARGET_BOUNDS.get(name, "-")] for name, value in ratios.items()]
        verdicts += [verdict(f"{name} ({r['model']})", value, TARGET_BOUNDS[name]) for name, value in ratios.items()
                     if name in TARGET_BOUNDS]
    lines.append(print_table("Ratios (each measured in one process, both sides alternating)",
                             ["model", "ratio", "measured", "target ≤"], ratio_rows))
    if scaling:
        lines.append(print_table(f"LoRA step vs rank / sequence length / batch ({scaling['model']})",
                                 ["axis", "value", "step (s)"],
                                 [[axis, k, v] for axis in SCALING for k, v in scaling[axis].items()]))
    return "\n\n".join(lines), verdicts


def plot_scaling(scaling: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (axis, label) in zip(axes, (("rank", "LoRA rank"), ("seq", "sequence length"), ("batch", "batch size"))):
        xs = [int(k) for k in scaling[axis]]
        ax.plot(xs, list(scaling[axis].values()), "o-")
        ax.set(xscale="log" if axis == "rank" else "linear", xlabel=label, ylabel="train step (s)",
               title=f"step time vs {label}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"LoRA r=8 on query+value (one axis varied at a time), {scaling['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = make_parser("benchmark", __doc__)
    p.add_argument("--model", default=None, help="minilm | bert-base-config | tiny-config | a model folder; "
                   "none: minilm and bert-base-config")
    p.add_argument("--batch", type=positive_int, default=32, help="examples per step")
    p.add_argument("--seq", type=positive_int, default=128, help="tokens per example")
    p.add_argument("--steps", type=positive_int, default=6, help="timed steps per figure (after warm-up)")
    p.add_argument("--out", default=None, help="output folder (default runs/benchmark/<timestamp>)")
    p.add_argument("--peft", action="store_true", help="also measure PyTorch + PEFT (needs torch and peft)")
    p.add_argument("--no-scaling", action="store_true", help="skip the rank / sequence length / batch sweep")
    p.add_argument("--no-bf16", action="store_true", help="with --peft: skip the bf16 pair (PyTorch's bf16 autocast "
                   "takes about a minute a step on CPUs without bf16 instructions)")
    p.add_argument("--quantized-base", action="store_true", help="instead: the LoRA step and kernel bytes on an fp32, "
                   "int8 and NF4 base (QLoRA), interleaved in one process")
    p.add_argument("--moe", action="store_true", help="instead: LoRA on mixture-of-experts weights, both forward paths "
                   "against the frozen block (flags: python -m experiments.moe_benchmark --help)")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="lora", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=positive_int, default=RANK, help=argparse.SUPPRESS)
    p.add_argument("--remat", default=REMAT, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--base-format", default="fp32", choices=("fp32", "int8", "nf4"), help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    if argv and "--moe" in argv:  # LoRA on mixture-of-experts weights: its own flags (experiments.moe_benchmark)
        from . import moe_benchmark

        return moe_benchmark.main([a for a in argv if a != "--moe"])
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return {}
    with output_dir(args.out, "benchmark") as out:
        return _run(args, out)


DECODER_BATCH, DECODER_SEQ = 2, 64  # a small fine-tuning batch: the decoder's weights dominate its step
DECODER_SIZE: dict[str, int] = {}  # experiments.decoder.Decoder's defaults: 12 layers, hidden 2048
DECODER_REMAT = (False, True)  # the step's bytes without and with nn.remat on each block
DECODER_FORMATS = ("fp32", "int8", "nf4")


def _write_checkpoint(model: str, folder: Path) -> str | None:
    """A randomly initialised checkpoint of ``model`` for the load measurements: the decoder's params
    through ``lora_jax.save_params``; bert-base-config's through ``transformers`` (needs torch; None
    without it); '' for minilm (the packaged checkpoint)."""
    if model == "minilm":
        return ""
    folder.mkdir(parents=True, exist_ok=True)
    if model == "decoder":
        import jax
        import jax.numpy as jnp

        import lora_jax
        from .decoder import Decoder

        path = folder / "decoder.safetensors"
        init = jax.jit(Decoder(**DECODER_SIZE).init)
        lora_jax.save_params(path, init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
        return str(path)
    if not torch_available():
        return None
    import transformers

    config = transformers.BertConfig(**CONFIG_MODELS[model])
    transformers.BertModel(config).save_pretrained(folder / model)
    return str(folder / model)


def _run_quantized(args, out: Path) -> dict[str, Any]:
    """``--quantized-base``: per model and base format, the LoRA step's XLA bytes, time, and the peak RSS
    of loading (each kernel quantized as it is read) and of loading + 3 steps, each in its own process."""
    import shutil

    models = [args.model] if args.model else ["decoder", "minilm", "bert-base-config"]
    rows, report = [], {"machine": machine_info(), "quantized_base": {}}
    formats = ("fp32", "int8", "nf4")
    for m in models:
        decoder = m == "decoder"
        shape = (DECODER_BATCH, DECODER_SEQ) if decoder else (args.batch, args.seq)
        print(f"[{m}] LoRA on fp32 / int8 / NF4 bases, batch {shape[0]} x {shape[1]}", flush=True)
        checkpoint = _write_checkpoint(m, out / "checkpoints")
        a = argparse.Namespace(**{**vars(args), "model": m, "batch": shape[0], "seq": shape[1]})
        r: dict[str, Any] = {}
        if decoder:
            r.update(spawn("decoder", a, checkpoint=checkpoint, remat="none"))
            r["memory"] = {fmt: spawn("decoder-memory", a, checkpoint=checkpoint, base_format=fmt) for fmt in formats}
        else:
            r.update(spawn("quantized", a))
            if checkpoint is not None:
                r["memory"] = {fmt: spawn("quantized-memory", a, checkpoint=checkpoint, base_format=fmt)
                               for fmt in formats}
                for fmt in formats:
                    if checkpoint:  # the load alone (a folder written by transformers)
                        r["memory"][fmt].update(spawn("load-memory", a, checkpoint=checkpoint, base_format=fmt))
                    r[f"{fmt}_xla_bytes"] = r["memory"][fmt]["xla_argument_bytes"] + r["memory"][fmt]["xla_temp_bytes"]
        report["quantized_base"][m] = r
        mem = r.get("memory", {})
        for fmt in formats:
            ratio = lambda key: (r[f"{fmt}_{key}"] / r[f"fp32_{key}"]) if f"fp32_{key}" in r else None
            load = {f: mem[f]["load_peak_rss_bytes"] for f in mem}
            peak = {f: mem[f]["peak_rss_bytes"] for f in mem}
            rows.append([m, fmt, r[f"{fmt}_step_s"], ratio("step_s"),
                         r.get(f"{fmt}_xla_bytes", 0) / 2**20, ratio("xla_bytes"),
                         ratio("remat_xla_bytes") if decoder else "-",
                         load[fmt] / 2**20 if load else "-", load[fmt] / load["fp32"] if load else "-",
                         peak[fmt] / 2**20 if peak else "-", peak[fmt] / peak["fp32"] if peak else "-"])
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    table = print_table("LoRA on a quantized base (step bytes: XLA arguments + temporaries; RSS: peak less the "
                        "RSS after imports, each format in its own process)",
                        ["model", "base", "step s", "step / fp32", "step MiB", "step bytes / fp32",
                         "with remat / fp32", "load RSS MiB", "load / fp32", "load + 3 steps RSS MiB",
                         "load + steps / fp32"], rows)
    report["table"], report["rows"] = table, rows
    write_json(out / "results.json", report)
    (out / "quantized_base.md").write_text(table + "\n")
    print(f"results: {out / 'results.json'}")
    return report


def _run(args, out: Path) -> dict[str, Any]:
    if args.quantized_base:
        return _run_quantized(args, out)
    models = [args.model] if args.model else ["minilm", "bert-base-config"]
    start = time.perf_counter()
    results = [benchmark_model(m, args) for m in models]
    scaling = None
    if not args.no_scaling:
        print(f"[{models[0]}] scaling sweep", flush=True)
        scaling = {"model": models[0], **spawn("scaling", argparse.Namespace(**{**vars(args), "model": models[0]}))}
    markdown, verdicts = summarize(results, scaling)
    report = {"machine": machine_info(), "settings": {k: v for k, v in vars(args).items() if k != "worker"},
              "results": results, "ratios": {r["model"]: ratios_of(r) for r in results}, "scaling": scaling,
              "verdicts": verdicts, "wall_s": time.perf_counter() - start}
    if torch_available():
        import torch

        report["machine"]["torch"] = torch.__version__
    write_json(out / "results.json", report)
    (out / "benchmark.md").write_text(markdown + "\n")
    if scaling:
        plot_scaling(scaling, out / "scaling.png")
    for v in verdicts:
        print(f"{'met    ' if v['met'] else 'NOT met'}  {v['target']}: {v['measured']} (target ≤ {v['bound']})")
    print(f"{report['wall_s'] / 60:.1f} min; results: {out / 'results.json'}  table: {out / 'benchmark.md'}")
    return report


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
