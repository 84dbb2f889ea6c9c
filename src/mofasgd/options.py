"""MoFaSGD's options as data: one :class:`Option` each (default, type, range or choices, help) and their rules.

Everything that names an option is derived from :data:`OPTIONS`: the defaults of ``MoFaSGD.__init__`` and
:data:`DEFAULTS`, the optimizer's validation, the LLaMA-Factory keys ``mfsgd_<option>`` (default and help), the
NanoGPT ``hidden`` section and the options table of the docs (:func:`markdown_table`). :func:`validate` checks a
set of values, their cross-field rules and the rules of an engine (one process, DDP, FSDP2); each rule is written
here once. Its errors are :class:`OptionError` with the option at fault in ``.option``, so a caller that spells the
options otherwise (the YAML keys) names them without reading the message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

# weight: exact top-r SVD of W (the authors'); weight_randomized: randomized top-r SVD of W (fast start);
# gradient: randomized subspaces of the first gradient, S = 0.
INITS = ("weight", "weight_randomized", "gradient")
# AdamW-side state of matrices: full moments (torch's AdamW), a factored second moment (Adafactor's, O(m + n)),
# or a factored second moment and no first moment. Vectors (norms, biases) always keep full AdamW moments.
ADAMW_STATES = ("full", "factored", "factored_no_momentum")
# the kernels of the stochastically rounded bf16 update of a matrix (mofasgd.fused_rounding)
ROUNDING_KERNELS = ("auto", "compiled", "eager")

Engine = Literal["single", "ddp", "fsdp2"]
ENGINES: dict[str, str] = {"single": "one process", "ddp": "DDP", "fsdp2": "FSDP2"}


class OptionError(ValueError):
    """A value or a combination of values MoFaSGD refuses.

    ``option`` is the option at fault and ``options`` every option the refusal involves (``option`` first);
    ``expected`` says what a refused single value should be (None for a rule); ``rule`` is the engine rule that
    refused (None otherwise), whose :meth:`EngineRule.message` spells the options as the caller names them.
    """

    def __init__(
        self,
        message: str,
        option: str,
        options: tuple[str, ...] = (),
        expected: str | None = None,
        rule: EngineRule | None = None,
    ) -> None:
        super().__init__(message)
        self.option = option
        self.options = (option, *(o for o in options if o != option))
        self.expected = expected
        self.rule = rule


@dataclass(frozen=True)
class Option:
    """One constructor option of MoFaSGD: its default, the values it takes and what it does.

    A number lies in [low, high] (``high_open``: [low, high)); ``integer`` numbers are ints; ``choices`` lists the
    accepted strings; ``nullable`` also accepts None; ``pair`` takes two such numbers (Adam's betas). ``in_group``
    options live in the param groups (per-group values); the others are the optimizer's own (one per optimizer).
    """

    name: str
    default: Any
    kind: type
    help: str
    low: float | None = None
    high: float | None = None
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    pair: bool = False
    in_group: bool = True

    def expected(self) -> str:
        """What a valid value is, as the errors say it (``expected ...``)."""
        if self.kind is bool:
            return "expected True, False or None" if self.nullable else "expected True or False"
        if self.choices is not None:
            return f"expected one of {self.choices}"
        if self.kind is int:
            if self.low is None:
                return "expected an integer"
            return "expected a positive integer" if self.low == 1 else f"expected an integer >= {self.low:g}"
        upper = "inf)" if self.high is None else f"{self.high})" if self.high_open else f"{self.high}]"
        return f"expected a value in [{self.low}, {upper}"

    def check(self, value: Any, where: str | None = None) -> None:
        """Raise :class:`OptionError` unless `value` is one this option takes; `where` names the value's origin."""
        label = f"{self.name} ({where})" if where and self.in_group else self.name
        if value is None and self.nullable:
            return
        if self.pair:
            for i, part in enumerate(value):
                self._check_one(part, f"{self.name}[{i}] ({where})" if where else f"{self.name}[{i}]", value)
            return
        self._check_one(value, label, value)

    def _check_one(self, value: Any, label: str, whole: Any) -> None:
        def refuse(expected: str) -> OptionError:
            return OptionError(f"Invalid {label}: {value!r}; {expected}", self.name, expected=expected)

        if self.kind is bool:
            if not isinstance(value, bool):
                raise refuse(self.expected())
        elif self.choices is not None:
            if value not in self.choices:
                raise refuse(self.expected())
        elif self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int) or (self.low is not None and value < self.low):
                raise refuse(self.expected())
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise refuse(f"expected a number, not {type(value).__name__}")
        elif value < self.low or (
            self.high is not None and (value >= self.high if self.high_open else value > self.high)
        ):
            raise refuse(self.expected())


