"""MoFaSGD in LlamaBoard (``llamafactory-cli webui``): an accordion in the Train tab, its keys in every command.

One function per LLaMA-Factory WebUI module, applied by :mod:`llamafactory_mfsgd.activation` when it loads:

- ``webui.locales``: labels and help of the accordion (:mod:`llamafactory_mfsgd.webui_locales`) for every
  language LlamaBoard offers; languages without a translation show the English text.
- ``webui.common``: the command builder keeps ``false`` (and every other non-null value) of the extension's keys.
  LlamaBoard's own ``_clean_cmd`` drops every ``False``, so ``mfsgd_fused: false`` would silently become the
  default ``true`` in the preview, the saved YAML and the launched run.
- ``webui.components.train``: the MoFaSGD accordion, placed after BAdam's; its elements are inputs of preview,
  start and save and outputs of load, like LlamaBoard's own.
- ``webui.runner``: the accordion's values become YAML keys, and the extension's parse-time refusals (LoRA/freeze
  with MoFaSGD, DeepSpeed, fp16 in fused mode, bad ranges, typos) come back as LlamaBoard's alert before anything
  is previewed, saved or launched.

With ``LLAMAFACTORY_MFSGD=0`` only :func:`guard_runner` applies: a saved LlamaBoard config that turns MoFaSGD on
is refused with a clear message instead of LlamaBoard's KeyError on the unknown elements.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from types import ModuleType, SimpleNamespace
from typing import Any

from mofasgd import DEFAULTS, INITS

from .activation import DISABLE_ENV
from .arguments import ADAMW_SIDE_PRESETS, MfsgdArguments, extension_field_names
from .checks import check_adamw_side_preset_keys, check_unused_keys, validate_engine_keys, validate_with_training_args
from .compat import require, require_source
from .key_types import check_extension_types, check_key_spelling
from .webui_locales import LOCALES

TAB = "mfsgd_tab"
ELEMENTS = tuple(name for name in LOCALES if name != TAB)  # the accordion's inputs, named as in LlamaBoard
STEP_FORMS = {"1/S": False, "ones": True}  # -> mfsgd_use_ones_for_nonzero_s
ROUNDING = {"auto": None, "on": True, "off": False}  # -> mfsgd_stochastic_rounding
NO_PRESET = "none"


class BoardRefusal(ValueError):
    """A LlamaBoard configuration the extension refuses; the message says which key and how to fix it."""


def patch_locales(module: ModuleType) -> None:
    """Add the accordion's labels to LlamaBoard's LOCALES for every language it has (English where untranslated)."""
    require(module, "LOCALES")
    clashes = sorted(set(LOCALES) & set(module.LOCALES))
    if clashes:
        raise RuntimeError(f"LLaMA-Factory's WebUI already defines {clashes}; the MoFaSGD accordion would hide them.")
    languages = {lang for entry in module.LOCALES.values() for lang in entry}
    for name, texts in LOCALES.items():
        module.LOCALES[name] = {lang: dict(texts.get(lang, texts["en"])) for lang in sorted(languages)}


def patch_common(module: ModuleType) -> None:
    """Keep every non-null value of the extension's keys (false included) in LlamaBoard's commands and YAML."""
    require(module, "_clean_cmd", "gen_cmd", "save_cmd")
    original = module._clean_cmd
    ours = extension_field_names()

    def _clean_cmd(args: dict[str, Any]) -> dict[str, Any]:
        kept = original(args)
        return {key: value for key, value in args.items() if key in kept or (key in ours and value is not None)}

    _clean_cmd.__doc__ = original.__doc__
    module._clean_cmd = _clean_cmd


def _create_elements() -> dict[str, Any]:
    """The accordion's input elements, not yet rendered (LlamaBoard's labels come from LOCALES on load)."""
    import gradio as gr

    return {
        "use_mfsgd": gr.Checkbox(value=False, render=False),
        "mfsgd_rank": gr.Slider(minimum=1, maximum=1024, value=DEFAULTS["rank"], step=1, render=False),
        "learning_rate_mfsgd": gr.Textbox(value="", render=False),
        "learning_rate_adamw": gr.Textbox(value="", render=False),
        "mfsgd_beta": gr.Slider(minimum=0, maximum=0.999, value=DEFAULTS["beta"], step=0.001, render=False),
        "mfsgd_step_form": gr.Dropdown(
            choices=list(STEP_FORMS), value=_key_of(STEP_FORMS, DEFAULTS["use_ones_for_nonzero_s"]), render=False
        ),
        "mfsgd_init": gr.Dropdown(choices=list(INITS), value=DEFAULTS["init"], render=False),
        "mfsgd_adamw_side": gr.Dropdown(choices=[NO_PRESET, *ADAMW_SIDE_PRESETS], value=NO_PRESET, render=False),
        "mfsgd_stochastic_rounding": gr.Dropdown(
            choices=list(ROUNDING), value=_key_of(ROUNDING, DEFAULTS["stochastic_rounding"]), render=False
        ),
        "mfsgd_fused": gr.Checkbox(value=DEFAULTS["fused"], render=False),
        "mfsgd_target": gr.Textbox(value=_default("mfsgd_target"), render=False),
    }


def _key_of(table: dict[str, Any], value: Any) -> str:
    return next(key for key, entry in table.items() if entry is value)


def _default(key: str) -> Any:
    return next(f.default for f in dataclasses.fields(MfsgdArguments) if f.name == key)


def _render_accordion(elements: dict[str, Any]) -> Any:
    """Lay the elements out in an accordion in the current render context (two rows, as GaLore's and BAdam's)."""
    import gradio as gr

    rows = (ELEMENTS[:5], ELEMENTS[5:])
    with gr.Accordion(open=False) as accordion:
        for names in rows:
            with gr.Row():
                for name in names:
                    elements[name].render()
    return accordion


def _place_after(block: Any, anchor: Any) -> None:
    """Move `block` right after `anchor` in their common parent's layout."""
    parent = anchor.parent
    if block.parent is not parent:
        raise RuntimeError("The MoFaSGD accordion and BAdam's are no longer in the same LlamaBoard layout block.")
    parent.children.remove(block)
    parent.children.insert(parent.children.index(anchor) + 1, block)


