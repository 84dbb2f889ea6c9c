"""Ending gloo processes cleanly: the wait at exit of multi-process CPU runs, and the exit of spawned workers.

A gloo worker thread drops its reference to a finished collective (an FSDP2 all-gather, a DDP or DeepSpeed
all-reduce) a little after the caller's wait returns; when that reference is the last one, freeing the
Python-owned output tensors takes the GIL. If interpreter finalization has begun by then, Python ends the thread
inside that destructor and the process aborts ("terminate called without an active exception"; about 1 run in 10
here, torch 2.14). LLaMA-Factory runs wait at exit (:func:`drain_gloo_at_exit`, registered by the trainer
callback of :func:`gloo_drain_callback` and by the CPU FSDP2 switch); spawned workers skip finalization
(:func:`exit_spawned_worker`).
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from typing import Any

GLOO_DRAIN_SECONDS = 0.5


def _let_gloo_workers_finish() -> None:
    """Sleep in an atexit handler: it releases the GIL while the interpreter is still whole."""
    time.sleep(GLOO_DRAIN_SECONDS)


def register_drain() -> None:
    """Run the gloo drain once at exit, however often it is asked for."""
    atexit.unregister(_let_gloo_workers_finish)
    atexit.register(_let_gloo_workers_finish)


def drain_gloo_at_exit() -> bool:
    """In a multi-process gloo run (CPU DDP, DeepSpeed or FSDP2 on gloo), run the gloo drain once at exit.

    The same abort hits DeepSpeed ZeRO-3's all-gathers on CPU processes (seen in CI, torch 2.14). Returns whether
    the wait was registered.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return False
    if dist.get_backend() != "gloo":
        return False
    register_drain()
    return True


def gloo_drain_callback() -> Any:
    """A Trainer callback that registers the gloo drain when training starts (the process group exists by then)."""
    from transformers import TrainerCallback

    class GlooExitDrain(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            drain_gloo_at_exit()

    return GlooExitDrain()


def exit_spawned_worker() -> None:
    """End a gloo worker (spawned, or one of torchrun's) after its work succeeded: exit without finalization.

    Call it after ``destroy_process_group`` and only on success, so that an exception still reaches ``mp.spawn``.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