_UNIT = {"low": 0.0, "high": 1.0, "high_open": True}  # [0, 1): a decay factor

OPTIONS: tuple[Option, ...] = (
    Option("lr", 1e-3, float, "Learning rate of the MoFaSGD matrices.", low=0.0),
    Option("rank", 2, int, "Rank r of the factored momentum.", low=1),
    Option("beta", 0.9, float, "Momentum decay beta in [0, 1).", **_UNIT),
    Option("eta1", 1.0, float, "Scale of the low-rank momentum step.", low=0.0),
    Option("eta2", 0.0, float, "Scale of the gradient's orthogonal-complement step; > 0 needs fused off.", low=0.0),
    Option("eps", 1e-4, float, "Singular values <= eps take no step.", low=0.0),
    Option("max_value", 1e4, float, "Clamp of 1/S in the reciprocal-S step.", low=0.0),
    Option(
        "use_ones_for_nonzero_s",
        False,
        bool,
        "Spectrally normalised step U V^T (the paper's) instead of U diag(1/S) V^T.",
    ),
    Option(
        "use_current_projection", False, bool, "Use the new factors (not the previous ones) for the eta2 complement."
    ),
    Option("nesterov", False, bool, "Nesterov look-ahead step SVD_r(beta M + G_hat)."),
    Option("weight_decay", 0.0, float, "Decoupled weight decay (as torch's AdamW).", low=0.0),
    Option(
        "min_gradient_support",
        0.0,
        float,
        "Opt-in guard of the 1/S step (0: off, the authors' step): scale a direction's step down where the gradient "
        "sustains less than this share of its momentum (||G_hat|| < share (1 - beta) S), so a vanishing gradient "
        "does not make the step grow as S decays. 0.01 measured harmless on normal runs (docs/algorithm.md).",
        low=0.0,
    ),
    Option(
        "beta_start",
        None,
        float,
        "Start of the linear beta warm-up (needs beta_warmup_steps).",
        nullable=True,
        **_UNIT,
    ),
    Option("beta_end", None, float, "End of the linear beta warm-up.", nullable=True, **_UNIT),
    Option("beta_warmup_steps", 0, int, "Steps of linear beta warm-up from beta_start to beta_end (0: off).", low=0),
    Option(
        "init",
        "weight",
        str,
        "Factor initialisation: `weight` (exact top-r SVD of W, the authors'), `weight_randomized` "
        "(randomized top-r SVD of W: a fast start) or `gradient` (subspaces of the first gradient).",
        choices=INITS,
    ),
    Option("adam_betas", (0.9, 0.999), float, "AdamW side: Adam's (beta1, beta2).", pair=True, **_UNIT),
    Option("adam_eps", 1e-8, float, "AdamW side: Adam's epsilon.", low=0.0),
    Option(
        "adamw_state",
        "full",
        str,
        "State of the AdamW-side matrices (embeddings, LM head): `full` (AdamW's two moments, the authors'), "
        "`factored` (Adafactor's factored second moment, O(m + n), plus AdamW's first moment) or "
        "`factored_no_momentum` (factored second moment only). Norms and biases keep AdamW's moments.",
        choices=ADAMW_STATES,
    ),
    Option(
        "stochastic_rounding",
        None,
        bool,
        "Round bf16 weight updates stochastically (unbiased) instead of to nearest; unset (None, YAML null): on for "
        "bf16 weights, off for round-to-nearest runs. fp32 weights are never affected.",
        nullable=True,
    ),
    Option(
        "fused",
        True,
        bool,
        "Project gradients in a backward hook and free them at once (LoRA-like memory).",
        in_group=False,
    ),
    Option(
        "fused_adamw_side",
        False,
        bool,
        "Update the AdamW-side matrices (embeddings, LM head) in their gradient hooks, at the last micro-batch, so "
        "their gradients never coexist. Clipping then uses the previous step's coefficient for them.",
        in_group=False,
    ),
    Option(
        "data_parallel",
        False,
        bool,
        "Average the fused projections over the ranks (DDP, the matrices left out of DDP's all-reduce).",
        in_group=False,
    ),
    Option(
        "projected_backward",
        True,
        bool,
        "Train the MoFaSGD weights of nn.Linear layers through a backward that forms only G V and G^T U: no "
        "weight gradient, no weight-gradient GEMM (faster). Off: every matrix takes the gradient hook. The "
        "start-up log says per matrix which path it takes and why.",
        in_group=False,
    ),
    Option("seed", 0, int, "Seed of the stochastic-rounding generators.", in_group=False),
    Option(
        "capturable",
        False,
        bool,
        "Clip and step without reading anything on the host (a sync-free Jacobi SVD of the 2r x 2r cores, the panel "
        "fallback and the skip of non-finite steps decided on the device, the learning rate as a device tensor, "
        "fixed buffers), as a CUDA graph needs. Slower eagerly (the Jacobi SVD issues many small ops).",
        in_group=False,
    ),
    Option(
        "rounding_kernel",
        "auto",
        str,
        "Kernel of a bf16 matrix's stochastically rounded update: `compiled` (torch.compile fuses the update and "
        "hashed random bits into one pass; compiles once per process), `eager` (plain torch ops, the generator's "
        "bits) or `auto` (compiled on CUDA, eager on the CPU). An `auto` that cannot compile says so once and "
        "runs eager.",
        in_group=False,
        choices=ROUNDING_KERNELS,
    ),
)
OPTION: Mapping[str, Option] = MappingProxyType({option.name: option for option in OPTIONS})
DEFAULTS: Mapping[str, Any] = MappingProxyType({option.name: option.default for option in OPTIONS})
# The warm-up bounds are read, and so range-checked, only with a warm-up (beta_warmup_steps > 0).
_WARMUP_BOUNDS = ("beta_start", "beta_end")


