import numpy as np
import pytest

from scripts.nanogpt.build_offline_corpus import END_OF_DOCUMENT, build_offline_corpus
from scripts.nanogpt.data import MAGIC, TokenLoader, ValidationSet, read_shard, shard_paths, write_shard


def test_shard_round_trips_tokens_and_header(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 2**16, size=10_001).astype(np.uint16)
    tokens[:2] = (0, 2**16 - 1)
    path = tmp_path / "shard.bin"
    write_shard(path, tokens)

    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [MAGIC, 1, tokens.size]
    assert not header[3:].any()
    assert path.stat().st_size == 256 * 4 + 2 * tokens.size
    np.testing.assert_array_equal(read_shard(path), tokens)


def test_read_shard_rejects_bad_magic_and_truncated_files(tmp_path):
    path = tmp_path / "shard.bin"
    write_shard(path, np.arange(100))
    raw = bytearray(path.read_bytes())

    (tmp_path / "truncated.bin").write_bytes(raw[:-2])
    with pytest.raises(ValueError, match="header says 100 tokens"):
        read_shard(tmp_path / "truncated.bin")

    raw[0] ^= 1
    (tmp_path / "magic.bin").write_bytes(raw)
    with pytest.raises(ValueError, match="magic number"):
        read_shard(tmp_path / "magic.bin")


def test_write_shard_refuses_ids_beyond_uint16(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        write_shard(tmp_path / "x.bin", [1, 2**16])


def test_missing_shards_name_the_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        shard_paths(tmp_path / "nothing_here_*.bin")


def test_loader_shifts_targets_and_splits_processes_without_overlap(tmp_path):
    write_shard(tmp_path / "a.bin", np.arange(1000))
    write_shard(tmp_path / "b.bin", np.arange(1000, 1400))
    paths = shard_paths(tmp_path / "*.bin")
    ranks = [TokenLoader(paths, batch_size=2, seq_len=8, rank=r, world_size=2) for r in range(2)]
    single = TokenLoader(paths, batch_size=2, seq_len=8)

    seen = []
    for _ in range(45):  # 31 batches fit in a.bin (its short tail is skipped), 12 in b.bin, then it wraps
        for loader in ranks:
            inputs, targets = loader.next_batch()
            assert inputs.shape == (2, 8)
            np.testing.assert_array_equal(targets.flatten()[:-1], inputs.flatten()[1:])
            assert int(targets[-1, -1]) == int(inputs[-1, -1]) + 1
            seen.append(inputs.flatten())
    flat = np.concatenate(seen[:62])
    np.testing.assert_array_equal(flat[: 31 * 32], np.arange(31 * 32))  # two ranks = consecutive spans
    assert ranks[0].state() == {"shard": 0, "offset": 32 * (45 - 31 - 12)}
    np.testing.assert_array_equal(seen[2 * 43], np.arange(16))  # rank 0, first batch after the wrap

    # One process taking twice the micro-batches sees the same tokens as two processes.
    first, second = single.next_batch()[0], single.next_batch()[0]
    np.testing.assert_array_equal(np.concatenate([first.flatten(), second.flatten()]), np.arange(32))


def test_loader_position_round_trips(tmp_path):
    write_shard(tmp_path / "a.bin", np.arange(5000))
    paths = shard_paths(tmp_path / "*.bin")
    loader = TokenLoader(paths, batch_size=4, seq_len=16)
    for _ in range(7):
        loader.next_batch()
    resumed = TokenLoader(paths, batch_size=4, seq_len=16)
    resumed.load_state(loader.state())
    np.testing.assert_array_equal(resumed.next_batch()[0], loader.next_batch()[0])


def test_validation_set_is_fixed_and_checks_its_budget(tmp_path):
    write_shard(tmp_path / "val.bin", np.arange(3000))
    paths = shard_paths(tmp_path / "val.bin")
    val = ValidationSet(paths, total_tokens=1000, batch_size=2, seq_len=16)
    assert val.steps == 31
    first, again = list(val), list(val)
    assert all((a[0] == b[0]).all() for a, b in zip(first, again))
    with pytest.raises(ValueError, match="exceeds"):
        ValidationSet(paths, total_tokens=10_000, batch_size=2, seq_len=16)


def test_offline_corpus_is_byte_level_stdlib_text(tmp_path):
    meta = build_offline_corpus(tmp_path, max_train_tokens=50_000, max_val_tokens=5_000, shard_tokens=20_000)
    train = np.concatenate([read_shard(p) for p in shard_paths(tmp_path / "train_*.bin")])
    val = np.concatenate([read_shard(p) for p in shard_paths(tmp_path / "val_*.bin")])
    assert train.size == meta["train_tokens"] == 50_000 and len(shard_paths(tmp_path / "train_*.bin")) == 3
    assert val.size == meta["val_tokens"] == 5_000
    assert train.max() <= END_OF_DOCUMENT and END_OF_DOCUMENT in train
    text = bytes(train[train < 256].astype(np.uint8)).decode("utf-8", errors="replace")
    assert "def " in text and "import " in text
    assert meta["train_files"] > 10 * meta["val_files"] > 0
