"""The authors' Tulu 3 category datasets ``tulu3_mixture_<category>``, prepared from the hub mixture on first use.

The authors' fork registers seven category subsets of ``allenai/tulu-3-sft-mixture`` under these names and builds
them with a dataset loading script, which datasets 4 no longer runs. Here the subsets are plain JSONL files named
in ``data/dataset_info.json`` (``tulu3_mixture/<category>.jsonl`` under the dataset directory). When a training
config names one that is not there yet, :func:`ensure_subsets` (called at parse time, main process first) loads the
mixture once (the hub download is cached by ``datasets``), writes all seven category files in one pass (the
authors' table and the splitter of :mod:`llamafactory_mfsgd.tulu3_categories`) and reuses them afterwards. Offline
and without the mixture in the cache, it raises one error naming the command that prepares the files.
``MFSGD_TULU3_MIXTURE`` may point at a local copy of the mixture (.jsonl/.json/.parquet in the same schema) instead
of the hub id.

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

from .tulu3_categories import AUTHORS, load_rows, sharegpt_entry, split_rows

MIXTURE = "allenai/tulu-3-sft-mixture"
MIXTURE_ENV = "MFSGD_TULU3_MIXTURE"
PREFIX = "tulu3_mixture_"
DATASET_NAMES = tuple(PREFIX + category for category in AUTHORS.sources)

logger = logging.getLogger("llamafactory.mfsgd")


def dataset_entry(category: str) -> dict[str, Any]:
    """The ``dataset_info.json`` entry of one category: a local JSONL in the mixture's (sharegpt) schema."""
    return sharegpt_entry(f"tulu3_mixture/{category}.jsonl")


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
        rows = load_rows(source)
    except (OSError, ValueError) as error:  # ConnectionError, offline-mode misses and missing files are OSErrors
        raise FileNotFoundError(
            f"The Tulu 3 category subsets are not prepared in {out_dir}, and the mixture {source} could not be "
            f"loaded ({type(error).__name__}: {error}). Prepare them once, with internet: "
            f"{prepare_command(dataset_dir)}"
        ) from error
    # every category gets its file, empty or not, so that ensure_subsets finds them all prepared
    counts = split_rows(rows, AUTHORS, out_dir, write_empty=True)
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
