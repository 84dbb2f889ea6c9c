from pathlib import Path

import pytest
from lf_helpers import conversation, encode_with_template

from scripts.build_tiny_llama import EOS_TOKEN, SPECIAL_TOKENS, build


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    build(out, hidden=32, layers=1, intermediate=48, heads=4, kv_heads=2, vocab=600, seed=0)
    return out


def test_build_twice_gives_byte_identical_files(tiny_dir, tmp_path):
    again = tmp_path / "again"
    build(again, hidden=32, layers=1, intermediate=48, heads=4, kv_heads=2, vocab=600, seed=0)

    first, second = _files(tiny_dir), _files(again)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(first)
    assert first == second


def test_seed_changes_the_weights_but_not_the_tokenizer(tiny_dir, tmp_path):
    other = tmp_path / "seed1"
    build(other, hidden=32, layers=1, intermediate=48, heads=4, kv_heads=2, vocab=600, seed=1)

    first, second = _files(tiny_dir), _files(other)
    assert first["model.safetensors"] != second["model.safetensors"]
    assert first["tokenizer.json"] == second["tokenizer.json"]


def test_model_loads_offline_with_requested_shape(tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)

    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (32, 1, 48)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.vocab_size == len(tokenizer) <= 600
    assert config.eos_token_id == config.pad_token_id == tokenizer.eos_token_id
    assert model.get_input_embeddings().weight is not model.get_output_embeddings().weight

    input_ids = torch.tensor([tokenizer("What is 2 + 2?")["input_ids"]])
    assert model(input_ids=input_ids).logits.shape == (1, input_ids.shape[1], len(tokenizer))


def test_tokenizer_keeps_every_special_token_whole(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    ids = [tokenizer.encode(token, add_special_tokens=False) for token in SPECIAL_TOKENS]

    assert all(len(token_ids) == 1 for token_ids in ids)
    assert len({token_ids[0] for token_ids in ids}) == len(SPECIAL_TOKENS)
    assert tokenizer.eos_token == tokenizer.pad_token == EOS_TOKEN
    assert tokenizer.bos_token == "<|begin_of_text|>"
    assert tokenizer.decode(tokenizer.encode("Reverse 'abc'.", add_special_tokens=False)) == "Reverse 'abc'."


def test_chat_template_renders_tulu3_format(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "6"},
    ]

    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)

    assert rendered == (
        "<|system|>\nAnswer briefly.\n"
        "<|user|>\nWhat is 2 + 2?\n<|assistant|>\n4<|endoftext|>\n"
        "<|user|>\nAnd 3 + 3?\n<|assistant|>\n6<|endoftext|>\n"
    )
    assert prompt == "<|system|>\nAnswer briefly.\n<|user|>\nWhat is 2 + 2?\n<|assistant|>\n"


def test_llama3_template_needs_no_new_tokens(tiny_dir):
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    size = len(tokenizer)
    template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template="llama3"))
    prompt_ids, answer_ids = template.encode_oneturn(
        tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    )

    assert len(tokenizer) == size
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in answer_ids
    assert tokenizer.convert_tokens_to_ids("<|start_header_id|>") in prompt_ids


def test_llamafactory_tulu_v3_template_matches_the_tokenizer_chat_template(tiny_dir):
    messages = conversation("What is 2 + 2?", "4", "Reverse 'abc'.", "'cba'")
    tokenizer, turns = encode_with_template(tiny_dir, "tulu_v3", messages, system="Answer briefly.")
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Answer briefly."}, *messages], tokenize=False
    )

    encoded = [token for prompt, answer in turns for token in prompt + answer]
    assert encoded == [tokenizer.bos_token_id, *tokenizer.encode(rendered, add_special_tokens=False)]
