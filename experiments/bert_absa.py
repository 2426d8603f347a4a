"""LoRA-BERT for aspect-based sentiment (SemEval-2014 Task 4), against full fine-tuning.

Input is the sentence pair ``[CLS] sentence [SEP] aspect [SEP]`` (BERT-SPC); the label is the
sentiment toward that aspect (negative / neutral / positive).

    python -m experiments.bert_absa train --data-dir DIR                 # LoRA r=8 on query+value
    python -m experiments.bert_absa train --data-dir DIR --full-finetune # the baseline
    python -m experiments.bert_absa train --data-dir DIR --compare       # both, one table
    python -m experiments.bert_absa train --data-dir DIR --compare --seeds 0,1,2  # mean ± sd over seeds
    python -m experiments.bert_absa predict --adapter runs/bert_absa/<run>/adapter \\
        "The battery life is amazing but the camera is terrible." --aspect "battery life" --aspect camera
    python -m experiments.bert_absa predict --adapter ADAPTER --input rows.jsonl --output predictions.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import lora_jax
from experiments.data.semeval import LABELS, AspectExample, load_semeval, read_seg
from lora_jax.models import PACKAGED_MINILM, REMAT_POLICIES, from_pretrained

from .common import (check_finite, make_parser, mean_sd, non_negative_float, non_negative_int, open_fraction, output_dir,
                     positive_float, positive_int, print_table, probability, run_cli, seed_list, write_json)

# Per-mode training defaults; a flag given on the command line overrides both modes. LoRA's were chosen
# by dev macro-F1 averaged over seeds 0-2 on laptops (README, "Experiment: LoRA-BERT ..."): batch 16 at a
# constant rate without warm-up and a class-balanced loss; full fine-tuning keeps its earlier choice.
MODE_DEFAULTS = {
    "lora": {"lr": 1e-3, "epochs": 5, "batch_size": 16, "warmup": 0.0, "schedule": "constant", "patience": 2,
             "class_weight": "balanced", "lora_plus_ratio": 1.0},
    "full": {"lr": 1e-4, "epochs": 5, "batch_size": 32, "warmup": 0.1, "schedule": "linear", "patience": 2,
             "class_weight": "none"},
}
CLASS_WEIGHTS = ("none", "balanced")
SCHEDULES = ("linear", "cosine", "constant")
TARGET_PRESETS = {
    "qv": ("query", "value"),
    "all": ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
}
BUCKETS = (32, 48, 64, 96, 128, 192, 256, 384, 512)


# ----------------------------------------------------------------------------------- data


def encode(examples: Sequence[AspectExample] | Sequence[tuple[str, str]], tokenizer, max_len: int) -> list[dict]:
    """Tokenise (sentence, aspect) pairs as BERT-SPC; returns unpadded id lists per example."""
    pairs = [(e.sentence, e.aspect) if isinstance(e, AspectExample) else e for e in examples]
    enc = tokenizer([p[0] for p in pairs], [p[1] for p in pairs], truncation="only_first", max_length=max_len)
    types = enc.get("token_type_ids") or [[0] * len(ids) for ids in enc["input_ids"]]
    labels = [e.label if isinstance(e, AspectExample) else -1 for e in examples]
    return [{"ids": ids, "types": t, "label": y} for ids, t, y in zip(enc["input_ids"], types, labels)]


def bucket_length(n: int, max_len: int) -> int:
    return next((b for b in BUCKETS if b >= n and b <= max_len), max_len)


def batches(encoded: list[dict], batch_size: int, max_len: int, pad_id: int,
            rng: np.random.RandomState | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size batches, each padded to its length bucket, so jit sees a handful of shapes.
    Short batches are filled with weight-0 rows."""
    by_bucket: dict[int, list[int]] = {}
    for i, e in enumerate(encoded):
        by_bucket.setdefault(bucket_length(len(e["ids"]), max_len), []).append(i)
    chunks = []
    for length, idx in sorted(by_bucket.items()):
        idx = list(rng.permutation(idx)) if rng is not None else idx
        chunks += [(length, idx[i:i + batch_size]) for i in range(0, len(idx), batch_size)]
    order = rng.permutation(len(chunks)) if rng is not None else range(len(chunks))
    for c in order:
        length, idx = chunks[c]
        ids = np.full((batch_size, length), pad_id, np.int32)
        types = np.zeros((batch_size, length), np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        labels = np.zeros(batch_size, np.int32)
        weight = np.zeros(batch_size, np.float32)
        for row, i in enumerate(idx):
            e = encoded[i]
            n = len(e["ids"])
            ids[row, :n], types[row, :n], mask[row, :n] = e["ids"], e["types"], 1
            labels[row], weight[row] = max(e["label"], 0), 1.0
        yield {"ids": ids, "types": types, "mask": mask, "labels": labels, "weight": weight, "index": np.array(
            idx + [-1] * (batch_size - len(idx)))}


def check_splits(data: dict[str, list[AspectExample]], dev_fraction: float) -> None:
    """ValueError if the train, dev (``dev_fraction`` of train, per class) or test split would be empty."""
    counts = np.bincount([e.label for e in data["train"]], minlength=len(LABELS))
    dev = sum(int(round(dev_fraction * n)) for n in counts)
    sizes = {"train": len(data["train"]) - dev, "dev": dev, "test": len(data["test"])}
    empty = [name for name, n in sizes.items() if n == 0]
    if empty:
        raise ValueError(f"the {' and '.join(empty)} split{'s' if len(empty) > 1 else ''} would be empty ({len(data['train'])} "
                         f"training examples, {dev_fraction:.0%} held out as dev per class, {len(data['test'])} test): "
                         f"raise --limit or --dev-fraction")


def dev_split(examples: list[AspectExample], fraction: float, seed: int) -> tuple[list, list]:
    """Stratified train/dev split of the training file."""
    rng = np.random.RandomState(seed)
    dev_idx: set[int] = set()
    for label in range(len(LABELS)):
        idx = [i for i, e in enumerate(examples) if e.label == label]
        dev_idx.update(rng.permutation(idx)[: int(round(fraction * len(idx)))].tolist())
    return ([e for i, e in enumerate(examples) if i not in dev_idx], [e for i, e in enumerate(examples) if i in dev_idx])


# ----------------------------------------------------------------------------------- metrics


def classification_report(labels: np.ndarray, predictions: np.ndarray, n: int = len(LABELS)) -> dict[str, Any]:
    confusion = np.zeros((n, n), np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    tp = np.diag(confusion).astype(float)
    precision = np.divide(tp, confusion.sum(0), out=np.zeros(n), where=confusion.sum(0) > 0)
    recall = np.divide(tp, confusion.sum(1), out=np.zeros(n), where=confusion.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n), where=(precision + recall) > 0)
    return {"accuracy": float(tp.sum() / max(1, confusion.sum())), "macro_f1": float(f1.mean()),
            "per_class_f1": dict(zip(LABELS, f1.round(4).tolist())), "confusion": confusion.tolist()}


# ----------------------------------------------------------------------------------- training


def make_model(args, seed: int, with_tokenizer: bool = True, quantize: str = "none"):
    """The model, its pretrained params and tokenizer; with ``quantize`` ('int8' | 'nf4'), every frozen
    kernel of the LoRA run is quantized as it is read (QLoRA), so the float32 base never exists."""
    model, params, tokenizer = from_pretrained(args.model, num_labels=len(LABELS), with_tokenizer=with_tokenizer,
                                               rng=jax.random.key(seed), remat=args.remat, dtype=args.dtype,
                                               **quantized_load(quantize, lora_config(args, _WITH_POOLER)))
    return model, params, tokenizer


# The quantized load's selection is made before the params exist: as if the model had a pooler, which
# then trains with --train-pooler; a model without one (RoBERTa) has no pooler kernel to leave out.
_WITH_POOLER = {"bert": {"pooler": {}}}


def quantized_load(fmt: str, config: lora_jax.LoraConfig) -> dict[str, Any]:
    """``from_pretrained``'s arguments that store the frozen base as ``lora_jax.quantize(params, config,
    fmt, layers='all')`` would ('none': as read). Training, ``predict`` and ``serve_adapters`` all load
    through here, so the quantized base, and its fingerprint, is the same in each."""
    if fmt == "none":
        return {}
    return {"quantize": fmt, "quantize_config": config, "quantize_layers": "all"}


def lora_config(args, params: dict) -> lora_jax.LoraConfig:
    """LoRA on ``--targets``; the classifier (and, with --train-pooler, BERT's pooler) trains in full.

    PEFT's SEQ_CLS default trains only the classifier; RoBERTa's classifier has its own dense layer,
    while BERT's head relies on the frozen pooler unless it is trained too.
    """
    targets = TARGET_PRESETS.get(args.targets, tuple(t.strip() for t in args.targets.split(",")))
    has_pooler = any("pooler" in sub for sub in params.values() if isinstance(sub, dict))
    head = ("classifier", "pooler") if has_pooler and args.train_pooler else ("classifier",)
    return lora_jax.LoraConfig(rank=args.rank, alpha=args.alpha, targets=targets, dropout=args.lora_dropout,
                               modules_to_save=head)


def hyper_parameters(args, mode: str) -> dict[str, Any]:
    """The mode's defaults, with every flag the user gave taking their place."""
    chosen = dict(MODE_DEFAULTS[mode])
    for name in chosen:
        if getattr(args, name, None) is not None:
            chosen[name] = getattr(args, name)
    return chosen


def class_weights(labels: np.ndarray, kind: str, num_classes: int = 3) -> np.ndarray:
    """Per-class loss weights, shape (num_classes,): all 1 for 'none'; for 'balanced', n / (K · n_c),
    so each class carries the same total weight (a class absent from ``labels`` counts as one example)."""
    if kind == "none":
        return np.ones(num_classes, np.float32)
    counts = np.maximum(np.bincount(labels, minlength=num_classes), 1)
    return (len(labels) / (num_classes * counts)).astype(np.float32)


def lr_schedule(kind: str, lr: float, warmup_fraction: float, total_steps: int):
    """Linear warm-up over ``warmup_fraction`` of the steps, then linear or cosine decay to 0, or constant."""
    warmup = int(warmup_fraction * total_steps)
    rest = max(1, total_steps - warmup)
    after = {"linear": optax.linear_schedule(lr, 0.0, rest), "cosine": optax.cosine_decay_schedule(lr, rest),
             "constant": optax.constant_schedule(lr)}[kind]
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def train_one(args, mode: str, seed: int, data: dict[str, list[AspectExample]], out: Path) -> dict[str, Any]:
    """Train one mode ('lora' or 'full') with one seed (dev split, init, batch order, dropout),
    early-stopped on dev; evaluate on test; save the adapter under ``out``."""
    # QLoRA: the base's frozen kernels (every one but the trained head) are stored int8 / NF4 from the load on
    model, base_params, tokenizer = make_model(args, seed, quantize=args.quantize if mode == "lora" else "none")
    if args.max_len > model.config.max_tokens:
        raise ValueError(f"--max-len {args.max_len} exceeds the {model.config.max_tokens} tokens {args.model}'s position "
                         f"embeddings cover; pass at most that")
    pad_id = tokenizer.pad_token_id or 0
    train, dev = dev_split(data["train"], args.dev_fraction, seed)
    enc = {name: encode(split, tokenizer, args.max_len) for name, split in
           (("train", train), ("dev", dev), ("test", data["test"]))}
    h = hyper_parameters(args, mode)
    if mode == "lora":
        config = lora_config(args, base_params)
        net = lora_jax.lora(model, config)
        params = lora_jax.init_lora_params(net, base_params, jax.random.key(seed + 1), jnp.ones((1, 8), jnp.int32))
        mask = lora_jax.trainable_mask(params, config)
    else:
        config, net, params = None, model, base_params
        mask = jax.tree.map(lambda _: True, params)
    lr = h["lr"]
    trainable, total = lora_jax.count_parameters(params, mask)
    encoder_key = next(k for k in params if k in ("bert", "roberta"))
    encoder_trainable, encoder_total = lora_jax.count_parameters(params[encoder_key], mask[encoder_key])

    steps_per_epoch = sum(1 for _ in batches(enc["train"], h["batch_size"], args.max_len, pad_id))
    schedule = lr_schedule(h["schedule"], lr, h["warmup"], steps_per_epoch * h["epochs"])
    adamw = lambda rate: optax.adamw(rate, weight_decay=args.weight_decay)
    ratio = h.get("lora_plus_ratio", 1.0)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     lora_jax.lora_plus(adamw, schedule, ratio) if ratio != 1.0 else adamw(schedule))

    def loss_fn(p, batch, rng):
        logits = net.apply({"params": p}, batch["ids"], batch["mask"], batch["types"], deterministic=False,
                           rngs=lora_jax.dropout_rngs(rng, "dropout", "lora_dropout"))
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        return (losses * batch["weight"]).sum() / jnp.maximum(batch["weight"].sum(), 1.0)

    predict = jax.jit(lambda p, b: net.apply({"params": p}, b["ids"], b["mask"], b["types"]))

    def evaluate(p, encoded):
        preds = np.zeros(len(encoded), np.int64)
        for b in batches(encoded, args.eval_batch_size, args.max_len, pad_id):
            logits = np.asarray(predict(p, {k: b[k] for k in ("ids", "mask", "types")}))
            keep = b["index"] >= 0
            preds[b["index"][keep]] = logits[keep].argmax(-1)
        return classification_report(np.array([e["label"] for e in encoded]), preds)

    weight_of_class = class_weights(np.array([e["label"] for e in enc["train"]]), h["class_weight"])
    state = lora_jax.TrainState.create(params, mask, tx, jax.random.key(seed + 2))
    step = lora_jax.make_train_step(loss_fn, tx, mask)
    rng = np.random.RandomState(seed)
    history, step_losses, best, best_trainable, bad_epochs = [], [], -1.0, None, 0
    select = "dev_" + args.select_by
    start = time.perf_counter()
    for epoch in range(h["epochs"]):
        losses = []
        bar = tqdm(batches(enc["train"], h["batch_size"], args.max_len, pad_id, rng), total=steps_per_epoch,
                   desc=f"{mode} epoch {epoch + 1}/{h['epochs']}", leave=False)
        for batch in bar:
            batch["weight"] = batch["weight"] * weight_of_class[batch["labels"]]  # the loss is a weighted mean
            state, metrics = step(state, {k: batch[k] for k in ("ids", "types", "mask", "labels", "weight")})
            check_finite(metrics, int(state.step), f"{mode} seed {seed} epoch {epoch + 1}", lr)
            losses.append(float(metrics["loss"]))
            step_losses.append(losses[-1])
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        dev_report = evaluate(state.params, enc["dev"])
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "dev_accuracy": dev_report["accuracy"],
                        "dev_macro_f1": dev_report["macro_f1"], "elapsed_s": time.perf_counter() - start})
        tqdm.write(f"{mode:>4} epoch {epoch + 1}: train loss {np.mean(losses):.4f}  dev acc {dev_report['accuracy']:.4f}"
                   f"  dev macro-F1 {dev_report['macro_f1']:.4f}")
        if history[-1][select] > best:
            best, bad_epochs = history[-1][select], 0
            best_trainable = jax.tree.map(np.array, state.trainable)
        else:
            bad_epochs += 1
            if bad_epochs >= h["patience"]:
                tqdm.write(f"early stop: dev {args.select_by} has not improved for {h['patience']} epoch(s)")
                break
    train_time = time.perf_counter() - start
    final = lora_jax.combine(best_trainable, state.frozen)
    test_report = evaluate(final, enc["test"])

    adapter_dir, adapter_bytes = None, None
    if mode == "lora":
        adapter_dir = lora_jax.save_adapter(out / "adapter", final, config, base_model=str(args.model),
                                            metadata={"task": "aspect_sentiment", "labels": list(LABELS),
                                                      "max_len": args.max_len, "quantize": args.quantize})
        adapter_bytes = sum(f.stat().st_size for f in adapter_dir.rglob("*") if f.is_file())
    best_epoch = max(history, key=lambda e: e[select])
    return {"mode": mode, "seed": seed, "lr": lr, "hyper_parameters": h, "selected_by": select,
            "best_epoch": best_epoch["epoch"], "best_dev_accuracy": best_epoch["dev_accuracy"],
            "best_dev_macro_f1": best_epoch["dev_macro_f1"], "trainable_params": trainable, "total_params": total,
            "encoder_trainable_params": encoder_trainable, "encoder_total_params": encoder_total,
            "epochs_run": len(history), "train_time_s": train_time, "history": history, "step_losses": step_losses,
            "test": test_report, "adapter_dir": str(adapter_dir) if adapter_dir else None,
            "adapter_bytes": adapter_bytes, "lora_config": config.to_dict() if config else None}