def patch_train_tab(module: ModuleType) -> None:
    """Build the MoFaSGD accordion into the Train tab, after BAdam's, its elements wired like LlamaBoard's own.

    ``create_train_tab`` passes one set of input elements to every event it wires (preview, start, save, and load
    as outputs) and starts that set from ``engine.manager.get_base_elems()``; handing it our elements there wires
    them into all of these events, without rebuilding the tab.
    """
    require(module, "create_train_tab")
    original = module.create_train_tab
    require_source(original, "engine.manager.get_base_elems()", "badam_tab")

    def create_train_tab(engine: Any) -> dict[str, Any]:
        elements = _create_elements()
        manager = engine.manager
        base = manager.get_base_elems
        manager.get_base_elems = lambda: base() | set(elements.values())
        try:
            elem_dict = original(engine)
        finally:
            del manager.get_base_elems  # the class's method again, for the other tabs
        accordion = _render_accordion(elements)
        _place_after(accordion, elem_dict["badam_tab"])
        elem_dict.update({TAB: accordion, **elements})
        return elem_dict

    create_train_tab.__doc__ = original.__doc__
    module.create_train_tab = create_train_tab


def _integer(key: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():  # a slider's value
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise BoardRefusal(f"`{key}` takes an integer; the MoFaSGD accordion holds {value!r}.")


def _learning_rate(key: str, text: Any) -> float | None:
    text = str(text or "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise BoardRefusal(
            f"`{key}: {text}` in the MoFaSGD accordion is not a number: write it like 1e-4, or leave it empty "
            "to use the learning rate above."
        ) from None


def _choice(key: str, table: dict[str, Any], value: Any) -> Any:
    if value not in table:
        raise BoardRefusal(f"`{key}` in the MoFaSGD accordion is {value!r}; choose one of {', '.join(table)}.")
    return table[value]


def accordion_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """The YAML keys that the accordion's values (element name -> value) stand for; none when MoFaSGD is off.

    An empty learning rate leaves its key out (the run uses ``learning_rate``), as does the preset ``none``;
    stochastic rounding ``auto`` is ``null``. Every other value is written, ``false`` included.
    """
    if not values["use_mfsgd"]:
        return {}
    keys = {"use_mfsgd": True, "mfsgd_rank": _integer("mfsgd_rank", values["mfsgd_rank"])}
    for key in ("learning_rate_mfsgd", "learning_rate_adamw"):
        rate = _learning_rate(key, values[key])
        if rate is not None:
            keys[key] = rate
    keys["mfsgd_beta"] = float(values["mfsgd_beta"])
    keys["mfsgd_use_ones_for_nonzero_s"] = _choice("mfsgd_step_form", STEP_FORMS, values["mfsgd_step_form"])
    keys["mfsgd_init"] = values["mfsgd_init"]
    if values["mfsgd_adamw_side"] != NO_PRESET:
        keys["mfsgd_adamw_side"] = values["mfsgd_adamw_side"]
    keys["mfsgd_stochastic_rounding"] = _choice(
        "mfsgd_stochastic_rounding", ROUNDING, values["mfsgd_stochastic_rounding"]
    )
    keys["mfsgd_fused"] = bool(values["mfsgd_fused"])
    keys["mfsgd_target"] = str(values["mfsgd_target"] or "").strip()
    return keys


def merge_accordion_keys(args: dict[str, Any], keys: dict[str, Any], extra: dict[str, Any]) -> None:
    """Add the accordion's keys to LlamaBoard's arguments; refuse a key that Extra arguments set differently."""
    for key, value in keys.items():
        if key in extra and (type(extra[key]), extra[key]) != (type(value), value):
            raise BoardRefusal(
                f"`{key}` is set twice: {json.dumps(value)} in the MoFaSGD accordion and {json.dumps(extra[key])} "
                "in Extra arguments. Remove it from Extra arguments (or uncheck Use MoFaSGD)."
            )
        args[key] = value


def _training_view(values: dict[str, Any]) -> SimpleNamespace:
    """The training arguments the extension's checks read, from the run's values over transformers' defaults.

    Built without transformers' __post_init__, which checks this machine's devices (bf16 on a CPU): a config
    previewed here may be meant for another machine, and those checks run at launch anyway.
    """
    from llamafactory.extras.misc import get_device_count
    from transformers import Seq2SeqTrainingArguments

    view = {}
    for f in dataclasses.fields(Seq2SeqTrainingArguments):
        if f.name in values:
            view[f.name] = values[f.name]
        elif f.default is not dataclasses.MISSING:
            view[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            view[f.name] = f.default_factory()
    # llamafactory-cli starts one process per device when there are several (torchrun)
    return SimpleNamespace(**view, world_size=max(1, get_device_count()))


def check_board_args(args: dict[str, Any]) -> None:
    """Run the extension's parse-time checks on the arguments LlamaBoard would launch with.

    The checks of :func:`llamafactory_mfsgd.lf_parser.patch_parser`'s ``get_train_args``, in its order, on the
    finetuning arguments (built as the parser builds them) and a device-independent view of the training ones.

    Raises:
        BoardRefusal: with the check's message.
    """
    import llamafactory.hparams.parser as parser

    known = {f.name for cls in parser._TRAIN_ARGS for f in dataclasses.fields(cls)}
    try:
        check_key_spelling(list(args), known)
        values = check_extension_types(args)
        check_adamw_side_preset_keys(values)
        check_unused_keys(values)
        validate_engine_keys(values)
        names = {f.name for f in dataclasses.fields(parser.FinetuningArguments)}
        finetuning = parser.FinetuningArguments(**{key: value for key, value in values.items() if key in names})
        validate_with_training_args(finetuning, _training_view(values))
    except ValueError as error:
        raise BoardRefusal(str(error)) from error


def patch_runner(module: ModuleType) -> None:
    """The accordion's keys in LlamaBoard's training arguments; the extension's refusals as its alert."""
    require(module, "Runner")
    runner = module.Runner
    require(runner, "_initialize", "_parse_train_args")
    original_parse = runner._parse_train_args
    original_initialize = runner._initialize
    ours = extension_field_names()

    def _parse_train_args(self, data: dict[Any, Any]) -> dict[str, Any]:
        args = original_parse(self, data)
        get = lambda name: data[self.manager.get_elem_by_id(f"train.{name}")]  # noqa: E731
        extra = json.loads(get("extra_args"))
        merge_accordion_keys(args, accordion_keys({name: get(name) for name in ELEMENTS}), extra)
        return args

    def _initialize(self, data: dict[Any, Any], do_train: bool, from_preview: bool) -> str:
        error = original_initialize(self, data, do_train, from_preview)
        if error or not do_train:
            return error
        try:
            args = self._parse_train_args(data)
            if ours & set(args):
                check_board_args(args)
        except BoardRefusal as refusal:
            return str(refusal)
        return ""

    _parse_train_args.__doc__ = original_parse.__doc__
    _initialize.__doc__ = original_initialize.__doc__
    runner._parse_train_args = _parse_train_args
    runner._initialize = _initialize


def guard_runner(module: ModuleType) -> None:
    """With the extension switched off, refuse LlamaBoard configs that turn MoFaSGD on (not a KeyError).

    A config saved with MoFaSGD off still loads: its accordion values never reached a run, and are left out.
    """
    require(module, "load_args")
    original = module.load_args

    def load_args(config_path: str) -> dict[str, Any] | None:
        config = original(config_path)
        if not isinstance(config, dict):
            return config
        ours = {f"train.{name}" for name in ELEMENTS} & set(config)
        if config.get("train.use_mfsgd"):
            import gradio as gr

            raise gr.Error(
                f"{config_path} trains with MoFaSGD (`train.use_mfsgd: true`), but the MoFaSGD extension is switched "
                f"off ({DISABLE_ENV}={os.environ.get(DISABLE_ENV)}). Unset {DISABLE_ENV} and restart LlamaBoard to "
                "load it."
            )
        return {key: value for key, value in config.items() if key not in ours}

    load_args.__doc__ = original.__doc__
    module.load_args = load_args
