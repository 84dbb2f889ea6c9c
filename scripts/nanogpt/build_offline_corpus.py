"""Build the offline corpus: the Python standard library's own source, byte-level, as `.bin` shards.

Every machine that runs this project has it, so a CPU run needs no download. Tokens are the UTF-8
bytes of each `.py` file (ids 0–255) followed by an end-of-document token (256); the model's
vocabulary just needs to exceed 256. Files are assigned to train or validation by a hash of their
path (about 2 % validation), then shuffled with a fixed seed so the training stream mixes modules.
The exact text depends on the Python version, so compare losses only between runs on the same corpus.

    python scripts/nanogpt/build_offline_corpus.py --out-dir outputs/nanogpt/data/stdlib_bytes
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `nanogpt` importable

from nanogpt.config import resolve_path  # noqa: E402
from nanogpt.data import write_shard  # noqa: E402

END_OF_DOCUMENT = 256
DEFAULT_OUT_DIR = "outputs/nanogpt/data/stdlib_bytes"
VAL_PERCENT = 2


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


def _tokens(path: Path) -> np.ndarray:
    data = np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.uint16)
    return np.append(data, np.uint16(END_OF_DOCUMENT))


def _write_split(files: list[Path], out_dir: Path, prefix: str, max_tokens: int | None, shard_tokens: int) -> int:
    pieces, total = [], 0
    for path in files:
        if max_tokens is not None and total >= max_tokens:
            break
        pieces.append(_tokens(path))
        total += pieces[-1].size
    tokens = np.concatenate(pieces)[:max_tokens]
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
    random.Random(seed).shuffle(train)
    meta = {
        "source": f"Python {sys.version.split()[0]} standard library (.py files) at {sysconfig.get_paths()['stdlib']}",
        "tokenizer": f"bytes 0-255, end-of-document {END_OF_DOCUMENT}",
        "vocab_min": END_OF_DOCUMENT + 1,
        "train_files": len(train),
        "val_files": len(val),
        "train_tokens": _write_split(train, out_dir, "train", max_train_tokens, shard_tokens),
        "val_tokens": _write_split(val, out_dir, "val", max_val_tokens, shard_tokens),
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
