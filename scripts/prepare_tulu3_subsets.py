"""Split the Tulu 3 SFT mixture into per-category JSONL files and register them for LLaMA-Factory.

Every row of ``allenai/tulu-3-sft-mixture`` has ``{"id", "messages", "source"}``; ``source`` names the
component dataset it came from. This script maps each source to a category, writes
``<out>/<category>.jsonl`` (rows unchanged, same schema) and prints the matching ``dataset_info.json``
entries ``tulu3_<category>``; with ``--dataset-info`` it also merges them into that file.

Source → category (the categories of the Tulu 3 report; the prefix before ``/`` is ignored):

=====================  ================================================================================
category               sources
=====================  ================================================================================
math                   personahub_math_v5_regen_149960, tulu-3-sft-personas-math-grade,
                       tulu_v3.9_open_math_2_gsm8k_50k, numinamath_tir_math_decontaminated,
                       tulu_v3.9_personahub_math_interm_algebra_20k
coding                 personahub_code_v2_34999, evol_codealpaca_heval_decontaminated
instruction_following  personahub_ifdata_manual_seed_v3_29980
general                oasst1_converted, no_robots_converted, tulu_v3.9_wildchat_100k,
                       tulu_hard_coded_repeated_10
knowledge              flan_v2_converted, tulu_v3.9_table_gpt_5k
safety                 coconot_converted, tulu_v3.9_wildjailbreak_decontaminated_50k,
                       tulu_v3.9_synthetic_finalresp_wildguardmixtrain_decontaminated_50k
multilingual           tulu_v3.9_aya_100k
science                tulu_v3.9_sciriff_10k
=====================  ================================================================================

The table, its keyword fall-backs and the splitter are those of ``llamafactory_mfsgd.tulu3_categories``
(``REPORT``). Sources not in the table (other releases of the mixture rename components) fall back to keywords in
their name (``math``/``gsm``/``algebra`` → math, ``code`` → coding, ``ifdata`` → instruction_following, ...), and
to ``other`` when nothing matches.

The authors' fork groups the same sources into seven categories of its own, registered as
``tulu3_mixture_<category>``; those are prepared on first use by ``llamafactory_mfsgd.tulu3_mixture``.

Usage::

    # GPU users with internet: the hub mixture (downloads ~1.4 GB once, or --streaming)
    python -m scripts.prepare_tulu3_subsets --input allenai/tulu-3-sft-mixture --out data/tulu3_subsets \\
        --categories coding,math --dataset-info data/dataset_info.json
    # offline: a local file in the same schema (.jsonl, .json or .parquet)
    python -m scripts.prepare_tulu3_subsets --input data/tulu3_demo.jsonl --out /tmp/tulu3_subsets
"""

import argparse
import json
import os
from pathlib import Path

from llamafactory_mfsgd.tulu3_categories import REPORT, load_rows, split_rows
from llamafactory_mfsgd.tulu3_categories import sharegpt_entry as dataset_entry  # the dataset_info.json entry schema

CATEGORIES = sorted(REPORT.sources)
OTHER = REPORT.fallback


def dataset_name(category: str) -> str:
    """The ``dataset_info.json`` key of a category subset, e.g. ``tulu3_coding``."""
    return f"tulu3_{category}"


def dataset_entries(out_dir: Path, counts: dict[str, int], dataset_dir: Path) -> dict[str, dict]:
    """``dataset_info.json`` entries for the non-empty subsets, with paths relative to ``dataset_dir``."""
    entries = {}
    for category, count in counts.items():
        if count > 0:
            file_name = Path(os.path.relpath(out_dir / f"{category}.jsonl", dataset_dir)).as_posix()
            entries[dataset_name(category)] = dataset_entry(file_name)

    return entries


def update_dataset_info(path: Path, entries: dict[str, dict]) -> None:
    """Merge ``entries`` into the ``dataset_info.json`` at ``path`` (created if missing), keeping other keys."""
    info = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    info.update(entries)
    path.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def parse_categories(value: str) -> list[str]:
    """Parse ``coding,math`` (or ``all``) into a list of known categories."""
    if value == "all":
        return CATEGORIES + [OTHER]

    categories = [item.strip() for item in value.split(",") if item.strip()]
    unknown = sorted(set(categories) - set(CATEGORIES + [OTHER]))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown categories {unknown}; choose from {CATEGORIES + [OTHER]}")

    return categories


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="hub dataset id or local .jsonl/.json/.parquet file")
    parser.add_argument("--out", type=Path, required=True, help="directory for <category>.jsonl")
    parser.add_argument(
        "--categories",
        type=parse_categories,
        default=CATEGORIES,
        help=f"comma-separated subset of {CATEGORIES + [OTHER]}, or 'all' (default: all but other)",
    )
    parser.add_argument("--max-per-category", type=int, default=None, help="keep at most this many rows each")
    parser.add_argument("--split", default="train", help="split of a hub dataset")
    parser.add_argument("--streaming", action="store_true", help="stream a hub dataset instead of downloading it")
    parser.add_argument(
        "--dataset-info",
        type=Path,
        default=None,
        help="dataset_info.json to merge the entries into (file paths become relative to its directory)",
    )
    args = parser.parse_args(argv)

    rows = load_rows(args.input, args.split, args.streaming)
    counts = split_rows(rows, REPORT, args.out, args.categories, args.max_per_category)
    dataset_dir = args.dataset_info.parent if args.dataset_info else args.out.parent
    entries = dataset_entries(args.out, counts, dataset_dir)

    for category, count in counts.items():
        print(f"{dataset_name(category):32s} {count:8d}  {args.out / f'{category}.jsonl' if count else '(empty)'}")

    if args.dataset_info:
        update_dataset_info(args.dataset_info, entries)
        print(f"updated {args.dataset_info} with {sorted(entries)}")
    else:
        print(json.dumps(entries, indent=2))


if __name__ == "__main__":
    main()
