"""Serve several ABSA adapters from one frozen base in one batch, and measure what that buys.

Loads adapters written by ``python -m experiments.bert_absa train`` (``--adapters DIR DIR ...``;
without them, untrained demo adapters of the same shape, so the run works offline), stacks them
into a bank (``lora_jax.make_bank``), and classifies one batch in which every row picks its adapter
(-1: the base with no adapter), printing each row's adapter and prediction. Then it times, for
N = 1, 4, 16, 64 adapters, one mixed batch through ``lora_jax.bank_apply`` against N separate
forwards (one per adapter, each over its share of the rows, through the same compiled function),
interleaved in one process, and writes ``results.json`` and ``throughput.png``.

    python -m experiments.serve_adapters --adapters runs/bert_absa/<run>/seed0/adapter ... --out runs/serve
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import lora_jax
from experiments.bert_absa import LABELS, batches, encode, load_base_as_trained, quantized_load
from experiments.common import CONFIG_MODELS, config_model, int_list, make_parser, output_dir, positive_int, print_table, run_cli, write_json
from lora_jax.models import PACKAGED_MINILM, from_pretrained

TIMING_MODELS = ("served", *CONFIG_MODELS)


def model_list(text: str) -> list[str]:
    """'served,bert-base-config' -> a list of known timing bases (argparse type)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in TIMING_MODELS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(TIMING_MODELS)}; "
                                         f"got {text!r}")
    return names

ROWS = [("The battery life is amazing but the camera is terrible.", "battery life"),
        ("The battery life is amazing but the camera is terrible.", "camera"),
        ("Boots fast, and the keyboard feels fine.", "keyboard"),
        ("Support never answered my emails.", "Support"),
        ("The screen is bright enough for outdoors.", "screen"),
        ("Price is high for what you get.", "Price")]


def demo_adapters(base_params: dict, model: Any, n: int, example: np.ndarray, rank: int = 8) -> list[lora_jax.Adapter]:
    """``n`` untrained adapters (random A and B, random heads) of the ABSA LoRA shape: for timing and
    for a run without trained adapters."""
    config = lora_jax.LoraConfig(rank=rank, alpha=2.0 * rank, targets=("query", "value"),
                                 modules_to_save=("classifier",))
    params = lora_jax.init_lora_params(lora_jax.lora(model, config), base_params, jax.random.key(0), example)
    adapters = []
    for i in range(n):
        keys = iter(jax.random.split(jax.random.key(i + 1), 4096))
        noisy = jax.tree_util.tree_map_with_path(
            lambda p, v: 0.05 * jax.random.normal(next(keys), v.shape) if str(p[-1].key) == "lora_B" else v, params)
        noisy["classifier"] = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(next(keys), v.shape),
                                           noisy["classifier"])
        adapters.append(lora_jax.extract_adapter(noisy, config))
    return adapters


def load_adapters(paths: list[str], model_name: str) -> tuple[list[lora_jax.Adapter], str]:
    """The adapters at ``paths`` and the base format they were trained on ('none', 'int8', 'nf4', from
    ``bert_absa train --quantize``); each is checked to fit the base ``model_name`` loaded that way
    and to have been trained on it."""
    adapters = [lora_jax.load_adapter(path) for path in paths]
    formats = sorted({a.metadata.get("quantize", "none") for a in adapters})
    if len(formats) > 1:
        raise ValueError(f"the adapters were trained on bases stored differently ({', '.join(formats)}); "
                         f"serve each kind from a run of its own")
    bases: dict[tuple[str, ...], dict] = {}  # the base as trained depends only on what the adapter trains in full
    for path, adapter in zip(paths, adapters):
        saved = adapter.config.modules_to_save
        if saved not in bases:
            bases[saved] = load_base_as_trained(model_name, adapter, with_tokenizer=False).params
        base = bases[saved]
        try:
            lora_jax.apply_adapter(base, adapter)  # the checks only: it fits, and this is its base
        except ValueError as err:
            raise ValueError(f"adapter {path}: {err}") from None
    return adapters, formats[0]


def slots_for(adapters: list[lora_jax.Adapter]) -> lora_jax.LoraConfig:
    """One config with room for every adapter: the largest rank of any of their layers, every target,
    alpha = rank."""
    rank = max(leaf.shape[-1] for a in adapters for key, leaf in traverse_util.flatten_dict(dict(a.params)).items()
               if key[-1] == "lora_A")
    targets = tuple(dict.fromkeys(t for a in adapters for t in a.config.targets))
    saved = tuple(dict.fromkeys(m for a in adapters for m in a.config.modules_to_save))
    return lora_jax.LoraConfig(rank=rank, alpha=float(rank), targets=targets, modules_to_save=saved)


