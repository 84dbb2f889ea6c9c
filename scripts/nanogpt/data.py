"""Token shards in the FineWeb `.bin` format, and the loaders that cut them into batches.

Shard layout (little-endian): a header of 256 int32 — magic 20240520, version 1, number of tokens,
the rest zero — followed by that many uint16 token ids.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


def write_shard(path: str | Path, tokens: np.ndarray | list[int]) -> None:
    """Write token ids (each in [0, 65535]) as one shard."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError("token ids must fit in uint16 ([0, 65535]) for the .bin format")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(header.tobytes())
        handle.write(tokens.astype("<u2").tobytes())


def read_shard(path: str | Path) -> np.ndarray:
    """Token ids of one shard as a read-only uint16 memory map; the header is checked against the file."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ValueError(f"{path}: magic number {header[0]} is not {MAGIC}; not a token shard")
    if header[1] != VERSION:
        raise ValueError(f"{path}: shard version {header[1]} is not supported (expected {VERSION})")
    count = int(header[2])
    if size != HEADER_BYTES + 2 * count:
        raise ValueError(f"{path}: header says {count} tokens but the file holds {(size - HEADER_BYTES) / 2:g}")
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))


def shard_paths(pattern: str | Path) -> list[Path]:
    """Sorted files matching a glob pattern; an empty match is an error that names the pattern."""
    paths = sorted(Path(p) for p in glob.glob(str(pattern)))
    if not paths:
        raise FileNotFoundError(
            f"no token shards match {pattern}; build the offline corpus (scripts/nanogpt/build_offline_corpus.py) "
            "or tokenise FineWeb (scripts/nanogpt/prepare_fineweb.py)"
        )
    return paths


@dataclass
class LoaderPosition:
    """Where the next batch starts: shard index and token offset (what a checkpoint stores)."""

    shard: int = 0
    offset: int = 0


class TokenLoader:
    """Sequential (inputs, targets) batches over a list of shards, split between processes.

    Each call takes `batch_size * seq_len + 1` consecutive tokens per process from the current
    shard (process `rank` takes the rank-th slice), then advances by the world's share. A shard
    whose remainder is too short is skipped; after the last shard the loader wraps to the first.
    """

    def __init__(self, paths: list[Path], batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1) -> None:
        self.paths, self.batch_size, self.seq_len = paths, batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.span = batch_size * seq_len
        self.position = LoaderPosition()
        self._tokens = read_shard(paths[0])
        self._loaded = 0
        if all(read_shard(p).size < self.world_size * self.span + 1 for p in paths):
            raise ValueError(
                f"every shard is shorter than one batch ({self.world_size * self.span + 1} tokens); "
                "lower train.micro_batch_size or train.seq_len"
            )

    def _shard(self, index: int) -> np.ndarray:
        if index != self._loaded:
            self._tokens, self._loaded = read_shard(self.paths[index]), index
        return self._tokens

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each int64 of shape (batch_size, seq_len), on the CPU."""
        needed = self.world_size * self.span + 1
        while self._shard(self.position.shard).size - self.position.offset < needed:
            self.position = LoaderPosition((self.position.shard + 1) % len(self.paths), 0)
        start = self.position.offset + self.rank * self.span
        chunk = torch.from_numpy(self._shard(self.position.shard)[start : start + self.span + 1].astype(np.int64))
        self.position = LoaderPosition(self.position.shard, self.position.offset + self.world_size * self.span)
        inputs = chunk[:-1].view(self.batch_size, self.seq_len)
        targets = chunk[1:].view(self.batch_size, self.seq_len)
        return inputs, targets

    def state(self) -> dict[str, int]:
        """Position as plain ints (checkpoint-friendly)."""
        return {"shard": self.position.shard, "offset": self.position.offset}

    def load_state(self, state: dict[str, int]) -> None:
        """Continue from a position returned by `state`."""
        self.position = LoaderPosition(int(state["shard"]), int(state["offset"]))


class ValidationSet:
    """The fixed validation set: the first `total_tokens` tokens of the validation shards, in batches.

    `total_tokens` is rounded down to whole batches over all processes. Every iteration starts again
    from the first shard, so each evaluation sees the same tokens and losses compare across steps.
    """

    def __init__(
        self, paths: list[Path], total_tokens: int, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1
    ) -> None:
        per_step = world_size * batch_size * seq_len
        self.steps = total_tokens // per_step
        if self.steps == 0:
            raise ValueError(f"train.val_tokens ({total_tokens}) is smaller than one validation batch ({per_step})")
        available = sum(read_shard(p).size - 1 for p in paths)
        if self.steps * per_step > available:
            raise ValueError(
                f"train.val_tokens ({total_tokens}) exceeds the {available} tokens in the validation shards; lower it"
            )
        self.paths, self.batch_size, self.seq_len, self.rank, self.world_size = (
            paths,
            batch_size,
            seq_len,
            rank,
            world_size,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = TokenLoader(self.paths, self.batch_size, self.seq_len, self.rank, self.world_size)
        for _ in range(self.steps):
            yield loader.next_batch()
