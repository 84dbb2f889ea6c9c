"""MoFaSGD in LlamaBoard, headless: the accordion, its keys in preview / save / load / YAML, refusals as alerts."""

import json
import os
import subprocess
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from board_helpers import REPO, Board, base_values, command_keys

from llamafactory_mfsgd.arguments import EXTENSION_DATACLASSES, extension_field_names
from llamafactory_mfsgd.webui import ELEMENTS, TAB
from llamafactory_mfsgd.webui_locales import LOCALES

# non-default value of every accordion element, and the YAML keys (as the preview prints them) they stand for
CHOSEN = {
    "train.mfsgd_rank": 8.0,  # a slider's value
    "train.learning_rate_mfsgd": "2e-2",
    "train.learning_rate_adamw": "4e-3",
    "train.mfsgd_beta": 0.95,
    "train.mfsgd_step_form": "ones",
    "train.mfsgd_init": "weight_randomized",
    "train.mfsgd_adamw_side": "authors",
    "train.mfsgd_stochastic_rounding": "off",
    "train.mfsgd_fused": False,
    "train.mfsgd_target": "q_proj,v_proj",
}
CHOSEN_KEYS = {
    "use_mfsgd": "True",
    "mfsgd_rank": "8",
    "learning_rate_mfsgd": "0.02",
    "learning_rate_adamw": "0.004",
    "mfsgd_beta": "0.95",
    "mfsgd_use_ones_for_nonzero_s": "True",
    "mfsgd_init": "weight_randomized",
    "mfsgd_adamw_side": "authors",
    "mfsgd_stochastic_rounding": "False",
    "mfsgd_fused": "False",
    "mfsgd_target": "q_proj,v_proj",
}


