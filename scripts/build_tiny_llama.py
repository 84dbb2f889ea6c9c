"""Build a tiny random LlamaForCausalLM (or MoE) and a byte-level BPE tokenizer trained on the local demo data.

The result loads offline with ``AutoTokenizer.from_pretrained(out)`` and
``AutoModelForCausalLM.from_pretrained(out)``. The build is deterministic: the same arguments give
byte-identical files (weights from ``torch.manual_seed(seed)``, tokenizer from a fixed corpus order).

The tokenizer carries a Tulu-3-style chat template (the format of ``template: tulu_v3``)::

    <|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{assistant}<|endoftext|>\\n

and, besides ``<|endoftext|>`` (eos and pad) and the Tulu role tokens, the Llama-3 header tokens so
that LLaMA-Factory's ``llama3`` template works too without resizing the vocabulary.

Usage::

    python -m scripts.build_tiny_llama --out models/tiny-llama          # 0.24M parameters
    # bigger variants for CPU benchmarks (set model_name_or_path in a tiny_sft_*.yaml to them):
    # 3.4M parameters, 60 steps of tiny_sft_* in about 1.5 minutes per method on 2 busy CPU cores
    python -m scripts.build_tiny_llama --out models/tiny-llama-256 --hidden 256 --layers 4 --intermediate 688
    # 23M parameters, about 10 s per step there
    python -m scripts.build_tiny_llama --out models/tiny-llama-512 --hidden 512 --layers 8 --intermediate 1408 \\
        --heads 8
    # a tiny MoE instead (transformers 5's fused experts: mlp.experts.gate_up_proj is E x 2f x h; --intermediate is
    # each expert's width f), with the same tokenizer
    python -m scripts.build_tiny_llama --out models/tiny-mixtral --arch mixtral --experts 4 --experts-per-token 2
    python -m scripts.build_tiny_llama --out models/tiny-qwen3-moe --arch qwen3_moe --experts 4

The vocabulary is capped at ``--vocab`` but stops growing when the corpus has no pair left to merge
(905 tokens for the default demo data and ``--vocab 1024``); the model's ``vocab_size`` is the
tokenizer's actual size.
"""

import argparse
import json
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "tulu3_demo.jsonl"

EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|begin_of_text|>"
# EOS first so that it gets id 0; the order fixes every special token's id.
SPECIAL_TOKENS = [
    EOS_TOKEN,
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    BOS_TOKEN,
    "<|eot_id|>",
    "<|eom_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def iter_corpus(data_files: list[Path]) -> Iterator[str]:
    """Yield every message content of the Tulu-format JSONL files, in file order."""
    for path in data_files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    for message in json.loads(line)["messages"]:
                        yield message["content"]


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, as a fast tokenizer with our special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=SPECIAL_TOKENS[1:4] + SPECIAL_TOKENS[5:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


ARCHITECTURES = ("llama", "mixtral", "qwen3_moe")


def build_model(
    tokenizer,
    hidden: int,
    layers: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    seed: int,
    arch: str = "llama",
    experts: int = 4,
    experts_per_token: int = 2,
    max_positions: int = 2048,
):
    """A randomly initialised causal LM sized to the tokenizer (Llama-3.1-like: GQA, untied head).

    `arch` picks LlamaForCausalLM, or an MoE whose every layer has `experts` experts of width `intermediate`, each
    token routed to `experts_per_token` of them: MixtralForCausalLM or Qwen3MoeForCausalLM.
    """
    import torch
    import transformers

    moe = {
        "llama": {},
        "mixtral": dict(num_local_experts=experts, num_experts_per_tok=experts_per_token),
        "qwen3_moe": dict(
            num_experts=experts,
            num_experts_per_tok=experts_per_token,
            moe_intermediate_size=intermediate,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            head_dim=hidden // heads,
        ),
    }[arch]
    name = {"llama": "Llama", "mixtral": "Mixtral", "qwen3_moe": "Qwen3Moe"}[arch]
    config = getattr(transformers, f"{name}Config")(
        **moe,
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return getattr(transformers, f"{name}ForCausalLM")(config)


def build(
    out: Path,
    hidden: int = 64,
    layers: int = 2,
    intermediate: int | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 1024,
    seed: int = 0,
    data_files: list[Path] | None = None,
    dtype: str = "float32",
    arch: str = "llama",
    experts: int = 4,
    experts_per_token: int = 2,
    max_positions: int = 2048,
) -> None:
    """Build the tokenizer and the model and save both into ``out`` (weights in `dtype`, as hub checkpoints are)."""
    if hidden % heads != 0 or heads % kv_heads != 0:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads}), heads by kv_heads ({kv_heads}).")

    tokenizer = train_tokenizer(iter_corpus(data_files or [DEFAULT_DATA]), vocab)
    model = build_model(
        tokenizer,
        hidden,
        layers,
        intermediate or 4 * hidden,
        heads,
        kv_heads,
        seed,
        arch,
        experts,
        experts_per_token,
        max_positions,
    )
    import torch

    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    model.to(getattr(torch, dtype)).save_pretrained(out)


def ensure_built(out: Path, *flags: str, env: dict[str, str] | None = None, quiet: bool = False) -> Path:
    """Return `out`, first building a model there with this script (and `flags`) if it holds none yet.

    The build runs in a fresh interpreter, so the tokenizer trainer's threads never live in the caller (which
    may fork workers afterwards). `quiet` hides the build's output.
    """
    out = Path(out)
    if not (out / "config.json").exists():
        if not quiet:
            print(f"building a tiny LLaMA into {out} ...", flush=True)
        output = subprocess.DEVNULL if quiet else None
        command = [sys.executable, "-m", "scripts.build_tiny_llama", "--out", str(out.resolve()), *flags]
        subprocess.run(command, check=True, cwd=REPO, env=env, stdout=output, stderr=output)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/tiny-llama"))
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 4 * hidden)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024, help="target BPE vocabulary size, special tokens included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, nargs="+", default=[DEFAULT_DATA], help="Tulu-format JSONL corpus")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="stored weight dtype; bfloat16 like LLaMA-3.1 on the hub, which `pure_bf16` then trains in bf16",
    )
    parser.add_argument("--arch", choices=ARCHITECTURES, default="llama", help="LLaMA, or an MoE (fused experts)")
    parser.add_argument("--experts", type=int, default=4, help="MoE: experts per layer")
    parser.add_argument("--experts-per-token", type=int, default=2, help="MoE: experts each token is routed to")
    parser.add_argument("--max-positions", type=int, default=2048, help="longest sequence the model takes")
    args = parser.parse_args(argv)

    build(
        args.out,
        hidden=args.hidden,
        layers=args.layers,
        intermediate=args.intermediate,
        heads=args.heads,
        kv_heads=args.kv_heads,
        vocab=args.vocab,
        seed=args.seed,
        data_files=args.data,
        dtype=args.dtype,
        arch=args.arch,
        experts=args.experts,
        experts_per_token=args.experts_per_token,
        max_positions=args.max_positions,
    )
    print(f"saved tiny {args.arch} to {args.out}")


if __name__ == "__main__":
    main()
