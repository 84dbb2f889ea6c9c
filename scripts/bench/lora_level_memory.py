"""Peak training memory of the shipped 8B configs' keys, LoRA vs MoFaSGD, on a LLaMA-3.1-8B-shaped small model.

The model keeps 8B's proportions at 1/32 of the width: hidden 128, MLP 448, 32 layers, GQA 8/2 heads, a
4096-token vocabulary (untied embeddings and LM head: 13 % of the parameters, as in 8B), weights stored in
bf16. Each variant is the shipped YAML (``configs/mfsgd/llama3.1_8b_sft_{lora,mfsgd_lr}.yaml``) with only the
model, data and output paths swapped, run through LLaMA-Factory for two optimizer steps with the CPU memory
profiler on (``profile_memory_from_start``); the peak is the highest total inside step 2's window, by
category. MoFaSGD's pure bf16 runs on the CPU through ``MFSGD_CPU_PURE_BF16=1``; the LoRA config's
``bf16: true`` runs as CPU bf16 autocast (``use_cpu``), its trainable adapters fp32 as on a GPU.

    python scripts/bench/lora_level_memory.py [--results-dir results]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import yaml
from compare_methods import step_memory
from lf_bench import MODEL_SIZES, REPO, ensure_model, machine_description, run_training, save_results

MODEL = "llama-8b-shape"
MODEL_SIZES[MODEL] = {
    "path": "models/llama-8b-shape",
    "flags": [
        "--hidden",
        "128",
        "--intermediate",
        "448",
        "--layers",
        "32",
        "--heads",
        "8",
        "--kv-heads",
        "2",
        "--vocab",
        "4096",
        "--dtype",
        "bfloat16",
    ],
}
VOCAB = 4096
VARIANTS = {
    "LoRA (shipped)": ("llama3.1_8b_sft_lora.yaml", {}),
    "MoFaSGD (shipped keys, mfsgd_target: all)": ("llama3.1_8b_sft_mfsgd_lr.yaml", {"mfsgd_target": "all"}),
    "MoFaSGD, mfsgd_target: all,embed_tokens,lm_head": (
        "llama3.1_8b_sft_mfsgd_lr.yaml",
        {"mfsgd_target": "all,embed_tokens,lm_head"},
    ),
}


def ensure_padded_model() -> Path:
    """The 8B-shaped model, its vocabulary padded to VOCAB rows (the demo corpus's BPE stops below that)."""
    path = ensure_model(MODEL)
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    if model.get_input_embeddings().weight.shape[0] != VOCAB:
        model.resize_token_embeddings(VOCAB, mean_resizing=False)
        model.save_pretrained(path)
    return path


def variant_config(name: str, model_dir: Path, out: Path) -> dict[str, Any]:
    file, overrides = VARIANTS[name]
    config = yaml.safe_load((REPO / "configs" / "mfsgd" / file).read_text())
    slug = "".join(c if c.isalnum() else "_" for c in name)[:40]
    config.update(
        model_name_or_path=str(model_dir),
        dataset="tulu3_demo",
        dataset_dir=str(REPO / "data"),
        output_dir=str(out / slug),
        max_steps=2,
        num_train_epochs=1.0,
        save_strategy="no",
        report_to="none",
        plot_loss=False,
        preprocessing_num_workers=1,
        dataloader_num_workers=0,
        profile_memory_from_start=True,
        profile_memory_stop_step=2,
        **overrides,
    )
    if config.get("bf16"):
        import torch

        config["use_cpu"] = not torch.cuda.is_available()  # HF needs it for bf16 AMP on a CPU
    return config


def render_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lora = result["rows"][0]["peak_bytes"]
    lines = [
        "# LoRA-level memory: the shipped 8B configs' keys on an 8B-shaped model",
        "",
        f"{MODEL} ({result['params']:,} parameters, 13 % in the untied embeddings and LM head as in 8B), batch 1 "
        f"x 8 accumulation, demo data (cutoff 1024, short samples). Peak of step 2 by the CPU profiler. Machine: "
        f"{m['device']}, torch {m['torch']}. Command: `python scripts/bench/lora_level_memory.py`.",
        "",
        "| variant | weights dtype | peak MiB | vs LoRA | parameters | gradients | optimizer state | other |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        b = row["breakdown"]
        cells = [b.get(k, 0) / 2**20 for k in ("parameters", "gradients", "optimizer_state")]
        other = row["peak_bytes"] / 2**20 - sum(cells)
        lines.append(
            f"| {row['variant']} | {row['dtype']} | {row['peak_bytes'] / 2**20:.1f} | "
            f"{row['peak_bytes'] / lora:.2f}x | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {other:.1f} |"
        )
    lines += [
        "",
        "Activations here are those of short demo samples on a small model, so their share differs from 8B's; "
        "the 8B-scale ratio is the meta-device accounting in `results/llama_memory_accounting/`.",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.barh([r["variant"] for r in result["rows"]], [r["peak_bytes"] / 2**20 for r in result["rows"]])
    ax.set_xlabel("peak MiB in step 2")
    fig.savefig(path, format="png")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "outputs" / "lora_level_memory"))
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    os.environ["MFSGD_CPU_PURE_BF16"] = "1"
    model_dir = ensure_padded_model()
    out = Path(args.out)
    rows = []
    for name in VARIANTS:
        config = variant_config(name, model_dir, out)
        run = run_training(config)
        memory = step_memory(run, 2)
        rows.append(
            {
                "variant": name,
                "dtype": "bf16 (pure_bf16)" if config.get("pure_bf16") else "bf16 base + fp32 adapters (bf16 AMP)",
                "peak_bytes": memory["total_bytes"],
                "breakdown": memory.get("breakdown") or {},
            }
        )
        print(rows[-1], flush=True)
    params = run.timing.get("total_params")
    result = {"machine": machine_description(), "params": params, "rows": rows}
    save_results(result, "lora_level_memory", out, args.results_dir, render_markdown, plot)


if __name__ == "__main__":
    main()
