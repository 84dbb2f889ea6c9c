"""How an optimizer's ranks meet, resolved once: one process, data-parallel replicas, or FSDP2 row shards.

The optimizer asks its :class:`Distribution` instead of asking each tensor what it is: how the pending projections
are combined (averaged over DDP ranks, G^T U summed over row shards), how shares of norms and flags are summed
(row shards hold parts of a matrix; replicas already agree), how the rows of a bucket's panels meet
(:class:`~mofasgd.sharding.RowGroup`, the reductions ``factor_math`` takes), and how a gradient the optimizer keeps
out of DDP's all-reduce is averaged. :func:`resolve` picks the one that fits the managed matrices, once (after
accelerate has swapped in FSDP2's sharded parameters), and names what is wrong when they are mixed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from mofasgd import data_parallel as dp
from mofasgd import sharding

if TYPE_CHECKING:
    from mofasgd.intake import GradientIntake


class Distribution:
    """One process: nothing crosses ranks."""

    sharded = False  # the managed matrices are FSDP2 row shards

    def synchronize(self, intake: GradientIntake) -> None:
        """Combine the intake's pending sums over ranks (nothing to combine here)."""

    def sum_shares(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum per-rank shares of a small tensor (a squared norm, non-finite flags) in place; returns it."""
        return tensor

    def rows(self, p: torch.Tensor) -> sharding.RowGroup | None:
        """How the rows of the panels of `p`'s bucket meet across ranks; None when they all live here."""
        return None

    def average_gradient_(self, grad: torch.Tensor) -> None:
        """Average a gradient kept out of DDP's all-reduce (the hooked AdamW side) over the replicas."""

    @property
    def average_sketches(self) -> Callable[[list[torch.Tensor]], None] | None:
        """Averages thin sketches over replicas in place (the first gradient's init), or None."""
        return None


class DataParallel(Distribution):
    """Replicas (DDP): the managed matrices are left out of DDP's all-reduce, so their projections are averaged."""

    def synchronize(self, intake: GradientIntake) -> None:
        """Average every bucket's G V and G^T U over the replicas (one flattened all-reduce, with seen flags)."""
        intake.synchronize(sharded=False)

    def average_gradient_(self, grad: torch.Tensor) -> None:
        """Average the gradient over the replicas, in the same order on every rank."""
        dp.average_tensor_(grad)

    @property
    def average_sketches(self) -> Callable[[list[torch.Tensor]], None] | None:
        """One flattened all-reduce per dtype, divided by the world size."""
        return dp.average_in_place


class ShardedRows(Distribution):
    """FSDP2: every managed matrix is sharded along its rows on one device mesh (`group`)."""

    sharded = True

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def synchronize(self, intake: GradientIntake) -> None:
        """Sum each bucket's G^T U shares over the mesh (G V stays with its rows)."""
        intake.synchronize(sharded=True, group=self.group)

    def sum_shares(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce with SUM over the mesh."""
        return sharding.sum_over(self.group, tensor)

    def rows(self, p: torch.Tensor) -> sharding.RowGroup | None:
        """The mesh's reduction of `p`'s rows: sums, gathers, this rank's rows."""
        return sharding.RowGroup(p)


def resolve(
    managed: Iterable[torch.Tensor], data_parallel: bool, describe: Callable[[torch.Tensor], str]
) -> Distribution:
    """The distribution of an optimizer whose managed matrices are `managed` (`describe` names one in errors).

    Row shards when any managed matrix is a DTensor (then all must be, on one mesh); replicas with
    ``data_parallel`` and more than one rank; otherwise one process.
    """
    managed = list(managed)
    sharded = [p for p in managed if sharding.is_dtensor(p)]
    if sharded:
        plain = [p for p in managed if not sharding.is_dtensor(p)]
        groups = {sharding.process_group(p) for p in sharded}
        if plain or len(groups) != 1:
            where = f"{describe(plain[0])} is not sharded" if plain else "they span several meshes"
            raise ValueError(
                f"MoFaSGD's FSDP2 step needs every managed matrix sharded on one device mesh, but {where}: "
                "apply fully_shard to every module holding a managed matrix (and the root)."
            )
        return ShardedRows(groups.pop())
    if data_parallel and dp.world_size() > 1:
        return DataParallel()
    return Distribution()
