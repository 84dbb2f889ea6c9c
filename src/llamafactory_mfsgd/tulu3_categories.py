"""The Tulu 3 SFT mixture split by category: both category schemes as data, and the one splitter that applies them.

Every row of ``allenai/tulu-3-sft-mixture`` has ``{"id", "messages", "source"}``; ``source`` names the component
dataset it came from. A :class:`CategoryScheme` maps a source to a category: by its table, matched on the name after
the last "/" (so mirrors that re-host a component under another organisation still map), then by keywords of that
name, then to its fall-back category (none: the row belongs to no category). Two schemes exist:

* :data:`AUTHORS`: the authors' seven categories (their ``data/tulu3_category_loader.py``), registered as
  ``tulu3_mixture_<category>`` and prepared on first use by :mod:`llamafactory_mfsgd.tulu3_mixture`;
* :data:`REPORT`: the eight categories of the Tulu 3 report, with keyword fall-backs for sources that other releases
  of the mixture rename and ``other`` for the rest, registered as ``tulu3_<category>`` by
  ``python -m scripts.prepare_tulu3_subsets``.

:func:`load_rows` reads the mixture (a hub id, or a local file in its schema) and :func:`split_rows` writes one
scheme's ``<category>.jsonl`` files, in the format :func:`sharegpt_entry` registers for LLaMA-Factory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_KEYS = ("id", "messages", "source")
# Local copies of the mixture: file suffix -> the `datasets` builder that reads it.
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class CategoryScheme:
    """Mixture source -> category: the table first, then `keywords` in order, then `fallback`.

    Attributes:
        sources: category -> the source names (after the last "/") it holds; its order is the categories' order.
        keywords: (keyword, category) pairs tried in order on the lower-cased name of a source not in the table.
        fallback: the category of a source nothing matches; None leaves its rows out.
    """

    sources: dict[str, tuple[str, ...]]
    keywords: tuple[tuple[str, str], ...] = ()
    fallback: str | None = None
    source_category: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        table = {source: category for category, sources in self.sources.items() for source in sources}
        object.__setattr__(self, "source_category", table)

    def category_of(self, source: str) -> str | None:
        """The category of a mixture ``source`` such as ``ai2-adapt-dev/tulu_v3.9_sciriff_10k`` (None: none)."""
        name = source.rsplit("/", 1)[-1]
        if name in self.source_category:
            return self.source_category[name]
        lowered = name.lower()
        return next((category for keyword, category in self.keywords if keyword in lowered), self.fallback)


AUTHORS = CategoryScheme(
    sources={
        "general": (
            "oasst1_converted",
            "tulu_hard_coded_repeated_10",
            "no_robots_converted",
            "tulu_v3.9_wildchat_100k",
        ),
        "knowledge_recall": ("flan_v2_converted", "tulu_v3.9_sciriff_10k", "tulu_v3.9_table_gpt_5k"),
        "math_reasoning": (
            "personahub_math_v5_regen_149960",
            "tulu-3-sft-personas-math-grade",
            "tulu_v3.9_open_math_2_gsm8k_50k",
            "numinamath_tir_math_decontaminated",
            "tulu_v3.9_personahub_math_interm_algebra_20k",
        ),
        "coding": ("personahub_code_v2_34999", "evol_codealpaca_heval_decontaminated"),
        # The authors' loader calls this category "safety_and_compliance"; their dataset name drops the "and".
        "safety_compliance": (
            "coconot_converted",
            "tulu_v3.9_wildjailbreak_decontaminated_50k",
            "tulu_v3.9_synthetic_finalresp_wildguardmixtrain_decontaminated_50k",
        ),
        "multilingual": ("tulu_v3.9_aya_100k",),
        "precise_if": ("personahub_ifdata_manual_seed_v3_29980",),
    }
)

REPORT = CategoryScheme(
    sources={
        "math": (
            "personahub_math_v5_regen_149960",
            "tulu-3-sft-personas-math-grade",
            "tulu_v3.9_open_math_2_gsm8k_50k",
            "numinamath_tir_math_decontaminated",
            "tulu_v3.9_personahub_math_interm_algebra_20k",
        ),
        "coding": ("personahub_code_v2_34999", "evol_codealpaca_heval_decontaminated"),
        "instruction_following": ("personahub_ifdata_manual_seed_v3_29980",),
        "general": (
            "oasst1_converted",
            "no_robots_converted",
            "tulu_v3.9_wildchat_100k",
            "tulu_hard_coded_repeated_10",
        ),
        "knowledge": ("flan_v2_converted", "tulu_v3.9_table_gpt_5k"),
        "safety": (
            "coconot_converted",
            "tulu_v3.9_wildjailbreak_decontaminated_50k",
            "tulu_v3.9_synthetic_finalresp_wildguardmixtrain_decontaminated_50k",
        ),
        "multilingual": ("tulu_v3.9_aya_100k",),
        "science": ("tulu_v3.9_sciriff_10k",),
    },
    # more specific names first
    keywords=(
        ("ifdata", "instruction_following"),
        ("instruction-following", "instruction_following"),
        ("jailbreak", "safety"),
        ("wildguard", "safety"),
        ("coconot", "safety"),
        ("aya", "multilingual"),
        ("sciriff", "science"),
        ("math", "math"),
        ("gsm", "math"),
        ("algebra", "math"),
        ("code", "coding"),
        ("flan", "knowledge"),
        ("table_gpt", "knowledge"),
        ("wildchat", "general"),
        ("oasst", "general"),
        ("no_robots", "general"),
        ("hard_coded", "general"),
    ),
    fallback="other",
)


def sharegpt_entry(file_name: str) -> dict[str, Any]:
    """A LLaMA-Factory ``dataset_info.json`` entry for a local file in the Tulu 3 (sharegpt messages) schema."""
    return {
        "file_name": file_name,
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
            "system_tag": "system",
        },
    }


def load_rows(source: str, split: str = "train", streaming: bool = False) -> Iterable[dict[str, Any]]:
    """The rows of the mixture: a local file in its schema (see ``LOCAL_FORMATS``) or a hub id (download cached).

    The data is opened here, so a missing or unreachable mixture raises now, not when the rows are read.

    Raises:
        ValueError: `source` is a local file of another type.
    """
    from datasets import load_dataset

    path = Path(source)
    if path.is_file():
        if path.suffix not in LOCAL_FORMATS:
            expected = sorted(LOCAL_FORMATS)
            raise ValueError(f"{source}: unsupported file type {path.suffix!r}; expected one of {expected}.")
        return load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train", streaming=streaming)
    return load_dataset(source, split=split, streaming=streaming)


def split_rows(
    rows: Iterable[dict[str, Any]],
    scheme: CategoryScheme,
    out_dir: Path,
    categories: Iterable[str] | None = None,
    max_per_category: int | None = None,
    write_empty: bool = False,
) -> dict[str, int]:
    """Write the rows of `categories` (default: the scheme's table) to ``out_dir/<category>.jsonl``; return the counts.

    Rows keep the mixture's schema keys and their input order, at most `max_per_category` per category. Each file is
    written under a temporary name and renamed once every row is read, so an interrupted split never leaves a partial
    subset. A category without rows gets an (empty) file only with `write_empty`; it is in the counts either way.
    """
    counts = dict.fromkeys(scheme.sources if categories is None else categories, 0)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    try:
        for row in rows:
            category = scheme.category_of(row["source"])
            if category not in counts or counts[category] == max_per_category:
                continue
            if category not in files:
                files[category] = open(out_dir / f".{category}.jsonl.partial", "w", encoding="utf-8", newline="\n")
            files[category].write(json.dumps({key: row[key] for key in SCHEMA_KEYS}, ensure_ascii=False) + "\n")
            counts[category] += 1
    finally:
        for file in files.values():
            file.close()
    for category in counts:
        if category in files:
            (out_dir / f".{category}.jsonl.partial").replace(out_dir / f"{category}.jsonl")
        elif write_empty:
            (out_dir / f"{category}.jsonl").write_text("", encoding="utf-8")
    return counts