@dataclass(frozen=True)
class EngineRule:
    """An option value that does not run under an engine, why, and the values that do.

    ``refuses`` tells from the options whether the rule applies; ``fixes`` are (option, value) pairs to offer
    instead (alternatives of one option, or together the values of several), ``join`` says which; ``otherwise``
    another way out. ``matrices`` (True: MoFaSGD's matrices, False: the AdamW side, None: the whole optimizer) says
    which param groups meet the rule, as their ``mofasgd`` key tells.
    """

    engine: Engine
    option: str
    refuses: Callable[[Mapping[str, Any]], bool]
    why: str
    fixes: tuple[tuple[str, Any], ...]
    join: str = "or"
    otherwise: str = ""
    matrices: bool | None = None

    def message(self, value: Any, spell: Callable[[str, Any], str], note: str = "") -> str:
        """The refusal, with `spell` writing an (option, value) as the caller names options; `note` follows it."""
        fixes = f" {self.join} ".join(spell(option, fix) for option, fix in self.fixes)
        otherwise = f", or {self.otherwise}" if self.otherwise else ""
        subject = f"{spell(self.option, value)}{f' {note}' if note else ''}"
        return f"{subject} does not run under {ENGINES[self.engine]} ({self.why}); use {fixes}{otherwise}."


def python_spelling(option: str, value: Any) -> str:
    """`init='weight'`: an option as the Python constructor takes it."""
    return f"{option}={value!r}"


ENGINE_RULES: tuple[EngineRule, ...] = (
    EngineRule(
        "fsdp2",
        "fused",
        lambda o: not o["fused"],
        "the sharded step consumes each gradient shard's projections in its hook, not whole gradients",
        (("fused", True), ("eta2", 0)),
        join="and",
        otherwise="train on DDP",
    ),
    EngineRule(
        "fsdp2",
        "data_parallel",
        lambda o: o["data_parallel"],
        "FSDP2 already averages gradients over the ranks",
        (("data_parallel", False),),
    ),
    EngineRule(
        "fsdp2",
        "init",
        lambda o: o["init"] == "gradient",
        "each rank holds rows of the first gradient, not the whole of it: the ranks would draw different subspaces",
        (("init", "weight"), ("init", "weight_randomized")),
        otherwise="train on DDP, where it works",
        matrices=True,
    ),
    EngineRule(
        "fsdp2",
        "min_gradient_support",
        lambda o: o["min_gradient_support"] > 0,
        "the gradient-support guard is not implemented on row shards",
        (("min_gradient_support", 0),),
        matrices=True,
    ),
    EngineRule(
        "fsdp2",
        "adamw_state",
        lambda o: o["adamw_state"] != "full",
        "the factored second moment's row and column means would span the ranks' shards",
        (("adamw_state", "full"),),
        otherwise="keep fused_adamw_side, which works under FSDP2",
        matrices=False,
    ),
    EngineRule(
        "fsdp2",
        "capturable",
        lambda o: o["capturable"],
        "the row-sharded panels' fallback is gathered on the host's decision",
        (("capturable", False),),
    ),
)


