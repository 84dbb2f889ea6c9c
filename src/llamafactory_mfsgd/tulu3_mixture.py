"""The authors' Tulu 3 category datasets ``tulu3_mixture_<category>``, prepared from the hub mixture on first use.

The authors' fork registers seven category subsets of ``allenai/tulu-3-sft-mixture`` under these names and builds
them with a dataset loading script, which datasets 4 no longer runs. Here the subsets are plain JSONL files named
in ``data/dataset_info.json`` (``tulu3_mixture/<category>.jsonl`` under the dataset directory). When a training
config names one that is not there yet, :func:`ensure_subsets` (called at parse time, main process first) loads the
mixture once (the hub download is cached by ``datasets``), writes all seven category files in one pass and
reuses them afterwards. Offline and without the mixture in the cache, it raises one error naming the command that
prepares the files. ``MFSGD_TULU3_MIXTURE`` may point at a local copy of the mixture (.jsonl/.json/.parquet in the
same schema) instead of the hub id.

Usage::

    python -m llamafactory_mfsgd.tulu3_mixture --dataset-dir data   # all seven subsets, once, with internet
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MIXTURE = "allenai/tulu-3-sft-mixture"
MIXTURE_ENV = "MFSGD_TULU3_MIXTURE"
PREFIX = "tulu3_mixture_"
SCHEMA_KEYS = ("id", "messages", "source")
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}

# The authors' category -> mixture sources (their data/tulu3_category_loader.py). Matched on the name after the
# last "/", so mirrors that re-host a component under another organisation still map.
CATEGORY_SOURCES: dict[str, tuple[str, ...]] = {
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
SOURCE_CATEGORY = {source: category for category, sources in CATEGORY_SOURCES.items() for source in sources}
DATASET_NAMES = tuple(PREFIX + category for category in CATEGORY_SOURCES)

logger = logging.getLogger("llamafactory.mfsgd")


def category_of(source: str) -> str | None:
    """The authors' category of a mixture ``source`` such as ``ai2-adapt-dev/tulu_v3.9_sciriff_10k`` (None: unused)."""
    return SOURCE_CATEGORY.get(source.rsplit("/", 1)[-1])


def dataset_entry(category: str) -> dict[str, Any]:
    """The ``dataset_info.json`` entry of one category: a local JSONL in the mixture's (sharegpt) schema."""
    return sharegpt_entry(f"tulu3_mixture/{category}.jsonl")


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


def prepare_command(dataset_dir: str | Path) -> str:
    """The one command that writes every ``tulu3_mixture_*`` file into ``dataset_dir``."""
    return f"python -m llamafactory_mfsgd.tulu3_mixture --dataset-dir {Path(dataset_dir).resolve()}"


def subset_files(names: Iterable[str], dataset_dir: str | Path) -> dict[str, Path]:
    """The files behind the requested ``tulu3_mixture_*`` names, as ``dataset_dir/dataset_info.json`` names them."""
    wanted = [name for name in names if name in DATASET_NAMES]
    info_path = Path(dataset_dir) / "dataset_info.json"
    if not wanted or not info_path.is_file():
        return {}
    info = json.loads(info_path.read_text(encoding="utf-8"))
    return {name: Path(dataset_dir) / info[name]["file_name"] for name in wanted if "file_name" in info.get(name, {})}


def _load_mixture(source: str, split: str = "train") -> Any:
    """The mixture as a ``datasets.Dataset``: a local file in the mixture's schema, or a hub id (download cached)."""
    from datasets import load_dataset

    path = Path(source)
    if path.is_file():
        if path.suffix not in LOCAL_FORMATS:
            raise ValueError(f"{MIXTURE_ENV}={source}: expected one of {sorted(LOCAL_FORMATS)}.")
        return load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    return load_dataset(source, split=split)


def write_subsets(mixture: Any, out_dir: Path) -> dict[str, int]:
    """Write ``out_dir/<category>.jsonl`` for every category (rows unchanged, input order); return the row counts.

    Each file is written under a temporary name and renamed, so an interrupted run never leaves a partial subset.
    """
    mixture = mixture.select_columns(list(SCHEMA_KEYS))
    rows: dict[str, list[int]] = {category: [] for category in CATEGORY_SOURCES}
    for index, source in enumerate(mixture["source"]):
        category = category_of(source)
        if category is not None:
            rows[category].append(index)
    out_dir.mkdir(parents=True, exist_ok=True)
    for category, indices in rows.items():
        partial = out_dir / f".{category}.jsonl.partial"
        mixture.select(indices).to_json(str(partial), lines=True, force_ascii=False)
        partial.replace(out_dir / f"{category}.jsonl")
    return {category: len(indices) for category, indices in rows.items()}


def prepare(dataset_dir: str | Path, source: str | None = None) -> dict[str, int]:
    """Load the mixture (hub download cached by ``datasets``) and write all category files; return the row counts.

    Raises:
        FileNotFoundError: when the mixture cannot be loaded (offline and not cached, or no such file), naming the
            command that prepares the files.
    """
    source = source or os.environ.get(MIXTURE_ENV) or MIXTURE
    out_dir = Path(dataset_dir) / "tulu3_mixture"
    logger.info(f"Preparing the Tulu 3 category subsets {list(DATASET_NAMES)} from {source} into {out_dir} (once).")
    try:
        mixture = _load_mixture(source)
    except (OSError, ValueError) as error:  # ConnectionError, offline-mode misses and missing files are OSErrors
        raise FileNotFoundError(
            f"The Tulu 3 category subsets are not prepared in {out_dir}, and the mixture {source} could not be "
            f"loaded ({type(error).__name__}: {error}). Prepare them once, with internet: "
            f"{prepare_command(dataset_dir)}"
        ) from error
    counts = write_subsets(mixture, out_dir)
    logger.info(f"Wrote {out_dir}: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    return counts


def ensure_subsets(names: Iterable[str], dataset_dir: str | Path) -> None:
    """Prepare the requested ``tulu3_mixture_*`` files if any is missing (a no-op when all exist or none is named)."""
    if str(dataset_dir) == "ONLINE" or str(dataset_dir).startswith("REMOTE:"):
        return
    missing = [name for name, path in subset_files(names, dataset_dir).items() if not path.is_file()]
    if missing:
        logger.info(f"{missing} not prepared yet in {Path(dataset_dir).resolve()}.")
        prepare(dataset_dir)


def prepare_for_training(data_args: Any, training_args: Any) -> None:
    """Parse-time hook: prepare the config's ``tulu3_mixture_*`` datasets, the main process first (others wait)."""
    names = [*(data_args.dataset or []), *(data_args.eval_dataset or [])]
    if not any(name in DATASET_NAMES for name in names):
        return
    local = not getattr(data_args, "data_shared_file_system", False)
    with training_args.main_process_first(desc="prepare the Tulu 3 category subsets", local=local):
        ensure_subsets(names, data_args.dataset_dir)


def main(argv: list[str] | None = None) -> None:
    """Command line: write all ``tulu3_mixture_*`` subsets into the dataset directory."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", default="data", help="directory holding dataset_info.json (default: data)")
    parser.add_argument(
        "--mixture", default=None, help=f"hub id or local file of the mixture (default: ${MIXTURE_ENV} or {MIXTURE})"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    counts = prepare(args.dataset_dir, args.mixture)
    for category, count in counts.items():
        print(
            f"{PREFIX + category:34s} {count:8d}  {Path(args.dataset_dir) / 'tulu3_mixture' / (category + '.jsonl')}"
        )


if __name__ == "__main__":
    main()
