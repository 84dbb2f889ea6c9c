"""Gradient intake: where every gradient enters MoFaSGD, and the one place the pending projections live.

A managed matrix's gradient G is only ever needed as (G V, G^T U). Those sums live in :class:`PendingBucket`
buffers, one per param group and (shape, dtype, device, rank), allocated at their first write and kept, so the
step reads a bucket's stacked projections as they are. A 3-D tensor of E expert matrices (transformers' fused MoE
experts, E x m x n) is a stack of E entries of its bucket: its gradient is projected expert by expert in one batched
product. Two paths write into them:

- the projected linear backward (:mod:`mofasgd.projected_linear`): an ``nn.Linear`` weight's projections are
  formed from the layer's input and output gradient; the m x n gradient is never formed;
- a post-accumulate-grad hook, for every other managed matrix (and a Linear weight whose dense gradient is
  needed, or that is also used outside its Linear): G is projected and freed at once.

The AdamW-side hooks (updates during backward with ``fused_adamw_side``; FSDP2 gradients copied out of a shared
buffer) live here too. While a sum is pending, the matrix's optimizer state holds views of its slot
(``state["GV"]``, ``state["GtU"]``), which is how a checkpoint taken mid-accumulation saves and resumes it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from mofasgd import data_parallel as dp
from mofasgd import factor_math as fm
from mofasgd import sharding
from mofasgd.hooks import HookRegistry

if TYPE_CHECKING:
    from mofasgd.optimizer import MoFaSGD

PENDING_KEYS = ("GV", "GtU")
# An AdamW-side FSDP2 gradient whose buffer is this many times its size shares it with others: copied out (cheap).
# benchmarks/llama_memory_accounting.py models the same rule.
SHARED_BUFFER_RATIO = 4


class Slot(NamedTuple):
    """Where one managed tensor's pending projections live: member `index` of `bucket`."""

    bucket: PendingBucket
    index: int


def experts_of(p: torch.Tensor) -> int | None:
    """E for a managed E x m x n stack of expert matrices, None for a matrix."""
    return p.shape[0] if p.dim() == 3 else None


class PendingBucket:
    """The pending (G V, G^T U) sums of the managed tensors of one group that share shape, dtype, device and rank.

    ``gv`` (B x m x r, FSDP2: this rank's rows) and ``gtu`` (B x n x r) are allocated at the first write and kept.
    Their storage is transposed (B x r x m, B x r x n: each member's r x m block is contiguous), so the projected
    backward adds its wide r x T @ T x m products straight into a member's block (``addmm_``), with no temporary.
    Member i (a param) holds entries ``rows(i)``: one for a matrix, E for a stack of E experts (a bucket's members
    all have the same shape). ``seen[i]`` says whether member i holds a sum in the current accumulation window
    (other members are stale).
    """

    def __init__(self, params: list[torch.Tensor], rows: int, cols: int, rank: int, dtype: torch.dtype) -> None:
        self.params = params
        self.experts = experts_of(params[0])
        self.per_param = self.experts or 1
        self.shape = (len(params) * self.per_param, rows, cols, rank)
        self.dtype = dtype
        self.device = params[0].device
        self.gv: torch.Tensor | None = None
        self.gtu: torch.Tensor | None = None
        self.views: list[tuple[torch.Tensor, torch.Tensor]] = []  # per member: its (G V, G^T U) slots (views)
        self.blocks: list[tuple[torch.Tensor, torch.Tensor]] = []  # per entry: its r x m and r x n blocks (views)
        self.seen = [False] * len(params)

    def rows(self, index: int) -> slice:
        """The entries of member `index` in the buffers."""
        return slice(index * self.per_param, (index + 1) * self.per_param)

    def member(self, buffer: torch.Tensor, index: int) -> torch.Tensor:
        """Member `index`'s part of a buffer: m x r for a matrix, E x m x r for a stack of experts (views)."""
        return buffer[index] if self.experts is None else buffer[self.rows(index)]

    def entry_index(self, members: list[int]) -> torch.Tensor:
        """The buffer entries of the given members, as an index tensor on the buffers' device."""
        entries = [e for i in members for e in range(self.rows(i).start, self.rows(i).stop)]
        return torch.tensor(entries, device=self.device)

    def allocate(self) -> None:
        """Create the buffers (zeros) if they do not exist yet."""
        if self.gv is None:
            count, rows, cols, rank = self.shape
            self.gv = torch.zeros(count, rank, rows, dtype=self.dtype, device=self.device).mT
            self.gtu = torch.zeros(count, rank, cols, dtype=self.dtype, device=self.device).mT
            # taken once, so that a write takes no view op
            self.views = [(self.member(self.gv, i), self.member(self.gtu, i)) for i in range(len(self.params))]
            self.blocks = list(zip(self.gv.mT.unbind(0), self.gtu.mT.unbind(0)))

    def any_seen(self) -> bool:
        """Whether any entry holds a sum this window."""
        return any(self.seen)

    def zero_unseen_(self) -> None:
        """Zero the stale entries (before a collective sums every entry over ranks)."""
        self.allocate()
        stale = [i for i, seen in enumerate(self.seen) if not seen]
        if len(stale) == len(self.seen):
            self.gv.zero_()
            self.gtu.zero_()
        elif stale:
            index = self.entry_index(stale)
            self.gv.index_fill_(0, index, 0)
            self.gtu.index_fill_(0, index, 0)