def classify(args: argparse.Namespace) -> tuple[list[dict], Any]:
    example = jnp.ones((1, 8), jnp.int32)
    if args.adapters:
        adapters, base_format = load_adapters(args.adapters, args.model)
        names = [Path(p).parent.name if Path(p).name == "adapter" else Path(p).name for p in args.adapters]
        config = slots_for(adapters)
        # the adapters were trained on a quantized base (bert_absa --quantize): serve on it, quantized as read
        model, base_params, tokenizer = from_pretrained(args.model, num_labels=len(LABELS),
                                                        **quantized_load(base_format, config))
    else:
        model, base_params, tokenizer = from_pretrained(args.model, num_labels=len(LABELS))
        adapters, names = demo_adapters(base_params, model, 3, example), ["demo0", "demo1", "demo2"]
        config = slots_for(adapters)
    served = lora_jax.lora(model, config)
    params = lora_jax.init_lora_params(served, base_params, jax.random.key(0), example)
    bank = lora_jax.make_bank(params, adapters, config)
    index = np.array([i % (len(adapters) + 1) - 1 for i in range(len(ROWS))])  # -1, 0, 1, ..., cycling
    encoded = encode(ROWS, tokenizer, 64)
    batch = next(batches(encoded, len(ROWS), 64, tokenizer.pad_token_id or 0))
    forward = jax.jit(lambda b, i, ids, mask, types: jax.nn.softmax(
        lora_jax.bank_apply(served, params, b, i, ids, mask, types), -1))
    order = batch["index"]
    probs = np.asarray(forward(bank, jnp.asarray(index[order]), batch["ids"], batch["mask"], batch["types"]))
    broken = sorted({names[index[row]] for position, row in enumerate(order)
                     if index[row] >= 0 and not np.isfinite(probs[position]).all()})
    if broken or not np.isfinite(probs).all():
        raise ValueError(f"adapters {broken or 'none (the base)'} output NaN or inf: their weights are broken "
                         f"(retrain them with a lower learning rate)")
    rows = []
    for position, row in enumerate(order):
        sentence, aspect = ROWS[row]
        adapter = "none (base)" if index[row] < 0 else names[index[row]]
        rows.append({"row": int(row), "adapter": adapter, "aspect": aspect, "sentence": sentence,
                     "prediction": LABELS[int(probs[position].argmax())],
                     "probabilities": dict(zip(LABELS, probs[position].round(3).tolist()))})
    rows.sort(key=lambda r: r["row"])
    print_table("one batch, one adapter per row", ["row", "adapter", "aspect", "prediction", "p(neg/neu/pos)"],
                [[r["row"], r["adapter"], r["aspect"], r["prediction"],
                  " / ".join(f"{v:.2f}" for v in r["probabilities"].values())] for r in rows])
    return rows, (model, base_params)


