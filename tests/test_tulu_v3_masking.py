"""`tulu_v3` label masking: the loss covers each reply, its EOS and newline, as in the Tulu 3 recipe (open-instruct).

open-instruct (open_instruct/dataset_transformation.py, sft_tulu_tokenize_and_truncate_v1) masks every non-assistant
message together with the assistant generation prefix `<|assistant|>\\n`; the authors' fork trains on that prefix.
"""

from llamafactory.data import get_template_and_fix_tokenizer
from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
from llamafactory.extras.constants import IGNORE_INDEX
from llamafactory.hparams import DataArguments
from transformers import AutoTokenizer


def test_tulu_v3_trains_on_replies_only_and_masks_the_assistant_prefix(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    data_args = DataArguments(template="tulu_v3", cutoff_len=1024)
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    processor = SupervisedDatasetProcessor(template=template, tokenizer=tokenizer, processor=None, data_args=data_args)
    prompt = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
    ]
    input_ids, labels = processor._encode_data_example(
        prompt, [{"role": "assistant", "content": "6"}], "Be brief.", None, [], [], []
    )

    eos, bos = tokenizer.eos_token, tokenizer.bos_token or ""
    trained = tokenizer.decode([t for t, label in zip(input_ids, labels) if label != IGNORE_INDEX])
    masked = tokenizer.decode([t for t, label in zip(input_ids, labels) if label == IGNORE_INDEX])
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(input_ids, labels))
    assert trained == f"4{eos}\n6{eos}\n"
    assert masked == f"{bos}<|system|>\nBe brief.\n<|user|>\n2+2?\n<|assistant|>\n<|user|>\n3+3?\n<|assistant|>\n"
