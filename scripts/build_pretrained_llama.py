"""Pre-train a small LLaMA offline, so that SFT benchmarks start from a language model instead of random weights.

Corpus: the Python standard library's own `.py` sources (code, comments, docstrings; every machine that runs this
project has them), split into train and validation **by file** with the same hash as the NanoGPT offline corpus
(``scripts/nanogpt/build_offline_corpus.py``), cut into ~2 KB pieces at line ends and shuffled with a fixed seed.
The demo conversations (``data/tulu3_demo*.jsonl``) are **not** in it, nor in the tokenizer's training text: the
SFT task of ``benchmarks/sft_quality.py`` is held out from pre-training, and its chat-role tokens
(``<|user|>``, ``<|assistant|>``) are seen first in SFT, as a base model's chat tokens are.

Tokenizer: byte-level BPE trained on the training pieces, with the special tokens and Tulu-3 chat template of
``build_tiny_llama.py`` (so LLaMA-Factory's ``tulu_v3`` template works). Model: LlamaForCausalLM (GQA, untied
head, RoPE), trained with AdamW, linear warm-up then cosine decay, next-token cross-entropy on packed sequences.

The report (``pretrain_report.json`` in the model directory, and ``--results-dir``) gives the validation loss
on held-out files next to two baselines: the uniform distribution (ln V) and the unigram distribution of the
training tokens (add-one smoothed) -- a model that beats the unigram baseline by a wide margin uses context.
The model is saved in fp32 to ``--out`` and in bf16 to ``--out``-bf16 (for ``pure_bf16`` runs, which keep the
stored dtype).

Two sizes (``--size``): ``1m`` (1.26 M parameters, about 5 min on 2 cores; the base of the full SFT grid) and
``10m`` (10.4 M parameters, 3.7 M tokens, about 30 min on 2 cores; the base of the scale check). Any architecture
or training flag given explicitly overrides the preset.

    python -m scripts.build_pretrained_llama --out models/pretrained-llama --results-dir results
    python -m scripts.build_pretrained_llama --size 10m --out models/pretrained-llama-10m
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
import zlib
from pathlib import Path
from typing import Any

from scripts.build_tiny_llama import build_model, train_tokenizer
from scripts.nanogpt.build_offline_corpus import PIECE_BYTES, VAL_PERCENT, line_pieces, stdlib_sources

REPO = Path(__file__).resolve().parents[1]

REPORT = "pretrain_report.json"


def split_sources(seed: int = 0) -> tuple[list[str], list[str]]:
    """Training and validation pieces of the stdlib sources (split by file, each list shuffled with `seed`)."""
    train, val = [], []
    for relative, path in stdlib_sources():
        pieces = [p.decode("utf-8", errors="replace") for p in line_pieces(path.read_bytes(), PIECE_BYTES)]
        (val if zlib.crc32(relative.encode()) % 100 < VAL_PERCENT else train).extend(pieces)
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def pack(tokenizer, texts: list[str], max_tokens: int) -> list[int]:
    """Token ids of `texts`, each followed by eos, concatenated, cut at `max_tokens`."""
    ids: list[int] = []
    for start in range(0, len(texts), 256):
        for encoded in tokenizer(texts[start : start + 256], add_special_tokens=False)["input_ids"]:
            ids.extend(encoded)
            ids.append(tokenizer.eos_token_id)
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens]


def unigram_cross_entropy(train_ids: list[int], val_ids: list[int], vocab_size: int) -> float:
    """Cross-entropy (nats/token) of `val_ids` under the add-one-smoothed unigram distribution of `train_ids`."""
    counts = [1] * vocab_size
    for token in train_ids:
        counts[token] += 1
    total = sum(counts)
    return -sum(math.log(counts[token] / total) for token in val_ids) / len(val_ids)


def lr_at(step: int, steps: int, warmup: int, peak: float, min_frac: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `peak` to `min_frac * peak` at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def evaluate(model, data, seq_len: int, batch: int) -> float:
    """Mean next-token loss over the non-overlapping `seq_len` windows of the 1-D tensor `data`."""
    import torch

    model.eval()
    windows = data[: (data.numel() - 1) // seq_len * seq_len + 1]
    n = (windows.numel() - 1) // seq_len
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, n, batch):
            rows = range(start, min(n, start + batch))
            x = torch.stack([windows[i * seq_len : (i + 1) * seq_len] for i in rows])
            y = torch.stack([windows[i * seq_len + 1 : (i + 1) * seq_len + 1] for i in rows])
            logits = model(input_ids=x).logits
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    model.train()
    return total / count


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """Build the tokenizer and model, pre-train, save both dtypes and the report; return the report."""
    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train_texts, val_texts = split_sources(args.seed)
    tokenizer = train_tokenizer(train_texts[: args.tokenizer_pieces], args.vocab)
    tokens_needed = args.steps * args.batch * args.seq_len + 1
    train_ids = pack(tokenizer, train_texts, tokens_needed)
    val_ids = pack(tokenizer, val_texts, args.val_tokens + 1)
    if len(train_ids) < tokens_needed:
        raise SystemExit(f"corpus has {len(train_ids)} training tokens, {tokens_needed} needed")
    vocab = len(tokenizer)
    unigram = unigram_cross_entropy(train_ids, val_ids, vocab)

    model = build_model(tokenizer, args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads, args.seed)
    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    data = torch.tensor(train_ids, dtype=torch.long)
    val = torch.tensor(val_ids, dtype=torch.long)
    tokens_per_step = args.batch * args.seq_len
    history = [{"step": 0, "val_loss": evaluate(model, val, args.seq_len, args.batch)}]
    print(f"[pretrain] {params:,} parameters; val loss {history[0]['val_loss']:.3f}; unigram {unigram:.3f}")
    train_start = time.perf_counter()
    for step in range(args.steps):
        chunk = data[step * tokens_per_step : (step + 1) * tokens_per_step + 1]
        x = chunk[:-1].view(args.batch, args.seq_len)
        y = chunk[1:].view(args.batch, args.seq_len)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.warmup, args.lr)
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            entry = {"step": done, "train_loss": loss.item(), "elapsed_s": round(time.perf_counter() - start, 1)}
            if done % args.val_every == 0 or done == args.steps:
                entry["val_loss"] = evaluate(model, val, args.seq_len, args.batch)
            history.append(entry)
            print(f"[pretrain] {json.dumps(entry)}", flush=True)
    train_s = time.perf_counter() - train_start

    out = Path(args.out)
    out_bf16 = out.with_name(out.name + "-bf16")
    model.generation_config.do_sample = False
    for path, dtype in ((out, torch.float32), (out_bf16, torch.bfloat16)):
        path.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(path)
        model.to(dtype).save_pretrained(path)
    import transformers

    final = history[-1]["val_loss"]
    report = {
        "model": {
            "path": str(out),
            "bf16_path": str(out_bf16),
            "parameters": params,
            "non_embedding_parameters": params - embedding,
            "hidden": args.hidden,
            "layers": args.layers,
            "intermediate": args.intermediate,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "vocab": vocab,
        },
        "corpus": {
            "source": "Python standard library .py files (split by file; demo conversations held out)",
            "python": platform.python_version(),
            "train_tokens_seen": args.steps * tokens_per_step,
            "val_tokens": len(val_ids) - 1,
        },
        "training": {
            "steps": args.steps,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "lr": args.lr,
            "warmup": args.warmup,
            "weight_decay": args.weight_decay,
            "seed": args.seed,
            "threads": args.threads,
            "train_s": round(train_s, 1),
            "wall_s": round(time.perf_counter() - start, 1),
        },
        "val_loss": final,
        "baselines": {"uniform_ln_vocab": math.log(vocab), "unigram": unigram},
        "history": history,
        "machine": {
            "device": f"CPU ({os.cpu_count()} cores)",
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    for path in (out, out_bf16):
        (path / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    if args.results_dir:
        results = Path(args.results_dir)
        results.mkdir(parents=True, exist_ok=True)
        (results / "pretrained_base.json").write_text(json.dumps(report, indent=2) + "\n")
        (results / "pretrained_base.md").write_text(render_markdown(report))
    print(render_markdown(report))
    return report


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a short Markdown page."""
    m, c, t, b = report["model"], report["corpus"], report["training"], report["baselines"]
    lines = [
        "# Pre-trained base for the SFT benchmarks",
        "",
        f"LlamaForCausalLM, hidden {m['hidden']}, {m['layers']} layers, MLP {m['intermediate']}, "
        f"{m['heads']} heads ({m['kv_heads']} KV), vocabulary {m['vocab']} (byte-level BPE): "
        f"{m['parameters']:,} parameters ({m['non_embedding_parameters']:,} outside the embeddings and head).",
        f"Pre-trained on {c['train_tokens_seen']:,} tokens of the {c['source']}, Python {c['python']}: "
        f"{t['steps']} AdamW steps of {t['batch']} x {t['seq_len']} tokens, peak lr {t['lr']:g}, "
        f"{t['warmup']} warm-up steps, cosine to 10 %, seed {t['seed']}; {t['train_s']:.0f} s of training "
        f"({t['wall_s']:.0f} s in all) on {report['machine']['device']}, {t['threads']} torch thread(s).",
        "",
        f"| validation loss (nats/token, {c['val_tokens']:,} held-out tokens) | value |",
        "|---|---:|",
        f"| uniform baseline ln V | {b['uniform_ln_vocab']:.3f} |",
        f"| unigram baseline (training-token frequencies) | {b['unigram']:.3f} |",
        f"| random initialisation | {report['history'][0]['val_loss']:.3f} |",
        f"| **pre-trained model** | **{report['val_loss']:.3f}** |",
        "",
        "| step | train loss | val loss |",
        "|---:|---:|---:|",
    ]
    for entry in report["history"]:
        if "val_loss" in entry:
            train = f"{entry['train_loss']:.3f}" if "train_loss" in entry else ""
            lines.append(f"| {entry['step']} | {train} | {entry['val_loss']:.3f} |")
    return "\n".join(lines) + "\n"


_PRESET_KEYS = "hidden layers intermediate heads kv_heads steps lr warmup val_every threads".split()
SIZES: dict[str, dict[str, Any]] = {
    "1m": dict(zip(_PRESET_KEYS, (128, 4, 352, 4, 2, 400, 3e-3, 40, 100, 1))),
    "10m": dict(zip(_PRESET_KEYS, (320, 8, 864, 10, 5, 900, 2e-3, 90, 150, 2))),
}
"""Architecture and schedule per ``--size``: head size 32 and 2 query heads per KV head in both."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="1m", help="preset for the flags below it")
    parser.add_argument("--out", default=str(REPO / "models" / "pretrained-llama"))
    parser.add_argument("--results-dir", default=None, help="also write pretrained_base.md/.json here")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--tokenizer-pieces", type=int, default=4000, help="training pieces the BPE is trained on")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--val-tokens", type=int, default=32768)
    parser.add_argument("--val-every", type=int)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for key, value in SIZES[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


if __name__ == "__main__":
    pretrain(parse_args())
