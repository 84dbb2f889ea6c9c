"""The NanoGPT trainer: one resolved config in, a run directory with log, plot, summary and checkpoints out.

    python -m scripts.nanogpt.train --config-file outputs/nanogpt/<run>/config.yaml
    torchrun --nproc_per_node 8 -m scripts.nanogpt.train --config-file ...

Usually started by run.py, which builds the config. Run directory contents:

    config.yaml        the resolved config
    log.jsonl          one record per optimizer step ({"step", "train_loss", "lr_factor", "grad_norm", ...})
                       and one per evaluation ({"step", "tokens", "val_loss"})
    loss.png           training and validation loss curves
    summary.json       final validation loss, tokens/s, optimizer-state bytes, peak memory, ...
    checkpoints/       step_XXXXXX.pt (tensors and plain data only) when train.checkpoint_every > 0
    memory_snapshot.pickle   with mem_prof.enabled on CUDA
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from llamafactory_mfsgd.gloo_exit import exit_spawned_worker
from memory_profiling import peak_rss_bytes
from scripts.nanogpt.config import RunConfig, build_config, derive_run_name, read_yaml, resolve_path
from scripts.nanogpt.data import TokenLoader, ValidationSet, shard_paths
from scripts.nanogpt.memory_snapshot import CudaMemorySnapshot
from scripts.nanogpt.model import GPT, parameter_roles
from scripts.nanogpt.optimizers import (
    build_optimizers,
    checkpoint_state,
    load_checkpoint_state,
    set_step_hyperparameters,
    state_bytes,
)
from scripts.nanogpt.plots import plot_run
from scripts.nanogpt.schedules import lr_factor

logger = logging.getLogger("nanogpt")


def _distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; starts the process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return rank, world, local_rank


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """`auto` is CUDA (this process's local GPU) when available, else the CPU; anything else is taken as is."""
    if requested == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device is {requested!r} but CUDA is not available on this machine")
    return device


def _autocast(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _average(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """Mean over processes (gloo has no AVG reduction, so sum and divide)."""
    if world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world
    return tensor


def _grad_norm(optimizers: list[torch.optim.Optimizer], params: list[torch.nn.Parameter]) -> float:
    # MoFaSGD in fused mode has already folded its matrices' gradients into projections; it knows the norm.
    if hasattr(optimizers[0], "grad_norm"):
        return float(optimizers[0].grad_norm())
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def _clip(optimizers: list[torch.optim.Optimizer], params: list[torch.nn.Parameter], max_norm: float) -> None:
    if hasattr(optimizers[0], "clip_grad_norm_"):
        optimizers[0].clip_grad_norm_(max_norm)
    else:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, val_set: ValidationSet, device: torch.device, mode: str, world: int, vocab_size: int
) -> float:
    """Mean validation loss over the fixed validation tokens (averaged over processes)."""
    model.eval()
    total = torch.zeros((), device=device)
    for inputs, targets in val_set:
        _check_vocab(targets, vocab_size, "validation shards")
        with _autocast(mode, device):
            total += model(inputs.to(device), targets.to(device)).float()
    model.train()
    return float(_average(total / val_set.steps, world))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_bytes() / 2**20


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {torch.get_num_threads()} torch threads on {os.cpu_count()} cores"


def _check_vocab(tokens: torch.Tensor, vocab_size: int, where: str) -> None:
    # Checked on the CPU batch: an out-of-range id would otherwise fail inside the embedding, far less clearly.
    if int(tokens.max()) >= vocab_size:
        raise ValueError(f"{where} contain token id {int(tokens.max())} >= model.vocab_size ({vocab_size})")


def _validated_at(history: list[dict[str, Any]], step: int) -> bool:
    return bool(history) and "val_loss" in history[-1] and history[-1]["step"] == step


def train(config: RunConfig) -> dict[str, Any]:
    """Run one training job; returns the summary (also written to summary.json by rank 0)."""
    rank, world, local_rank = _distributed()
    is_main = rank == 0
    device = pick_device(config.train.device, local_rank)
    tc = config.train
    micro_tokens = world * tc.micro_batch_size * tc.seq_len
    if tc.batch_tokens % micro_tokens:
        raise ValueError(
            f"train.batch_tokens ({tc.batch_tokens}) must be a multiple of processes * micro_batch_size * seq_len "
            f"({micro_tokens})"
        )
    accumulation = tc.batch_tokens // micro_tokens
    config.run_name = config.run_name or derive_run_name(config)
    run_dir = config.run_dir
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    if tc.cpu_threads > 0:
        torch.set_num_threads(tc.cpu_threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")

    snapshot = CudaMemorySnapshot(config.mem_prof, device, run_dir, is_main)
    snapshot.before_step(0)
    torch.manual_seed(tc.seed)
    model = GPT(config.model).to(device)
    if world > 1:
        for p in model.parameters():
            dist.broadcast(p.data, src=0)
    roles = parameter_roles(model)
    params = list(model.parameters())
    optimizers = build_optimizers(roles, config, world)
    for optimizer in optimizers:
        if hasattr(optimizer, "attach"):  # MoFaSGD: its nn.Linear weights take the projected backward (no dW)
            attachment = optimizer.attach(model, reason="torch.compile traces the backward" if tc.compile else None)
            if is_main:
                logger.info("MoFaSGD gradient paths:\n%s", attachment.table())
    base_lrs = [[group["lr"] for group in opt.param_groups] for opt in optimizers]
    forward = torch.compile(model) if tc.compile else model

    loader = TokenLoader(
        shard_paths(resolve_path(config.data.train_files)), tc.micro_batch_size, tc.seq_len, rank, world
    )
    val_set = ValidationSet(
        shard_paths(resolve_path(config.data.val_files)), tc.val_tokens, tc.micro_batch_size, tc.seq_len, rank, world
    )

    start_step, train_seconds, history = 0, 0.0, []
    if tc.resume_from:
        checkpoint = torch.load(resolve_path(tc.resume_from), map_location=device, weights_only=True)
        model.load_state_dict(checkpoint["model"])
        for optimizer, state in zip(optimizers, checkpoint["optimizers"], strict=True):
            load_checkpoint_state(optimizer, state)
        loader.load_state(checkpoint["loader"])
        start_step, train_seconds, history = checkpoint["step"], checkpoint["train_seconds"], checkpoint["history"]
        logger.info("resumed from %s at step %d", tc.resume_from, start_step)
    if is_main:
        roles_text = ", ".join(f"{role}: {sum(p.numel() for p in ps):,}" for role, ps in roles.items())
        logger.info("run %s on %s x%d; parameters %s", config.run_name, device, world, roles_text)
        logger.info(
            "batch %d tokens = %d processes x %d micro-steps x %d x %d",
            tc.batch_tokens,
            world,
            accumulation,
            tc.micro_batch_size,
            tc.seq_len,
        )
        (run_dir / "log.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in history))

    def record(entry: dict[str, Any]) -> None:
        history.append(entry)
        if is_main:
            with open(run_dir / "log.jsonl", "a") as log_file:
                log_file.write(json.dumps(entry) + "\n")

    def validate(step: int) -> None:
        loss = evaluate(forward, val_set, device, tc.autocast, world, config.model.vocab_size)
        record({"step": step, "tokens": step * tc.batch_tokens, "val_loss": loss})
        if is_main:
            logger.info("step %d/%d  val_loss %.4f", step, tc.steps, loss)

    for step in range(start_step, tc.steps):
        if step % tc.val_every == 0 and not _validated_at(history, step):
            validate(step)
        snapshot.before_step(step)
        factor = lr_factor(step, tc.steps, config.schedule)
        set_step_hyperparameters(optimizers, base_lrs, factor, config, step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        train_loss = torch.zeros((), device=device)
        for _ in range(accumulation):
            inputs, targets = loader.next_batch()
            _check_vocab(targets, config.model.vocab_size, "training shards")
            with _autocast(tc.autocast, device):
                loss = forward(inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True))
            (loss / accumulation).backward()
            train_loss += loss.detach().float() / accumulation
        if world > 1:
            for p in params:
                if p.grad is not None:
                    _average(p.grad, world)
        grad_norm = _grad_norm(optimizers, params)
        if tc.grad_clip > 0:
            _clip(optimizers, params, tc.grad_clip)
        for optimizer in optimizers:
            optimizer.step()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss_value = float(_average(train_loss, world))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        train_seconds += seconds
        snapshot.after_step(step + 1)
        entry = {"step": step + 1, "train_loss": loss_value, "lr_factor": factor, "grad_norm": grad_norm}
        record(entry | {"step_ms": 1000 * seconds, "tokens_per_s": tc.batch_tokens / seconds})
        if is_main and ((step + 1) % tc.log_every == 0 or step + 1 == tc.steps):
            logger.info(
                "step %d/%d  train_loss %.4f  lr x%.3f  %.0f tok/s",
                step + 1,
                tc.steps,
                loss_value,
                factor,
                tc.batch_tokens / seconds,
            )
        if tc.checkpoint_every > 0 and ((step + 1) % tc.checkpoint_every == 0 or step + 1 == tc.steps):
            _save_checkpoint(run_dir, step + 1, model, optimizers, loader, train_seconds, history, config, is_main)
    if not _validated_at(history, tc.steps):
        validate(tc.steps)

    summary = _summary(config, history, train_seconds, optimizers, roles, device, world)
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_run(history, run_dir / "loss.png", config.run_name)
        logger.info(
            "final val_loss %.4f, %.0f tokens/s; wrote %s", summary["final_val_loss"], summary["tokens_per_s"], run_dir
        )
    return summary


def _save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    loader: TokenLoader,
    train_seconds: float,
    history: list[dict[str, Any]],
    config: RunConfig,
    is_main: bool,
) -> None:
    # Single-process loaders fully describe the data position; with several processes they move in
    # lockstep, so rank 0's position is everyone's.
    if not is_main:
        return
    path = run_dir / "checkpoints" / f"step_{step:06d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "step": step,
        "model": model.state_dict(),
        "optimizers": [checkpoint_state(optimizer) for optimizer in optimizers],
        "loader": loader.state(),
        "train_seconds": train_seconds,
        "history": history,
        "config": config.to_dict(),
    }
    torch.save(payload, path)
    logger.info("saved checkpoint %s", path)


def _summary(
    config: RunConfig,
    history: list[dict[str, Any]],
    train_seconds: float,
    optimizers: list[torch.optim.Optimizer],
    roles: dict[str, list[torch.nn.Parameter]],
    device: torch.device,
    world: int,
) -> dict[str, Any]:
    tc = config.train
    train_losses = [r["train_loss"] for r in history if "train_loss" in r]
    val_losses = [r["val_loss"] for r in history if "val_loss" in r]
    all_params = [p for ps in roles.values() for p in ps]
    return {
        "run_name": config.run_name,
        "run_dir": str(config.run_dir),
        "optimizer": config.optimizer,
        "hidden": config.hidden,
        "device": str(device),
        "device_name": _device_name(device),
        "world_size": world,
        "steps": tc.steps,
        "tokens": tc.steps * tc.batch_tokens,
        "final_val_loss": val_losses[-1],
        "best_val_loss": min(val_losses),
        "final_train_loss": sum(train_losses[-10:]) / len(train_losses[-10:]),
        "train_seconds": train_seconds,
        "tokens_per_s": tc.steps * tc.batch_tokens / train_seconds,
        "hidden_params": sum(p.numel() for p in roles["hidden"]),
        "total_params": sum(p.numel() for p in all_params),
        "hidden_state_bytes": state_bytes(optimizers, roles["hidden"]),
        "total_state_bytes": state_bytes(optimizers, all_params),
        "peak_memory_mb": _peak_memory_mb(device),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="resolved config (YAML or JSON) written by run.py")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s")
    train(build_config(read_yaml(args.config_file)))
    if dist.is_initialized():
        gloo = dist.get_backend() == "gloo"
        dist.destroy_process_group()
        if gloo:  # a gloo thread freeing a finished all-reduce during finalization aborts the process
            exit_spawned_worker()


if __name__ == "__main__":
    main()