def _meets(group_is_matrices: bool | None, rule_matrices: bool | None) -> bool:
    """Whether a rule for `rule_matrices` concerns options of a group whose ``mofasgd`` is `group_is_matrices`."""
    return rule_matrices is None or group_is_matrices is None or group_is_matrices == rule_matrices


def validate(options: Mapping[str, Any], engine: Engine = "single", where: str | None = None) -> None:
    """Raise :class:`OptionError` if MoFaSGD refuses `options` (the others at their defaults) under `engine`.

    Checks each value, then the rules between values, then the engine's rules. `options` may carry a param group's
    ``mofasgd`` flag: its options then meet only the rules of their side (matrices or AdamW side). `where` names
    the values' origin in the messages (``argument``, ``param group``).
    """
    unknown = sorted(set(options) - set(OPTION) - {"mofasgd"})
    if unknown:
        raise OptionError(f"Unknown MoFaSGD option(s) {unknown}; valid options: {sorted(OPTION)}", unknown[0])
    values = {**DEFAULTS, **options}
    side = options.get("mofasgd")
    at = f" ({where})" if where else ""
    if not (side is None or isinstance(side, bool)):
        expected = "expected True or False"
        raise OptionError(f"Invalid mofasgd{at}: {side!r}; {expected}", "mofasgd", expected=expected)
    warmup = isinstance(values["beta_warmup_steps"], int) and values["beta_warmup_steps"] > 0
    for name, value in options.items():
        if name in OPTION and (name not in _WARMUP_BOUNDS or warmup):
            OPTION[name].check(value, where)
    if warmup:
        for name in _WARMUP_BOUNDS:
            if values[name] is None:
                raise OptionError(
                    f"beta_warmup_steps > 0 needs {name}{at}; set beta_start and beta_end",
                    name,
                    ("beta_warmup_steps",),
                )
    if values["fused_adamw_side"] and not values["fused"]:
        raise OptionError(
            "fused_adamw_side=True updates AdamW-side parameters in their gradient hooks: it needs fused=True",
            "fused_adamw_side",
            ("fused",),
        )
    if values["capturable"] and values["fused_adamw_side"]:
        raise OptionError(
            "capturable=True reads nothing on the host during a step, but fused_adamw_side=True updates the AdamW "
            "side in its gradient hooks, checking each gradient on the host; set fused_adamw_side=False",
            "capturable",
            ("fused_adamw_side",),
        )
    if values["capturable"] and side is not True and values["adamw_state"] != "full":
        raise OptionError(
            f"adamw_state={values['adamw_state']!r}{at} reads a mean on the host at every step, which "
            "capturable=True does not allow; use adamw_state='full' or capturable=False",
            "adamw_state",
            ("capturable",),
        )
    if values["data_parallel"] and not values["fused"]:
        raise OptionError(
            "data_parallel=True averages the fused projections across ranks; with fused=False DDP already "
            "averages .grad, so leave data_parallel=False",
            "data_parallel",
            ("fused",),
        )
    if values["fused"] and side is not False and values["eta2"] > 0:
        raise OptionError(
            f"eta2={values['eta2']}{at} needs the whole gradient, which fused=True frees during backward; use "
            "fused=False or eta2=0",
            "eta2",
            ("fused",),
        )
    check_engine(options, engine)


def check_engine(options: Mapping[str, Any], engine: Engine) -> None:
    """Raise :class:`OptionError` (with its ``rule``) if `engine` does not run `options` (the others at defaults).

    Only the engine's rules: the values and the rules between them are :func:`validate`'s.
    """
    values = {**DEFAULTS, **options}
    for rule in ENGINE_RULES:
        if rule.engine == engine and _meets(options.get("mofasgd"), rule.matrices) and rule.refuses(values):
            raise OptionError(
                rule.message(values[rule.option], python_spelling),
                rule.option,
                tuple(option for option, _ in rule.fixes),
                rule=rule,
            )


def markdown_table() -> str:
    """The options as a Markdown table (option, default, accepted values, what it does), for the docs."""
    rows = ["| option | default | values | what it does |", "| --- | --- | --- | --- |"]
    for option in OPTIONS:
        values = option.expected().removeprefix("expected ")
        rows.append(f"| `{option.name}` | `{option.default!r}` | {values} | {option.help} |")
    return "\n".join(rows)