# ----------------------------------------------------------------------------------- plots


def plot_curves(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    seeds = list(dict.fromkeys(run["seed"] for run in runs))
    for run in runs:
        epochs = [h["epoch"] for h in run["history"]]
        style = dict(color="C0" if run["mode"] == "lora" else "C1", linestyle=("-", "--", ":", "-.")[seeds.index(
            run["seed"]) % 4], marker="o", alpha=0.8, label=f"{run['mode']} seed {run['seed']}")
        ax1.plot(epochs, [h["train_loss"] for h in run["history"]], **style)
        ax2.plot(epochs, [h["dev_accuracy"] for h in run["history"]], **style)
    ax1.set(xlabel="epoch", ylabel="train loss", title="training loss")
    ax2.set(xlabel="epoch", ylabel="dev accuracy", title="dev accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.8), squeeze=False)
    for ax, run in zip(axes[0], runs):
        confusion = np.array(run["test"]["confusion"])
        ax.imshow(confusion, cmap="Blues")
        for (i, j), v in np.ndenumerate(confusion):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > confusion.max() / 2 else "black")
        ax.set_xticks(range(len(LABELS)), LABELS)
        ax.set_yticks(range(len(LABELS)), LABELS)
        ax.set(xlabel="predicted", ylabel="true", title=f"{run['mode']}: test confusion")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------- commands


def summarize(runs: list[dict]) -> list[list[Any]]:
    """One row per mode over its seeds: test accuracy and macro-F1 as mean ± sd (sd over seeds, ddof=1)."""
    rows = []
    for mode in dict.fromkeys(r["mode"] for r in runs):
        group = [r for r in runs if r["mode"] == mode]
        acc, f1 = ([r["test"][k] for r in group] for k in ("accuracy", "macro_f1"))
        rows.append([mode, len(group), group[0]["trainable_params"], mean_sd(acc), mean_sd(f1),
                     float(np.mean([r["train_time_s"] for r in group]))])
    return rows


def cmd_train(args) -> dict[str, Any]:
    if args.quantize != "none" and args.full_finetune:
        raise ValueError("--quantize stores the frozen base quantized for LoRA; full fine-tuning trains every kernel "
                         "(drop --full-finetune, or --quantize)")
    data = load_semeval(args.domain, args.data_dir, keep_conflict=args.keep_conflict)
    if args.limit is not None:
        data = {k: v[: args.limit] for k, v in data.items()}
    check_splits(data, args.dev_fraction)
    with output_dir(args.out, "bert_absa") as out:
        return _train_and_report(args, data, out)


def _train_and_report(args, data: dict[str, list[AspectExample]], out: Path) -> dict[str, Any]:
    print(f"{len(data['train']):,} train (of which {args.dev_fraction:.0%} held out as dev), {len(data['test']):,} test")
    modes = ["lora", "full"] if args.compare else ["full" if args.full_finetune else "lora"]
    seeds = args.seeds if args.seeds else [args.seed]
    report: dict[str, Any] = {"args": vars(args), "runs": []}
    for seed in seeds:  # modes interleaved per seed, results saved after each run: a stopped sweep keeps its pairs
        for mode in modes:
            report["runs"].append(train_one(args, mode, seed, data, out if len(seeds) == 1 else out / f"seed{seed}"))
            write_json(out / "results.json", report)
    runs = report["runs"]
    rows = [[r["mode"], r["seed"], r["trainable_params"], 100.0 * r["trainable_params"] / r["total_params"],
             100.0 * r["encoder_trainable_params"] / r["encoder_total_params"], r["test"]["accuracy"],
             r["test"]["macro_f1"], r["train_time_s"], r["epochs_run"], r["adapter_bytes"] or "-"] for r in runs]
    columns = ["mode", "seed", "trainable params", "trainable %", "encoder trainable %", "test acc", "test macro-F1",
               "train time (s)", "epochs", "adapter bytes"]
    report["table_markdown"] = print_table(f"SemEval-2014 {args.domain}, {args.model}", columns, rows)
    if len(seeds) > 1:
        report["summary_markdown"] = print_table(
            f"mean over seeds {','.join(map(str, seeds))}", ["mode", "seeds", "trainable params", "test acc",
                                                            "test macro-F1", "train time (s)"], summarize(runs))
    for r in runs:
        print(f"{r['mode']} (seed {r['seed']}): per-class test F1 {r['test']['per_class_f1']}")
    if args.compare:
        mean_acc = {m: float(np.mean([r["test"]["accuracy"] for r in runs if r["mode"] == m])) for m in modes}
        report["lora_minus_full_accuracy_points"] = 100 * (mean_acc["lora"] - mean_acc["full"])
        print(f"LoRA - full test accuracy: {report['lora_minus_full_accuracy_points']:+.2f} points "
              f"(mean over {len(seeds)} seed(s))")
    write_json(out / "results.json", report)
    plot_curves(runs, out / "training_curves.png")
    plot_confusion([r for r in runs if r["seed"] == seeds[0]], out / "confusion_matrix.png")
    print(f"results: {out / 'results.json'}")
    if any(r["adapter_dir"] for r in runs):
        print(f"adapter: {next(r['adapter_dir'] for r in runs if r['adapter_dir'])}")
    return report


def check_rows(rows: Sequence[tuple[str, str, str]]) -> None:
    """(sentence, aspect, origin) rows: an empty sentence or aspect is an error naming the row; an
    aspect that the sentence does not contain gets a warning naming the row."""
    if not rows:
        raise ValueError("nothing to predict: give a sentence with --aspect, or --input FILE with rows")
    for sentence, aspect, origin in rows:
        if not sentence.strip():
            raise ValueError(f"{origin}: the sentence is empty")
        if not aspect.strip():
            raise ValueError(f"{origin}: the aspect of sentence {sentence[:60]!r} is empty")
        if aspect.strip().lower() not in sentence.lower():
            warnings.warn(f"{origin}: aspect {aspect!r} does not occur in the sentence {sentence[:60]!r}; its "
                          f"prediction is a guess", stacklevel=2)


def read_rows(path: Path) -> list[tuple[str, str, str]]:
    """(sentence, aspect, origin) from JSONL ({"sentence": ..., "aspect": ...} per line) or the .seg format."""
    if path.suffix == ".seg":
        return [(e.sentence, e.aspect, e.origin) for e in read_seg(path)]
    rows = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not part of row 1
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON object ({err})") from None
        if not isinstance(row, dict) or not isinstance(row.get("sentence"), str) or not isinstance(row.get("aspect"), str):
            raise ValueError(f'{path}:{number}: expected {{"sentence": "...", "aspect": "..."}}, got {line[:80]!r}')
        rows.append((row["sentence"], row["aspect"], f"{path.name}:{number}"))
    return rows


def check_output_path(path: Path) -> Path:
    """``--output`` checked before any inference: a file path (``~`` expanded) whose parent is, or can
    be, a folder."""
    path = path.expanduser()
    if path.is_dir() or not path.name or path.name in (".", ".."):
        raise ValueError(f"--output {path} is a folder; give a file such as {path / 'predictions.jsonl'}")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"--output {path}: {parent} is a file, not a folder")
    if parent is not None and not os.access(parent, os.W_OK):
        raise ValueError(f"--output {path}: {parent} is not writable")
    return path


