"""The patch of LLaMA-Factory's ``data.template``: the Tulu 3 chat format as ``tulu_v3`` when it has none."""

from __future__ import annotations

from types import ModuleType

from .compat import require


def patch_template(module: ModuleType) -> None:
    """Register the Tulu 3 chat format as `tulu_v3` (the authors' configs use it; 0.9.5 lacks it)."""
    require(module, "TEMPLATES", "register_template")
    if "tulu_v3" in module.TEMPLATES:
        return
    from llamafactory.data.formatter import EmptyFormatter, StringFormatter

    # `<|assistant|>\n` sits in the user slot, so LLaMA-Factory masks it with the prompt and trains on the reply,
    # its EOS and the newline only. That is the Tulu 3 recipe's choice: open-instruct's SFT masking
    # (open_instruct/dataset_transformation.py, sft_tulu_tokenize_and_truncate_v1) ends each masked span with
    # add_generation_prompt=True "to avoid the assistant generation prefix being included in the loss". The
    # authors' fork puts the prefix in the assistant slot and so trains on it.
    module.register_template(
        name="tulu_v3",
        format_user=StringFormatter(slots=["<|user|>\n{{content}}\n<|assistant|>\n"]),
        format_assistant=StringFormatter(slots=["{{content}}", {"eos_token"}, "\n"]),
        format_system=StringFormatter(slots=["<|system|>\n{{content}}\n"]),
        format_prefix=EmptyFormatter(slots=[{"bos_token"}]),
    )