@pytest.fixture
def board(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # LlamaBoard writes llamaboard_cache/, llamaboard_config/ and saves/ here
    return Board().set(base_values("/models/tiny-llama"))


def test_accordion_sits_after_badam_and_feeds_every_train_event(board):
    tab = board.elem("train.badam_tab").parent
    order = [board.manager._elem_to_id.get(child) for child in tab.children]
    assert order[order.index("train.badam_tab") + 1] == f"train.{TAB}"
    ours = {board.elem(f"train.{name}") for name in ELEMENTS}
    for name in ("preview_train", "run_train", "save_args"):
        assert ours <= set(board.events[name].inputs), name
    for name in ("load_args", "check_output_dir"):
        assert ours <= set(board.events[name].outputs), name
    assert not ours & set(board.events["preview_eval"].inputs)  # the eval tab keeps its own inputs


def test_preview_prints_every_accordion_value_false_included(board):
    keys = command_keys(board.set(CHOSEN).preview())
    assert {key: keys.get(key) for key in CHOSEN_KEYS} == CHOSEN_KEYS


def test_defaults_preview_as_the_optimizer_defaults(board):
    keys = command_keys(board.preview())
    assert keys["mfsgd_fused"] == "True" and keys["mfsgd_use_ones_for_nonzero_s"] == "False"
    assert keys["mfsgd_init"] == "weight" and keys["mfsgd_target"] == "all"
    # empty learning rates, preset `none` and rounding `auto` leave their keys to the defaults
    assert not {"learning_rate_mfsgd", "learning_rate_adamw", "mfsgd_adamw_side", "mfsgd_stochastic_rounding"} & set(
        keys
    )


def test_unchecked_accordion_adds_no_keys(board):
    keys = command_keys(board.set({**CHOSEN, "train.use_mfsgd": False}).preview())
    assert not {key for key in keys if "mfsgd" in key}


def test_launch_yaml_keeps_false_values_and_parses_to_them(board, tmp_path):
    from llamafactory.hparams.parser import get_train_args
    from llamafactory.webui.runner import save_cmd

    board.set({**CHOSEN, "train.mfsgd_init": "weight", "train.mfsgd_target": "all"})
    args = board.runner._parse_train_args(board.data)
    with open(save_cmd(args)) as f:
        saved = yaml.safe_load(f)
    assert saved["mfsgd_fused"] is False and saved["mfsgd_stochastic_rounding"] is False
    assert saved["mfsgd_use_ones_for_nonzero_s"] is True and saved["mfsgd_rank"] == 8
    saved.update(model_name_or_path=str(tmp_path), output_dir=str(tmp_path / "out"), report_to="none")
    finetuning = get_train_args(saved)[3]
    assert finetuning.use_mfsgd and finetuning.mfsgd_fused is False and finetuning.mfsgd_stochastic_rounding is False
    assert (finetuning.mfsgd_rank, finetuning.mfsgd_beta, finetuning.learning_rate_mfsgd) == (8, 0.95, 0.02)


def test_extra_arguments_false_values_reach_preview_and_yaml(board):
    """The issue's case: MoFaSGD typed into Extra arguments, where LlamaBoard used to drop every `false`."""
    from llamafactory.webui.runner import save_cmd

    extra = {
        "use_mfsgd": True,
        "mfsgd_fused": False,
        "mfsgd_stochastic_rounding": False,
        "mfsgd_nesterov": False,
        "mfsgd_projected_backward": False,
        "profile_memory_from_start": False,
    }
    board.set({"train.use_mfsgd": False, "train.extra_args": json.dumps(extra)})
    keys = command_keys(board.preview())
    assert {key: keys.get(key) for key in extra} == {key: str(value) for key, value in extra.items()}
    with open(save_cmd(board.runner._parse_train_args(board.data))) as f:
        assert {key: value for key, value in yaml.safe_load(f).items() if key in extra} == extra


def test_command_builder_keeps_false_of_every_extension_key_and_drops_none():
    from llamafactory.webui import common

    ours = sorted(extension_field_names())
    assert common._clean_cmd(dict.fromkeys(ours, False)) == dict.fromkeys(ours, False)
    assert common._clean_cmd(dict.fromkeys(ours, None)) == {}
    # LlamaBoard's own keys keep its rule
    assert common._clean_cmd({"use_galore": False, "packing": False, "lora_target": ""}) == {"packing": False}
    bools = [f.name for cls in EXTENSION_DATACLASSES for f in fields(cls) if "bool" in str(f.type)]
    assert set(bools) <= set(ours) and len(bools) > 5


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"top.finetuning_type": "lora"}, "cannot be combined with `finetuning_type: lora`"),
        ({"top.finetuning_type": "freeze"}, "cannot be combined with `finetuning_type: freeze`"),
        ({"train.ds_stage": "2"}, "does not run under DeepSpeed"),
        ({"train.compute_type": "fp16"}, "`fp16: true` scales the loss"),
        ({"train.mfsgd_beta": 1.0}, "Invalid `mfsgd_beta: 1.0`"),
        ({"train.mfsgd_rank": 0.0}, "Invalid `mfsgd_rank: 0`"),
        ({"train.learning_rate_mfsgd": "-1e-3"}, "Invalid `learning_rate_mfsgd: -0.001`"),
        ({"train.learning_rate_adamw": "fast"}, "`learning_rate_adamw: fast` in the MoFaSGD accordion is not a"),
        ({"train.mfsgd_target": " "}, "Invalid `mfsgd_target: ''`"),
        ({"train.extra_args": '{"mfsgd_fused": true}', "train.mfsgd_fused": False}, "`mfsgd_fused` is set twice"),
        ({"train.extra_args": '{"mfsgd_rnak": 4}'}, "Did you mean `mfsgd_rank`?"),
        ({"train.extra_args": '{"mfsgd_fused": "no"}', "train.use_mfsgd": False}, "takes a boolean"),
    ],
)
def test_refusals_are_alerts_before_anything_launches(board, tmp_path, values, message):
    board.set(values)
    for event in (board.runner.preview_train, board.runner.save_args, board.runner.run_train):
        with warnings.catch_warnings(record=True) as caught:  # gr.Warning outside a browser session: a warning
            warnings.simplefilter("always")
            text = board.output(event)
        assert message in text, (event.__name__, text)
        assert any(message in str(w.message) for w in caught), event.__name__
    assert board.runner.trainer is None and not board.runner.running
    assert not (tmp_path / "saves").exists() and not (tmp_path / "llamaboard_config").exists()


def test_save_and_load_round_trip_the_accordion(board, tmp_path):
    board.set(CHOSEN)
    text = board.output(board.runner.save_args)
    assert "cfg.yaml" in text
    with open(tmp_path / "llamaboard_config" / "cfg.yaml") as f:
        saved = yaml.safe_load(f)
    assert saved["train.use_mfsgd"] is True and saved["train.mfsgd_fused"] is False
    assert {key: saved[key] for key in CHOSEN} == CHOSEN
    loaded = board.runner.load_args("en", "cfg.yaml")
    by_id = {board.manager.get_id_by_elem(elem): value for elem, value in loaded.items()}
    assert {key: by_id[key] for key in [*CHOSEN, "train.use_mfsgd"]} == {**CHOSEN, "train.use_mfsgd": True}


def test_labels_in_every_language_llamaboard_offers(board):
    languages = [value for _, value in board.elem("top.lang").choices]
    assert {"en", "zh"} <= set(languages)
    labels = {}
    for lang in languages:
        updates = board.engine.change_lang(lang)
        labels[lang] = {name: updates[board.elem(f"train.{name}")].label for name in (TAB, *ELEMENTS)}
        assert all(labels[lang].values()), lang
        for name in ELEMENTS:
            assert updates[board.elem(f"train.{name}")].info, (lang, name)
    assert labels["en"][TAB] == "MoFaSGD configurations" and labels["zh"][TAB] == LOCALES[TAB]["zh"]["label"]
    assert all(labels["zh"][name] != labels["en"][name] for name in ELEMENTS if name != "use_mfsgd")
    for lang in set(languages) - {"en", "zh"}:
        assert labels[lang] == labels["en"]  # no translation: the English text


