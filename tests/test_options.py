"""The options model (mofasgd.options): one table of defaults, each rule written once, errors naming the option."""

import inspect
import types
import typing
from dataclasses import asdict

import pytest
import torch

from llamafactory_mfsgd.arguments import OPTION_OF_KEY, MfsgdArguments
from llamafactory_mfsgd.checks import validate_with_training_args
from mofasgd import DEFAULTS, OPTIONS, MoFaSGD, OptionError, validate
from mofasgd.options import ENGINE_RULES, OPTION, check_engine, markdown_table


def test_the_constructor_defaults_are_the_table():
    signature = inspect.signature(MoFaSGD).parameters
    assert {name: p.default for name, p in signature.items() if name != "params"} == dict(DEFAULTS)
    assert [name for name in signature if name != "params"] == [option.name for option in OPTIONS]


def test_the_yaml_fields_take_the_option_default_help_and_type():
    fields = {f.name: f for f in MfsgdArguments.__dataclass_fields__.values()}
    hints = typing.get_type_hints(MfsgdArguments)
    for key, name in OPTION_OF_KEY.items():
        option = OPTION[name]
        assert fields[key].default == option.default and fields[key].metadata["help"] == option.help
        kind = hints[key]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `X | None`
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if option.choices is not None:
            assert typing.get_args(kind) == option.choices, key
        else:
            assert kind is option.kind, key


@pytest.mark.parametrize(
    "option,value,expected",
    [
        ("rank", 0, "expected a positive integer"),
        ("rank", True, "expected a positive integer"),
        ("beta", 1.0, r"expected a value in \[0.0, 1.0\)"),
        ("lr", "1e-3", "expected a number, not str"),
        ("init", "svd", "expected one of"),
        ("nesterov", 1, "expected True or False"),
        ("stochastic_rounding", "yes", "expected True, False or None"),
        ("beta_warmup_steps", -1, "expected an integer >= 0"),
        ("seed", 1.5, "expected an integer"),
    ],
)
def test_a_bad_value_names_its_option_and_what_it_takes(option, value, expected):
    with pytest.raises(OptionError, match=expected) as error:
        validate({option: value})
    assert error.value.option == option and error.value.expected.startswith("expected")
    with pytest.raises(ValueError, match=f"Invalid {option}"):  # the constructor raises the same error
        MoFaSGD([torch.zeros(2, 2, requires_grad=True)], **{option: value})


@pytest.mark.parametrize(
    "options,option,others",
    [
        ({"fused": False, "fused_adamw_side": True}, "fused_adamw_side", ("fused",)),
        ({"fused": False, "data_parallel": True}, "data_parallel", ("fused",)),
        ({"eta2": 0.5}, "eta2", ("fused",)),
        ({"beta_warmup_steps": 3, "beta_end": 0.9}, "beta_start", ("beta_warmup_steps",)),
    ],
)
def test_each_rule_between_options_raises_naming_its_options(options, option, others):
    with pytest.raises(OptionError) as error:
        validate(options)
    assert error.value.option == option and error.value.options == (option, *others) and error.value.rule is None


@pytest.mark.parametrize("rule", ENGINE_RULES, ids=lambda rule: f"{rule.engine}-{rule.option}")
def test_each_engine_rule_raises_under_its_engine_only(rule):
    refused = {
        "fused": {"fused": False},
        "data_parallel": {"data_parallel": True},
        "init": {"init": "gradient"},
        "min_gradient_support": {"min_gradient_support": 0.01},
        "adamw_state": {"adamw_state": "factored"},
        "capturable": {"capturable": True},
    }[rule.option]
    validate(refused if rule.option != "data_parallel" else {})  # one process runs it
    with pytest.raises(OptionError, match="does not run under FSDP2") as error:
        check_engine(refused, rule.engine)
    assert error.value.option == rule.option and error.value.rule is rule
    for fix, value in rule.fixes:  # the fixes it names do run
        if fix == rule.option:
            check_engine({**refused, fix: value}, rule.engine)


def test_a_param_group_meets_only_the_rules_of_its_side():
    check_engine({"init": "gradient", "mofasgd": False}, "fsdp2")  # the AdamW side has no factors to initialise
    check_engine({"adamw_state": "factored", "mofasgd": True}, "fsdp2")  # managed matrices keep no AdamW moments
    with pytest.raises(OptionError):
        check_engine({"adamw_state": "factored", "mofasgd": False}, "fsdp2")


def test_engine_rules_map_to_yaml_keys_without_reading_the_message(monkeypatch):
    """The YAML error is the rule's own message, spelled with the keys; the option comes from `.option`."""
    monkeypatch.setenv("MFSGD_CPU_FSDP2", "1")
    finetuning = types.SimpleNamespace(
        **{**asdict(MfsgdArguments()), "use_mfsgd": True, "galore_fused": False, "mfsgd_min_gradient_support": 0.01},
        pure_bf16=False,
    )
    training = types.SimpleNamespace(
        fp16=False, fsdp=["full_shard"], world_size=2, resume_from_checkpoint=None, max_grad_norm=1.0
    )
    with pytest.raises(
        ValueError,
        match=r"^`mfsgd_min_gradient_support: 0.01` does not run under FSDP2.*"
        r"use `mfsgd_min_gradient_support: 0`",
    ):
        validate_with_training_args(finetuning, training)


def test_the_docs_table_lists_every_option_with_its_default():
    table = markdown_table().splitlines()
    assert len(table) == 2 + len(OPTIONS)
    for row, option in zip(table[2:], OPTIONS):
        assert row.startswith(f"| `{option.name}` | `{option.default!r}` |")
