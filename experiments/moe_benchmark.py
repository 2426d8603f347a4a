"""LoRA on mixture-of-experts weights: the two forward paths against the frozen block.

    python -m experiments.benchmark --moe [--experts 8 16] [--hidden 1024] [--ffn 512] [--tokens 512]
                                          [--rank 16] [--steps 6] [--out DIR]

One ``experiments.moe.MoeBlock`` (a router, top-2 SwiGLU experts applied with ``ragged_dot``) per
expert count. Measured in one process, interleaved (A B C ... per round, medians): the frozen block's
forward + input gradient (what a frozen MoE layer costs inside a network that trains something
else), and a LoRA step on the experts (``target_parameters``: the factors' gradients and the input
gradient) through (a) the params read as ``W + scale·A·B`` and (b) ``lora_jax.ragged_dot`` through
the rank, on fp32 and on NF4 experts. Bytes: XLA's temporaries of each compiled step
(``memory_analysis``), and whether a buffer of a whole expert stack's size beyond the frozen
block's appears. The target: (b) at most 1.2× the frozen block's time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .common import interleaved, machine_info, make_parser, output_dir, positive_int, print_table, run_cli, write_json

TARGET = 1.2  # path (b): at most this many times the frozen block's forward + input gradient


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser("moe_benchmark", __doc__)
    p.add_argument("--experts", type=positive_int, nargs="+", default=[8, 16], help="expert counts to measure")
    p.add_argument("--hidden", type=positive_int, default=1024, help="the block's model width")
    p.add_argument("--ffn", type=positive_int, default=512, help="each expert's hidden width (its w_in is 2·ffn wide)")
    p.add_argument("--tokens", type=positive_int, default=512, help="tokens per step (each goes to its top 2 experts)")
    p.add_argument("--rank", type=positive_int, default=16, help="LoRA rank of every expert")
    p.add_argument("--steps", type=positive_int, default=6, help="timed rounds (after compile and one warm-up round)")
    p.add_argument("--out", default=None, help="output folder (default runs/moe_benchmark/<timestamp>)")
    return p.parse_args(argv)


def _steps(experts: int, args: argparse.Namespace) -> dict[str, Any]:
    """{name: (jitted function, its arguments)} for the frozen block and the four LoRA steps."""
    import jax
    import jax.numpy as jnp

    import lora_jax
    from .moe import MoeBlock

    x = jax.random.normal(jax.random.key(0), (args.tokens, args.hidden))
    block = MoeBlock(hidden=args.hidden, ffn=args.ffn, experts=experts)
    base = jax.jit(block.init)(jax.random.key(1), x)["params"]
    config = lora_jax.LoraConfig(rank=args.rank, alpha=2 * args.rank, targets=(), target_parameters=("w_in", "w_out"))
    steps = {}
    frozen = jax.jit(jax.value_and_grad(lambda x, p: (block.apply({"params": p}, x) ** 2).mean()))
    steps["frozen fp32"] = (frozen, (x, base))
    for fmt in ("fp32", "nf4"):
        for grouped in (False, True):
            model = lora_jax.lora(MoeBlock(hidden=args.hidden, ffn=args.ffn, experts=experts, grouped=grouped),
                                  config)
            params = lora_jax.init_lora_params(model, base, jax.random.key(2), x)
            params = jax.tree.map(lambda v: v, params)
            for name in ("w_in_lora", "w_out_lora"):  # B off zero: the update is really computed
                params[name]["lora_B"] = 0.01 * jnp.ones_like(params[name]["lora_B"])
            if fmt == "nf4":
                params = lora_jax.quantize(params, config, "nf4")
            trainable, frozen_part = lora_jax.partition(params, lora_jax.trainable_mask(params, config))

            def loss(t, x, f, model=model):
                return (model.apply({"params": lora_jax.combine(t, f)}, x) ** 2).mean()

            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
            steps[f"{'(b) grouped' if grouped else '(a) read as W'} {fmt}"] = (step, (trainable, x, frozen_part))
    return steps


def measure(experts: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per step: median time, its ratio to the frozen block, XLA temporary bytes."""
    import jax

    steps = _steps(experts, args)
    compiled = {name: (fn.lower(*a).compile(), a) for name, (fn, a) in steps.items()}  # compiled once: run and measured
    temps = {name: fn.memory_analysis().temp_size_in_bytes for name, (fn, _) in compiled.items()}
    print(f"[moe {experts} experts] timing {len(steps)} steps, interleaved", flush=True)
    timed = interleaved({name: (lambda fn=fn, a=a: jax.block_until_ready(fn(*a))) for name, (fn, a) in compiled.items()},
                        args.steps, warmup=1)
    stack = experts * args.hidden * 2 * args.ffn * 4  # one fp32 w_in stack, the largest (E, in, out) array
    frozen = timed["frozen fp32"]["median_s"]
    return [{"experts": experts, "step": name, "median_s": t["median_s"], "vs_frozen": t["median_s"] / frozen,
             "temp_bytes": temps[name], "extra_temp_in_stacks": (temps[name] - temps["frozen fp32"]) / stack}
            for name, t in timed.items()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    with output_dir(args.out, "moe_benchmark") as out:
        rows = [row for e in args.experts for row in measure(e, args)]
        table = print_table(
            f"MoE block, hidden {args.hidden}, expert ffn {args.ffn}, {args.tokens} tokens top-2, rank {args.rank}",
            ("experts", "step", "median s", "× frozen", "XLA temp MB", "extra temp (w_in stacks)"),
            [(r["experts"], r["step"], f"{r['median_s']:.3f}", f"{r['vs_frozen']:.2f}", f"{r['temp_bytes'] / 1e6:.1f}",
              f"{r['extra_temp_in_stacks']:+.2f}") for r in rows])
        verdicts = [{"experts": r["experts"], "step": r["step"], "met": r["vs_frozen"] <= TARGET}
                    for r in rows if r["step"] == "(b) grouped fp32"]
        for v in verdicts:
            print(f"{'met    ' if v['met'] else 'NOT met'}  {v['experts']} experts: (b) grouped fp32 ≤ {TARGET}× frozen")
        report = {"machine": machine_info(), "settings": vars(args), "rows": rows, "verdicts": verdicts,
                  "wall_s": time.perf_counter() - start}
        write_json(Path(out) / "results.json", report)
        (Path(out) / "moe_benchmark.md").write_text(table + "\n")
        print(f"{report['wall_s'] / 60:.1f} min; results: {Path(out) / 'results.json'}")
        return report


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