def throughput(model: Any, base_params: dict, counts: list[int], rows: int, seq: int, repeats: int) -> list[dict]:
    """Rows per second: one mixed batch over N adapters vs N forwards of rows / N rows each."""
    ids = jnp.asarray(np.random.RandomState(0).randint(1000, 20000, (rows, seq)), jnp.int32)
    mask = jnp.ones_like(ids)
    example = ids[:1, :8]
    out = []
    for n in counts:
        if rows % n:
            raise ValueError(f"--rows {rows} is not a multiple of the adapter count {n}")
        adapters = demo_adapters(base_params, model, n, example)
        config = slots_for(adapters)
        served = lora_jax.lora(model, config)
        params = lora_jax.init_lora_params(served, base_params, jax.random.key(0), example)
        bank = lora_jax.make_bank(params, adapters, config)
        index = jnp.arange(rows) % n
        mixed = jax.jit(lambda b, i, x, m: lora_jax.bank_apply(served, params, b, i, x, m))
        single = jax.jit(lambda p, x, m: served.apply({"params": p}, x, m))
        swapped = [lora_jax.hotswap_adapter(params, a, config) for a in adapters]
        share = rows // n

        def run_mixed():
            jax.block_until_ready(mixed(bank, index, ids, mask))

        def run_each():
            jax.block_until_ready([single(p, ids[k * share:(k + 1) * share], mask[k * share:(k + 1) * share])
                                   for k, p in enumerate(swapped)])

        run_mixed(), run_each()  # compile both
        times = {"mixed": [], "each": []}
        for _ in range(repeats):  # interleaved: A B A B ...
            for name, fn in (("mixed", run_mixed), ("each", run_each)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        mixed_s, each_s = statistics.median(times["mixed"]), statistics.median(times["each"])
        out.append({"adapters": n, "rows": rows, "seq": seq, "mixed_s": mixed_s, "each_s": each_s,
                    "mixed_rows_per_s": rows / mixed_s, "each_rows_per_s": rows / each_s,
                    "mixed_over_each_time": mixed_s / each_s})
        print(f"N={n:3d}: one mixed batch {mixed_s:.3f} s, {n} forwards {each_s:.3f} s "
              f"({rows / mixed_s:,.0f} vs {rows / each_s:,.0f} rows/s)", flush=True)
    return out


def timing_base(name: str, model: Any, base_params: dict) -> tuple[Any, dict]:
    """The base to time on: the served model itself ('served'), or a randomly initialised encoder of a
    known shape (``CONFIG_MODELS``: 'bert-base-config', 'tiny-config'; no download)."""
    if name == "served":
        return model, base_params
    return config_model(name, len(LABELS))


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], results.items()):
        n = [r["adapters"] for r in rows]
        ax.plot(n, [r["mixed_rows_per_s"] for r in rows], "o-", label="one mixed batch (bank)")
        ax.plot(n, [r["each_rows_per_s"] for r in rows], "s--", label="one forward per adapter")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("adapters in the batch")
        ax.set_ylabel("rows / s")
        ax.set_title(f"{name}: {rows[0]['rows']} rows x {rows[0]['seq']} tokens")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser("serve_adapters", __doc__)
    parser.add_argument("--adapters", nargs="+", default=None, help="adapter folders from bert_absa train (default: "
                        "3 untrained demo adapters)")
    parser.add_argument("--model", default=PACKAGED_MINILM, help="base model (hub id or folder) for demo adapters")
    parser.add_argument("--timing-models", type=model_list, default=["served"],
                        help="comma-separated bases to time: 'served' (the --model), 'bert-base-config' (a random "
                             "encoder of the bert-base shape), 'tiny-config'")
    parser.add_argument("--counts", type=int_list, default=[1, 4, 16, 64], help="adapter counts N to time")
    parser.add_argument("--rows", type=positive_int, default=64, help="rows per timed batch (a multiple of each N)")
    parser.add_argument("--seq", type=positive_int, default=64, help="tokens per timed row")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed repeats of each side (median)")
    parser.add_argument("--no-timing", action="store_true", help="classify the mixed batch only")
    parser.add_argument("--out", default=None, help="output folder (default runs/serve_adapters/<timestamp>)")
    args = parser.parse_args(argv)
    bad = [n for n in args.counts if args.rows % n]
    if bad and not args.no_timing:
        parser.error(f"--rows {args.rows} must be a multiple of every --counts value (not of {bad})")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with output_dir(args.out, "serve_adapters") as out:
        rows, (model, base_params) = classify(args)
        report: dict[str, Any] = {"predictions": rows, "adapters": args.adapters or "demo"}
        if not args.no_timing:
            report["throughput"] = {}
            timed = {}
            for name in args.timing_models:  # every base checked before any is timed
                label = Path(args.model).name if name == "served" else name
                timed[label] = timing_base(name, model, base_params)
                if args.seq > timed[label][0].config.max_tokens:
                    raise ValueError(f"--seq {args.seq} exceeds the {timed[label][0].config.max_tokens} tokens the "
                                     f"position embeddings of '{label}' cover; pass at most that")
            for label, (timed_model, timed_params) in timed.items():
                print(f"[{label}] one mixed batch vs one forward per adapter", flush=True)
                report["throughput"][label] = throughput(timed_model, timed_params, args.counts, args.rows, args.seq,
                                                         args.repeats)
            print_table("throughput", ["base", "adapters", "mixed batch s", "N forwards s", "mixed rows/s",
                                       "N forwards rows/s", "mixed / N forwards (time)"],
                        [[label, r["adapters"], r["mixed_s"], r["each_s"], round(r["mixed_rows_per_s"]),
                          round(r["each_rows_per_s"]), r["mixed_over_each_time"]]
                         for label, rows in report["throughput"].items() for r in rows])
            plot(report["throughput"], out / "throughput.png")
        write_json(out / "results.json", report)
        print(f"results: {out / 'results.json'}")
    return report


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