def write_predictions(results: list[dict[str, Any]], path: Path, labels: Sequence[str]) -> None:
    """JSONL (one object per row) or CSV (sentence, aspect, sentiment, one probability column per label),
    written to a temporary file and renamed, which is removed again if writing fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            if path.suffix == ".csv":
                writer = csv.writer(f)
                writer.writerow(["sentence", "aspect", "sentiment", *(f"p_{label}" for label in labels)])
                for r in results:
                    writer.writerow([r["sentence"], r["aspect"], r["sentiment"], *(r["probabilities"][l] for l in labels)])
            else:
                for r in results:
                    f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def adapter_settings(adapter: lora_jax.Adapter, path: str) -> dict[str, Any]:
    """What predict reads from an adapter's metadata, checked: ``labels`` (one distinct name per class
    of the head), ``max_len`` (tokens, at least 8), ``quantize`` (the base's stored format)."""
    meta = adapter.metadata
    labels = meta.get("labels", list(LABELS))
    if not isinstance(labels, list) or len(labels) != len(LABELS) or len(set(labels)) != len(labels) \
            or not all(isinstance(l, str) and l for l in labels):
        raise ValueError(f"adapter {path}: metadata 'labels' must list {len(LABELS)} distinct names (one per class of "
                         f"its head), got {labels!r}")
    max_len = meta.get("max_len", 128)
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 8:
        raise ValueError(f"adapter {path}: metadata 'max_len' must be an integer of at least 8 tokens, got {max_len!r}")
    fmt = meta.get("quantize", "none")
    if fmt not in ("none", "int8", "nf4"):
        raise ValueError(f"adapter {path}: metadata 'quantize' must be 'none', 'int8' or 'nf4', got {fmt!r}")
    return {"labels": labels, "max_len": max_len, "quantize": fmt}


def load_base_as_trained(name: str, adapter: lora_jax.Adapter, **kwargs: Any):
    """``from_pretrained(name)`` with the base stored as the adapter's training stored it: quantized
    while loading when ``train --quantize`` recorded a format in its metadata (so the base fingerprint
    matches), else as read."""
    fmt = adapter_settings(adapter, f"(for {name})")["quantize"]
    return from_pretrained(name, num_labels=len(LABELS), **quantized_load(fmt, adapter.config), **kwargs)


def cmd_predict(args) -> list[dict[str, Any]]:
    rows = [(args.sentence, a, f"--aspect {i + 1}") for i, a in enumerate(args.aspect or [])] if args.sentence else []
    if args.input is not None:
        rows += read_rows(args.input)
    check_rows(rows)
    output = check_output_path(args.output) if args.output is not None else None
    adapter = lora_jax.load_adapter(args.adapter)
    settings = adapter_settings(adapter, args.adapter)
    model, base_params, tokenizer = load_base_as_trained(adapter.metadata.get("base_model") or PACKAGED_MINILM, adapter)
    # checks the adapter fits (names leaf and shapes) and that this is the base it was trained on
    params = lora_jax.apply_adapter(base_params, adapter, strict=not args.allow_other_base)
    net = lora_jax.lora(model, adapter.config)
    forward = jax.jit(lambda p, b: jax.nn.softmax(net.apply({"params": p}, b["ids"], b["mask"], b["types"]), -1))
    max_len = settings["max_len"]
    if max_len > model.config.max_tokens:
        raise ValueError(f"adapter {args.adapter}: metadata 'max_len' {max_len} exceeds the {model.config.max_tokens} "
                         f"tokens its base's position embeddings cover")
    encoded = encode([(sentence, aspect) for sentence, aspect, _ in rows], tokenizer, max_len)
    probs = np.zeros((len(rows), len(LABELS)), np.float32)
    with tqdm(total=len(rows), desc="predict", disable=len(rows) <= args.batch_size) as bar:
        for b in batches(encoded, args.batch_size, max_len, tokenizer.pad_token_id or 0):
            keep = b["index"] >= 0
            probs[b["index"][keep]] = np.asarray(forward(params, {k: b[k] for k in ("ids", "mask", "types")}))[keep]
            bar.update(int(keep.sum()))
    bad = np.flatnonzero(~np.isfinite(probs).all(-1))
    if bad.size:
        raise ValueError(f"the adapter at {args.adapter} outputs NaN or inf for rows {[rows[i][2] for i in bad[:5]]}: "
                         f"its weights or the base are broken (retrain with a lower learning rate); nothing was written")
    labels = settings["labels"]
    results = [{"sentence": sentence, "aspect": aspect, "sentiment": labels[int(p.argmax())],
                "probabilities": dict(zip(labels, p.round(4).tolist()))} for (sentence, aspect, _), p in zip(rows, probs)]
    if output is not None:
        write_predictions(results, output, labels)
        print(f"{len(results):,} predictions: {output}")
    elif args.input is not None:
        for r in results:
            print(json.dumps(r))
    else:
        print(f"sentence: {args.sentence}")
        for r in results:
            print(f"  {r['aspect']:<24} {r['sentiment']:<9} " + "  ".join(f"{l} {v:.3f}" for l, v in r["probabilities"].items()))
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "predict", "-h", "--help"):
        argv.insert(0, "train")
    parser = make_parser("bert_absa", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train LoRA (default) or full fine-tuning and evaluate on the test split",
                       formatter_class=parser.formatter_class)
    t.add_argument("--data-dir", default=None, help="folder with the SemEval-2014 files (.xml.seg or official XML); "
                   "default: a cached download")
    t.add_argument("--domain", default="laptops", choices=("laptops", "restaurants"), help="SemEval-2014 domain")
    t.add_argument("--keep-conflict", action="store_true", help="keep 'conflict' aspects (official XML only)")
    t.add_argument("--model", default=PACKAGED_MINILM, help="BERT/RoBERTa hub id or folder")
    t.add_argument("--full-finetune", action="store_true", help="train every parameter (the baseline)")
    t.add_argument("--compare", action="store_true", help="run LoRA and full fine-tuning, one summary table")
    t.add_argument("--targets", default="qv", help="'qv', 'all', or comma-separated layer names")
    t.add_argument("--train-pooler", action="store_true", help="LoRA mode: also train BERT's pooler in full "
                   "(PEFT's SEQ_CLS default trains only the classifier)")
    t.add_argument("--rank", type=positive_int, default=8, help="LoRA rank r")
    t.add_argument("--alpha", type=positive_float, default=16.0, help="LoRA alpha (scale alpha / r)")
    t.add_argument("--lora-dropout", type=probability, default=0.1, help="dropout on the LoRA input")
    lora_d, full_d = MODE_DEFAULTS["lora"], MODE_DEFAULTS["full"]
    per_mode = lambda key: f"(default: {lora_d[key]} LoRA, {full_d[key]} full fine-tuning)"
    t.add_argument("--lr", type=positive_float, default=None, help=f"peak learning rate {per_mode('lr')}")
    t.add_argument("--weight-decay", type=non_negative_float, default=0.01, help="AdamW weight decay")
    t.add_argument("--warmup", type=probability, default=None, help=f"warm-up fraction of all steps {per_mode('warmup')}")
    t.add_argument("--schedule", choices=SCHEDULES, default=None, help=f"learning-rate decay after warm-up "
                   f"{per_mode('schedule')}")
    t.add_argument("--class-weight", choices=CLASS_WEIGHTS, default=None, help="loss weight per class: 'balanced' "
                   f"weighs each class by n / (3 n_class), as for macro-F1 {per_mode('class_weight')}")
    t.add_argument("--lora-plus-ratio", type=positive_float, default=None, help="LoRA+: lora_B's learning rate over "
                   f"the rest (1: plain LoRA; default {lora_d['lora_plus_ratio']})")
    t.add_argument("--epochs", type=positive_int, default=None, help=f"maximum training epochs {per_mode('epochs')}")
    t.add_argument("--patience", type=positive_int, default=None,
                   help=f"early stop after this many epochs without dev gain {per_mode('patience')}")
    t.add_argument("--select-by", choices=("macro_f1", "accuracy"), default="macro_f1",
                   help="dev metric for early stopping and for the epoch whose weights are kept")
    t.add_argument("--batch-size", type=positive_int, default=None, help=f"training examples per step "
                   f"{per_mode('batch_size')}")
    t.add_argument("--eval-batch-size", type=positive_int, default=64, help="examples per evaluation batch")
    t.add_argument("--max-len", type=positive_int, default=128, help="maximum tokens per (sentence, aspect) pair")
    t.add_argument("--remat", default="dots", choices=sorted(REMAT_POLICIES),
                   help="activation checkpointing per encoder layer: 'dots' keeps the projections and recomputes "
                   "the rest (less memory, and faster on CPU), 'none' keeps everything")
    t.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype of the encoder's matmuls (params, LoRA factors and optimizer state stay float32)")
    t.add_argument("--quantize", default="none", choices=("none", "int8", "nf4"),
                   help="LoRA mode: store the frozen base kernels int8 (per-channel) or NF4 (QLoRA)")
    t.add_argument("--dev-fraction", type=open_fraction, default=0.1, help="share of train held out as dev")
    t.add_argument("--seed", type=non_negative_int, default=0, help="seed of dev split, init, batch order, dropout")
    t.add_argument("--seeds", type=seed_list, default=None, help="comma-separated seeds (e.g. 0,1,2): one run per "
                   "mode and seed, then mean ± sd; adapters go to OUT/seed<N>/adapter")
    t.add_argument("--limit", type=positive_int, default=None, help="use only the first N examples of each split")
    t.add_argument("--out", default=None, help="output folder (default runs/bert_absa/<timestamp>)")
    p = sub.add_parser("predict", help="per-aspect sentiment with a saved adapter", formatter_class=parser.formatter_class)
    p.add_argument("--adapter", required=True, help="adapter folder written by train")
    p.add_argument("sentence", nargs="?", default=None, help="a review sentence (with one or more --aspect)")
    p.add_argument("--aspect", action="append", default=None, help="an aspect term of the sentence (repeat for several)")
    p.add_argument("--input", type=Path, default=None, help='rows to predict: JSONL {"sentence", "aspect"} per line, '
                   "or a .seg file (sentence with $T$, aspect, polarity)")
    p.add_argument("--output", type=Path, default=None, help="write predictions here: .csv, else JSONL "
                   "(default: print them)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="rows per forward pass")
    p.add_argument("--allow-other-base", action="store_true",
                   help="apply the adapter even if the base model's weights differ from those it was trained on")
    args = parser.parse_args(argv)
    if args.command == "predict" and args.sentence is None and args.input is None:
        parser.error("predict needs a sentence with --aspect, or --input FILE")
    if args.command == "predict" and args.sentence is not None and not args.aspect:
        parser.error("a sentence needs at least one --aspect")
    if args.command == "train" and args.max_len < 8:
        parser.error(f"--max-len must be at least 8 tokens (room for [CLS], the sentence, [SEP], the aspect), "
                     f"got {args.max_len}")
    return args


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    return cmd_train(args) if args.command == "train" else cmd_predict(args)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
