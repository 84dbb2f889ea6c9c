"""One process of a 2-process FSDP2 enable_mofasgd run on CPU (launched by torch.distributed.run).

Usage: MFSGD_CPU_FSDP2=1 python -m torch.distributed.run --nproc_per_node 2 tests/hf_fsdp2_worker.py KIND MODEL_DIR
OUTPUT_DIR RESULT.pt [RESUME_FROM]

accelerate applies FSDP on GPUs only; here, in this test worker alone, ``allow_cpu_fsdp2`` (LLaMA-Factory's path's
CPU switch) makes it shard these CPU processes with FSDP2 (gloo), so transformers' own FSDP2 path runs. 4 sequences
per process: the global batch of 8 of the 1-process runs. Saves the gathered weights (rank 0) and checkpoints at
steps 3 and 6.
"""

from __future__ import annotations

import os
import sys

import torch
from hf_trainers import make_trainer
from torch.distributed.tensor import DTensor

from llamafactory_mfsgd.cpu_emulation import allow_cpu_fsdp2
from mofasgd.integrations.transformers import enable_mofasgd

FSDP2 = {
    "fsdp": "full_shard auto_wrap",
    "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
}
# fp32: TRL's SFTConfig defaults to bf16, which FSDP2 applies as bf16 parameters (the 1-process run as autocast)
TRAINING = {"per_device_train_batch_size": 4, "max_steps": 6, "save_strategy": "steps", "save_steps": 3, "bf16": False}


def main(kind: str, model_dir: str, output_dir: str, result: str, resume_from: str | None = None) -> None:
    allow_cpu_fsdp2()
    trainer = make_trainer(kind, model_dir, output_dir, max_grad_norm=1.0, **TRAINING, **FSDP2)
    enable_mofasgd(trainer, rank=4)
    trainer.train(resume_from_checkpoint=resume_from)
    optimizer = trainer.optimizer.optimizer
    # every rank joins each gather, in the same order
    weights = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in trainer.model.named_parameters()
    }
    if trainer.args.process_index == 0:
        sharded = [isinstance(p, DTensor) for g in optimizer.param_groups if g["mofasgd"] for p in g["params"]]
        log = [{k: e[k] for k in ("loss", "grad_norm") if k in e} for e in trainer.state.log_history]
        torch.save(
            {"weights": weights, "sharded": sharded, "data_parallel": optimizer.data_parallel, "log": log}, result
        )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's worker threads may still free a collective: skip finalization (gloo_exit.exit_spawned_worker)


if __name__ == "__main__":
    main(*sys.argv[1:6])
