"""Tokenise FineWeb with the GPT-2 tokenizer into `.bin` shards (needs internet: Hugging Face Hub + tiktoken).

    pip install datasets tiktoken          # both come with the project's dependencies
    python -m scripts.nanogpt.prepare_fineweb --max-tokens 1_000_000_000   # ~2 GB of shards

Each document becomes <|endoftext|> followed by its GPT-2 tokens. The first shard is the
validation split (fineweb_val_000000.bin), the rest are training shards (fineweb_train_000001.bin,
...), matching `data.train_files` / `data.val_files` of the base configs. Shards hold
`--shard-tokens` tokens each (100M by default, 200 MB on disk); documents may straddle two shards.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Iterator
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from scripts.nanogpt.config import resolve_path
from scripts.nanogpt.data import write_shard

DEFAULT_OUT_DIR = "outputs/nanogpt/data/fineweb10B"
_encoder = None


def _gpt2_tokens(text: str) -> np.ndarray:
    global _encoder
    if _encoder is None:  # one encoder per worker process
        import tiktoken

        _encoder = tiktoken.get_encoding("gpt2")
    tokens = [_encoder.eot_token, *_encoder.encode_ordinary(text)]
    return np.asarray(tokens, dtype=np.uint16)  # GPT-2's 50257 ids fit in uint16


def write_token_shards(
    documents: Iterable[np.ndarray], out_dir: Path, shard_tokens: int, max_tokens: int | None = None
) -> list[Path]:
    """Pack token arrays into shards: the first one named ..._val_..., the rest ..._train_...; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = np.empty(shard_tokens, dtype=np.uint16)
    filled, written, paths = 0, 0, []

    def flush(count: int) -> None:
        split = "val" if not paths else "train"
        path = out_dir / f"fineweb_{split}_{len(paths):06d}.bin"
        write_shard(path, buffer[:count])
        paths.append(path)

    for tokens in documents:
        if max_tokens is not None:
            tokens = tokens[: max_tokens - written]
        while tokens.size:
            take = min(tokens.size, shard_tokens - filled)
            buffer[filled : filled + take] = tokens[:take]
            filled, written, tokens = filled + take, written + take, tokens[take:]
            if filled == shard_tokens:
                flush(filled)
                filled = 0
        if max_tokens is not None and written >= max_tokens:
            break
    if filled:
        flush(filled)
    return paths


def _documents(dataset: str, name: str, workers: int) -> Iterator[np.ndarray]:
    from datasets import load_dataset

    stream = load_dataset(dataset, name=name, split="train", streaming=True)
    texts = (row["text"] for row in stream)
    with Pool(workers) as pool:
        yield from pool.imap(_gpt2_tokens, texts, chunksize=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="HuggingFaceFW/fineweb")
    parser.add_argument("--name", default="sample-10BT", help="dataset configuration (FineWeb sample)")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR)
    parser.add_argument("--shard-tokens", type=int, default=100_000_000)
    parser.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens (default: all)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = parser.parse_args()
    paths = write_token_shards(
        _documents(args.dataset, args.name, args.workers),
        resolve_path(args.out_dir),
        args.shard_tokens,
        args.max_tokens,
    )
    print(f"wrote {len(paths)} shards to {resolve_path(args.out_dir)}")


if __name__ == "__main__":
    main()
