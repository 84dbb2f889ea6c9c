"""The distribution seam (mofasgd.distribution): which one an optimizer resolves, and the refusal of mixed layouts."""

import subprocess
import sys
import textwrap

import torch

from mofasgd import MoFaSGD, distribution


def test_one_process_resolves_to_nothing_crossing_ranks():
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = MoFaSGD([p], rank=2, data_parallel=True)  # data_parallel without a process group: one process
    resolved = opt._distribution()
    assert type(resolved) is distribution.Distribution and not resolved.sharded
    assert resolved.rows(p) is None and resolved.average_sketches is None
    flags = torch.tensor([1.0, 0.0])
    assert resolved.sum_shares(flags) is flags and flags.tolist() == [1.0, 0.0]
    assert opt._distribution() is resolved  # resolved once


def test_resolution_under_a_process_group_and_the_refusal_of_mixed_shards(tmp_path):
    """In a fresh one-rank gloo process: replicas with data_parallel, row shards for DTensors, and a clear error
    when a managed matrix is left unsharded beside sharded ones."""
    script = textwrap.dedent(
        """
        import torch, torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        from mofasgd import distribution
        from llamafactory_mfsgd.launcher import free_port

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        plain = torch.nn.Parameter(torch.randn(6, 4))
        describe = lambda p: f"matrix {tuple(p.shape)}"
        assert type(distribution.resolve([plain], False, describe)) is distribution.Distribution
        # one rank: nothing to average, so replicas resolve to one process too
        assert type(distribution.resolve([plain], True, describe)) is distribution.Distribution
        mesh = init_device_mesh("cpu", (1,))
        shard = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
        rows = distribution.resolve([shard], False, describe)
        assert rows.sharded and rows.rows(shard) is not None
        try:
            distribution.resolve([shard, plain], False, describe)
        except ValueError as error:
            assert "matrix (6, 4) is not sharded" in str(error) and "fully_shard" in str(error), error
        else:
            raise AssertionError("a mixed layout was accepted")
        dist.destroy_process_group()
        print("OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-2000:]
