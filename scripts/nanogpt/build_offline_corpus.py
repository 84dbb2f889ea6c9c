"""Build the offline corpus: the Python standard library's own source, byte-level, as `.bin` shards.

Every machine that runs this project has it, so a CPU run needs no download. Each `.py` file is cut
at line boundaries into pieces of about 2 KB; a piece's tokens are its UTF-8 bytes (ids 0–255)
followed by an end-of-document token (256), so the model's vocabulary just needs to exceed 256.
Files go to train or validation by a hash of their path (about 2 % validation, never both); the
pieces of each split are shuffled with a fixed seed, so every batch and the first validation tokens
mix many modules instead of reading one long file. The text depends on the Python version: compare
losses only between runs on the same corpus.

    python -m scripts.nanogpt.build_offline_corpus --out-dir outputs/nanogpt/data/stdlib_bytes
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from scripts.nanogpt.config import resolve_path
from scripts.nanogpt.data import write_shard

END_OF_DOCUMENT = 256
DEFAULT_OUT_DIR = "outputs/nanogpt/data/stdlib_bytes"
VAL_PERCENT = 2
PIECE_BYTES = 2048


def stdlib_sources() -> list[tuple[str, Path]]:
    """(relative path, path) of every `.py` file of the standard library, sorted; installed packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root).as_posix()
        if "site-packages" in relative or "dist-packages" in relative:
            continue
        found.append((relative, path))
    return sorted(found)


def line_pieces(data: bytes, size: int) -> list[bytes]:
    """Cut text into consecutive pieces of at least `size` bytes (the last may be shorter), at line ends."""
    pieces, start = [], 0
    while start < len(data):
        end = data.find(b"\n", start + size)
        end = len(data) if end < 0 else end + 1
        pieces.append(data[start:end])
        start = end
    return pieces


def _write_split(
    files: list[Path], out_dir: Path, prefix: str, max_tokens: int | None, shard_tokens: int, rng: random.Random
) -> int:
    pieces = [piece for path in files for piece in line_pieces(path.read_bytes(), PIECE_BYTES)]
    rng.shuffle(pieces)
    data = np.frombuffer(b"".join(pieces), dtype=np.uint8).astype(np.uint16)
    ends = np.cumsum([len(piece) for piece in pieces])
    tokens = np.insert(data, ends, END_OF_DOCUMENT)[:max_tokens]
    for index, start in enumerate(range(0, tokens.size, shard_tokens)):
        write_shard(out_dir / f"{prefix}_{index:03d}.bin", tokens[start : start + shard_tokens])
    return int(tokens.size)


def build_offline_corpus(
    out_dir: str | Path = DEFAULT_OUT_DIR,
    max_train_tokens: int | None = None,
    max_val_tokens: int | None = None,
    shard_tokens: int = 10_000_000,
    seed: int = 0,
) -> dict[str, object]:
    """Write train_*.bin / val_*.bin shards and meta.json into `out_dir`; return the metadata."""
    out_dir = resolve_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("train_*.bin"), *out_dir.glob("val_*.bin")]:
        old.unlink()
    train, val = [], []
    for relative, path in stdlib_sources():
        (val if zlib.crc32(relative.encode()) % 100 < VAL_PERCENT else train).append(path)
    rng = random.Random(seed)
    meta = {
        "source": f"Python {sys.version.split()[0]} standard library (.py files) at {sysconfig.get_paths()['stdlib']}",
        "tokenizer": f"bytes 0-255, end-of-document {END_OF_DOCUMENT} after every ~{PIECE_BYTES}-byte piece",
        "vocab_min": END_OF_DOCUMENT + 1,
        "train_files": len(train),
        "val_files": len(val),
        "train_tokens": _write_split(train, out_dir, "train", max_train_tokens, shard_tokens, rng),
        "val_tokens": _write_split(val, out_dir, "val", max_val_tokens, shard_tokens, rng),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR)
    parser.add_argument("--max-train-tokens", type=int, default=None, help="cap on training tokens (default: all)")
    parser.add_argument("--max-val-tokens", type=int, default=None, help="cap on validation tokens (default: all)")
    parser.add_argument("--shard-tokens", type=int, default=10_000_000)
    args = parser.parse_args()
    meta = build_offline_corpus(args.out_dir, args.max_train_tokens, args.max_val_tokens, args.shard_tokens)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