_DISABLED_LOAD = """
import os, yaml, gradio
from board_helpers import Board
board = Board()
os.makedirs("llamaboard_config")
config = {"top.finetuning_type": "full", "train.use_mfsgd": True, "train.mfsgd_rank": 8, "train.learning_rate": "1e-4"}
for name, use in (("on.yaml", True), ("off.yaml", False)):
    with open(os.path.join("llamaboard_config", name), "w") as f:
        yaml.safe_dump({**config, "train.use_mfsgd": use}, f)
try:
    board.runner.load_args("en", "on.yaml")
    print("LOADED")
except gradio.Error as error:
    print("REFUSED", error.message)
loaded = board.runner.load_args("en", "off.yaml")
print("OFF", sorted(board.manager.get_id_by_elem(elem) for elem in loaded))
"""


@pytest.mark.slow
def test_switched_off_extension_refuses_saved_mfsgd_config_clearly(tmp_path):
    path = os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _DISABLED_LOAD],
        cwd=tmp_path,
        env={**os.environ, "LLAMAFACTORY_MFSGD": "0", "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "KeyError" not in proc.stdout + proc.stderr
    refusal = "REFUSED llamaboard_config/on.yaml trains with MoFaSGD (`train.use_mfsgd: true`), but the MoFaSGD"
    assert f"{refusal} extension is switched off (LLAMAFACTORY_MFSGD=0)" in proc.stdout
    # a config saved with MoFaSGD unchecked still loads: the rest of it, without the accordion's values
    assert "OFF ['top.finetuning_type', 'train.learning_rate', 'train.output_box']" in proc.stdout


@pytest.mark.slow
def test_start_button_trains_mofasgd_and_shows_loss_and_diagnostics(tiny_model, tmp_path, monkeypatch):
    """Start from LlamaBoard's runner (it launches `llamafactory-cli train` on its saved YAML), as a user would."""
    import torch
    from llamafactory.webui.control import get_trainer_info
    from llamafactory.webui.locales import ALERTS

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    extra = {
        "max_steps": 4,
        "save_steps": 4,
        "logging_steps": 2,
        "preprocessing_num_workers": 1,
        "dataloader_num_workers": 0,
        "disable_shuffling": True,
    }
    values = {
        "train.extra_args": json.dumps(extra),
        "train.learning_rate": "1e-2",
        "train.batch_size": 2,
        "train.gradient_accumulation_steps": 1,
        "train.mfsgd_rank": 4.0,
        "train.mfsgd_fused": False,
        "train.mfsgd_step_form": "ones",
        "train.mfsgd_stochastic_rounding": "off",
    }
    board = Board().set(base_values(str(tiny_model), **values))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LlamaBoard's no-GPU warning
        updates = list(board.runner.run_train(board.data))
    text = updates[-1][board.elem("train.output_box")]
    assert text.startswith(ALERTS["info_finished"]["en"]), text[-4000:]

    out = tmp_path / "saves" / "tiny-llama" / "full" / "run"
    with open(out / "training_args.yaml") as f:
        launched = yaml.safe_load(f)
    assert launched["use_mfsgd"] is True and launched["mfsgd_fused"] is False
    assert launched["mfsgd_stochastic_rounding"] is False and launched["mfsgd_use_ones_for_nonzero_s"] is True

    state = torch.load(out / "checkpoint-4" / "optimizer.pt", weights_only=True)
    factored = [s for s in state["state"].values() if "U" in s]
    assert len(factored) == 7 * 2  # every hidden matrix of the 2 layers
    for s in factored:
        assert s["U"].shape[1] == s["V"].shape[1] == s["S"].shape[0] == 4 and int(s["step"]) == 4
    (group,) = [g for g in state["param_groups"] if g["mofasgd"]]
    assert (group["rank"], group["use_ones_for_nonzero_s"], group["stochastic_rounding"]) == (4, True, False)

    running_log, progress, info = get_trainer_info("en", str(out), True)
    (started,) = [line for line in running_log.splitlines() if "Using MoFaSGD:" in line]
    assert "rank=4," in started and "fused=False," in started and "stochastic_rounding=False," in started
    assert "loss_viewer" in info and info["loss_viewer"].value is not None  # the loss plot LlamaBoard shows
    assert progress.visible and "4/4" in progress.label
    assert "MoFaSGD step 2: {'update_rms_ratio'" in running_log and "MoFaSGD step 4:" in running_log