class PendingView(NamedTuple):
    """The entries of one bucket that hold a gradient now: their params and stacked projections.

    The stacks are the bucket's own buffers when every entry holds one (the usual case), else copies of the rows.
    """

    params: list[torch.Tensor]
    gv: torch.Tensor
    gtu: torch.Tensor


class GradientIntake:
    """Takes the gradients of one MoFaSGD optimizer's parameters: projections of managed matrices, AdamW-side hooks.

    Holds its optimizer weakly (the hooks and patched Linear modules must not keep it alive).
    """

    def __init__(self, optimizer: MoFaSGD) -> None:
        self._optimizer = weakref.ref(optimizer)
        self.matrix_hooks = HookRegistry(self.matrix_gradient, optimizer)
        self.copy_hooks = HookRegistry(self.own_gradient_storage, optimizer)  # FSDP2: side grads leave the buffer
        self.side_hooks = HookRegistry(self.side_gradient, optimizer)  # fused_adamw_side: update during backward
        self.buckets: dict[int, list[PendingBucket]] = {}  # per param-group index
        self.slots: dict[int, Slot] = {}  # id(param) -> slot
        self.synced = True  # no pending sum awaits a data-parallel average
        # An empty leaf every projected Linear takes as an input: it keeps the output in the autograd graph when
        # nothing else there needs a gradient, and whether backward will run its accumulator node says whether this
        # backward accumulates into leaves (backward()) or only computes some gradients (autograd.grad, inputs=).
        self.anchor = torch.zeros(0, requires_grad=True)
        self.anchor_node = torch.autograd.graph.get_gradient_edge(self.anchor).node  # held: one node for good

    @property
    def optimizer(self) -> MoFaSGD | None:
        """The optimizer this intake feeds, or None once it was collected."""
        return self._optimizer()

    # ------------------------------------------------------------------ layout
    def rebuild(self) -> None:
        """Lay the buckets out for the optimizer's current param groups, keeping every pending sum.

        Called at construction, when a group is added and when FSDP2's DTensors replace the parameters. Entries are
        in group order, so every data-parallel rank forms the same buckets (same collectives).
        """
        optimizer = self.optimizer
        buckets: dict[int, list[PendingBucket]] = {}
        slots: dict[int, Slot] = {}
        for gi, group in enumerate(optimizer.param_groups):
            if not group["mofasgd"]:
                continue
            members: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                rows = tuple(sharding.local(p).shape)
                key = (tuple(p.shape), rows, sharding.is_dtensor(p), p.dtype, p.device)
                members.setdefault(key, []).append(p)
            buckets[gi] = []
            for (shape, rows, _, dtype, _), params in members.items():
                rank = fm.effective_rank(group["rank"], shape)
                bucket = PendingBucket(params, rows[-2], shape[-1], rank, fm.factor_dtype(dtype))
                buckets[gi].append(bucket)
                for i, p in enumerate(params):
                    slots[id(p)] = Slot(bucket, i)
        self.buckets, self.slots = buckets, slots
        self.adopt_state_sums()

    def adopt_state_sums(self) -> None:
        """Move pending sums found in the optimizer state (a loaded checkpoint, an older layout) into the slots."""
        optimizer = self.optimizer
        for bucket, index in self.slots.values():
            p = bucket.params[index]
            state = optimizer.state.get(p)
            if not state or "GV" not in state:
                continue
            gv, gtu = state["GV"], state["GtU"]
            self.write(p, gv.to(bucket.dtype), gtu.to(bucket.dtype))
        self.synced = not any(b.any_seen() for bs in self.buckets.values() for b in bs)

    def slot(self, p: torch.Tensor) -> Slot | None:
        """Where `p`'s pending sums live, or None when the optimizer does not manage it."""
        return self.slots.get(id(p))

    # ------------------------------------------------------------------ writing
    def _open(self, p: torch.Tensor) -> Slot:
        """`p`'s slot, its bucket's buffers allocated (``bucket.seen[index]``: it already holds a sum this window)."""
        slot = self.slots[id(p)]
        slot.bucket.allocate()
        return slot

    def _mark(self, p: torch.Tensor) -> None:
        bucket, index = self.slots[id(p)]
        if not bucket.seen[index]:
            bucket.seen[index] = True
            state = self.optimizer.state[p]
            state["GV"], state["GtU"] = bucket.views[index]
        self.synced = False

    def write(self, p: torch.Tensor, gv: torch.Tensor, gtu: torch.Tensor) -> None:
        """Add (or, first in a window, set) `p`'s projections."""
        bucket, index = self._open(p)
        slot_gv, slot_gtu = bucket.views[index]
        if bucket.seen[index]:
            slot_gv.add_(gv)
            slot_gtu.add_(gtu)
        else:
            slot_gv.copy_(gv)
            slot_gtu.copy_(gtu)
        self._mark(p)

    def add_gradient(self, p: torch.Tensor, grad: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> None:
        """Add the projections of a dense gradient (this rank's rows under FSDP2)."""
        bucket, index = self._open(p)
        slot_gv, slot_gtu = bucket.views[index]
        if bucket.seen[index]:
            fm.add_projections_(slot_gv, slot_gtu, grad, U, V)
        else:
            gv, gtu = fm.project_gradient(grad, U, V)
            slot_gv.copy_(gv)
            slot_gtu.copy_(gtu)
        self._mark(p)

    def accumulates(self) -> bool:
        """Inside backward: whether the running backward accumulates into leaves (so into the pending sums)."""
        return torch._C._will_engine_execute_node(self.anchor_node)

    def add_linear(self, p: torch.Tensor, inputs: torch.Tensor, grad_outputs: torch.Tensor) -> None:
        """Add G V = dY^T (X V) and G^T U = X^T (dY U) of a Linear weight, from X (T x n) and dY (T x m).

        Nothing is added when the optimizer is gone or the matrix is not (or no longer) managed. Factors that do
        not exist yet are made first; ``init='gradient'`` needs the dense gradient for that, formed here once.
        """
        optimizer = self.optimizer
        if optimizer is None or id(p) not in self.slots or sharding.is_dtensor(p):
            return
        state = optimizer.state[p]
        if "U" not in state:
            group = optimizer.param_groups[optimizer._group_index[p]]
            dense = None
            if group["init"] == "gradient":
                dense = (grad_outputs.T @ inputs).to(p.dtype)
            state = optimizer._init_factors(p, group, dense)
            if dense is not None:
                self.add_gradient(p, dense, state["U"], state["V"])
                return
        U, V = state["U"], state["V"]
        x = inputs if inputs.dtype == V.dtype else inputs.to(V.dtype)
        dy = grad_outputs if grad_outputs.dtype == V.dtype else grad_outputs.to(V.dtype)
        # every product in the wide form r x K @ K x N: on a CPU the thin forms (T x n @ n x r, and the transposed-left
        # dY^T (X V)) take BLAS's slow paths (1.7-3.5x slower at 512 x 688, r = 8, measured), while the left
        # factor's layout does not matter (V^T as a transposed view is as fast as a contiguous copy, and copying it
        # costs more than it saves); CUDA's GEMM is indifferent (transposes are flags)
        xv_t = torch.mm(V.mT, x.mT)  # (X V)^T, r x T
        dyu_t = torch.mm(U.mT, dy.mT)  # (dY U)^T, r x T
        bucket, index = self._open(p)
        block_gv, block_gtu = bucket.blocks[index]  # contiguous r x m, r x n: the slot's transposes
        if bucket.seen[index]:  # (dY^T (X V))^T = (X V)^T dY, (X^T (dY U))^T = (dY U)^T X, added in place
            block_gv.addmm_(xv_t, dy)
            block_gtu.addmm_(dyu_t, x)
        else:
            torch.mm(xv_t, dy, out=block_gv)
            torch.mm(dyu_t, x, out=block_gtu)
        self._mark(p)

    # ------------------------------------------------------------------ hooks
    def hook_matrices(self) -> None:
        """Register the post-accumulate-grad hook on every managed matrix (those already hooked are skipped)."""
        for group in self.optimizer.param_groups:
            if group["mofasgd"]:
                self.matrix_hooks.register(group["params"])

    def matrix_gradient(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook of a managed matrix: add (G V, G^T U) to its slot and free the m x n gradient.

        It runs once per matrix and micro-batch, so it stays lean: backward already runs without grad mode (a
        ``no_grad`` context is entered only under ``create_graph=True``).
        """
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.matrix_gradient(p)
        grad = p.grad
        optimizer = self.optimizer
        if grad is None or optimizer is None:
            return
        state = optimizer.state[p]
        if "U" not in state:
            if sharding.is_dtensor(p):
                return  # a sharded matrix's first init is collective: step() does it, in the same order everywhere
            state = optimizer._init_factors(p, optimizer.param_groups[optimizer._group_index[p]], grad)
        # FSDP2: local rows of G give local rows of G V and this rank's share of G^T U (summed at synchronisation)
        self.add_gradient(p, sharding.local(grad), sharding.local(state["U"]), state["V"])
        p.grad = None

    def hook_adamw_side(self) -> None:
        """Hook the AdamW side: its matrices for fused_adamw_side, and under FSDP2 its other shards.

        Under FSDP2 their gradients may share a reduce-scatter buffer with managed ones, so they are copied out (a
        hooked matrix's own hook does that while an accumulation is pending).
        """
        optimizer = self.optimizer
        for group in optimizer.param_groups:
            if group["mofasgd"]:
                continue
            side = optimizer._fused_side_params(group) if optimizer.fused_adamw_side else []
            self.side_hooks.register(side)
            if optimizer._sharded:
                hooked = {id(p) for p in side}
                self.copy_hooks.register(p for p in group["params"] if sharding.is_dtensor(p) and id(p) not in hooked)

    @torch.no_grad()
    def side_gradient(self, p: torch.Tensor) -> None:
        """fused_adamw_side: hand an AdamW-side gradient to the optimizer once the accumulation window is complete."""
        optimizer = self.optimizer
        if p.grad is None or optimizer is None:
            return
        if not optimizer._at_accumulation_boundary():  # more micro-batches add to this gradient: wait for them
            if sharding.is_dtensor(p):
                self.own_gradient_storage(p)
            return
        optimizer._adamw_side_update(p)

    @torch.no_grad()
    def own_gradient_storage(self, p: torch.Tensor) -> None:
        """FSDP2 hook on AdamW-side shards: copy a gradient that is a small view of a shared buffer out of it.

        FSDP2 reduce-scatters each unit's gradients into one flat buffer and hands every shard a view of it. The
        managed matrices' views are consumed in their hooks, but the buffer lives while any view does: a decoder
        layer's norm gradients would keep the whole layer's gradient memory. Copying those small views frees it.
        """
        local = sharding.local(p.grad) if p.grad is not None else None
        if local is not None and local.untyped_storage().nbytes() >= SHARED_BUFFER_RATIO * local.nbytes:
            p.grad = p.grad.clone()

    def remove_hooks(self) -> None:
        """Detach every gradient hook of this intake."""
        self.matrix_hooks.remove()
        self.copy_hooks.remove()
        self.side_hooks.remove()

    # ------------------------------------------------------------------ reading
    def pending(self, group_index: int) -> Iterator[PendingView]:
        """The entries of each bucket of a group that hold a sum this window (buckets without any are skipped)."""
        for bucket in self.buckets.get(group_index, ()):
            if not bucket.any_seen():
                continue
            if all(bucket.seen):
                yield PendingView(bucket.params, bucket.gv, bucket.gtu)
                continue
            chosen = [i for i, seen in enumerate(bucket.seen) if seen]
            index = bucket.entry_index(chosen)
            yield PendingView([bucket.params[i] for i in chosen], bucket.gv[index], bucket.gtu[index])

    def buffers(self) -> list[torch.Tensor]:
        """Every allocated pending buffer (clipping scales them in place)."""
        return [t for bs in self.buckets.values() for b in bs if b.gv is not None for t in (b.gv, b.gtu)]

    def consumed(self, group_index: int | None = None) -> None:
        """Forget the pending sums of a group (or of all groups): the step took them, or zero_grad dropped them."""
        optimizer = self.optimizer
        for gi, bs in self.buckets.items():
            if group_index is not None and gi != group_index:
                continue
            for bucket in bs:
                for i, seen in enumerate(bucket.seen):
                    if seen:
                        bucket.seen[i] = False
                        state = optimizer.state.get(bucket.params[i])
                        if state is not None:
                            for key in PENDING_KEYS:
                                state.pop(key, None)
        self.synced = self.synced or not any(b.any_seen() for bs in self.buckets.values() for b in bs)

    # ------------------------------------------------------------------ data parallelism
    def synchronize(self, sharded: bool, group: Any = None) -> None:
        """Combine the pending sums over ranks: averaged under DDP, G^T U summed over FSDP2's row shards.

        Every rank contributes every bucket entry (zeros where it saw no gradient) plus a flag, so the collective is
        the same on all ranks; an entry no rank saw a gradient for stays without one. One host read for the flags.
        """
        optimizer = self.optimizer
        tensors, flags = [], []
        for gi, bs in self.buckets.items():
            params_group = optimizer.param_groups[gi]
            for bucket in bs:
                if not any(p.requires_grad for p in bucket.params):
                    continue  # frozen on every rank alike: nothing to combine
                for p in bucket.params:
                    if p.requires_grad:
                        optimizer._init_factors(p, params_group, None)
                bucket.zero_unseen_()
                flag = torch.tensor(bucket.seen, dtype=bucket.dtype, device=bucket.device)
                flags.append((bucket, flag))
                tensors += [bucket.gtu, flag] if sharded else [bucket.gv, bucket.gtu, flag]
        if sharded:
            dp.sum_in_place(tensors, group)
        else:
            dp.average_in_place(tensors)
        seen_anywhere = torch.cat([flag for _, flag in flags]).tolist() if flags else []  # one device sync
        offset = 0
        for bucket, flag in flags:
            for i in range(flag.numel()):
                if seen_anywhere[offset + i] != 0.0 and bucket.params[i].requires_grad:
                    self._mark(bucket.params[i])
            offset += flag.numel()
        self.synced = True
