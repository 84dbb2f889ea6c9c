"""One process of a data-parallel enable_mofasgd run (launched by torch.distributed.run): saves rank 0's weights.

Usage: python -m torch.distributed.run --nproc_per_node N tests/hf_ddp_worker.py KIND MODEL_DIR OUTPUT_DIR RESULT.pt

The global batch is 8 sequences whatever N (8 // N per process), so N = 1 and N = 2 train on the same batches.
"""

from __future__ import annotations

import os
import sys

import torch
from hf_trainers import make_trainer

from mofasgd.integrations.transformers import enable_mofasgd


def main(kind: str, model_dir: str, output_dir: str, result: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = make_trainer(kind, model_dir, output_dir, per_device_train_batch_size=8 // world, max_steps=3)
    enable_mofasgd(trainer, rank=4)
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    if trainer.args.process_index == 0:
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        torch.save({"weights": weights, "data_parallel": optimizer.data_parallel, "world": world}, result)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's worker threads may still free a collective: skip finalization (gloo_exit.exit_spawned_worker)


if __name__ == "__main__":
    main(*sys.argv[1:5])
