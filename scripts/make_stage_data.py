"""Derive the small local datasets of LLaMA-Factory's other stages (pt, dpo/rm, kto) from the SFT demo set.

All three are built deterministically from ``data/tulu3_demo.jsonl`` (so the tiny tokenizer, trained on it, knows
their words):

- ``tulu3_demo_text.jsonl`` (``stage: pt``): ``{"id", "text"}``, each conversation written out as plain text;
- ``tulu3_demo_pref.jsonl`` (``stage: dpo`` and ``rm``): ``{"id", "messages", "chosen", "rejected", "source"}`` in
  LLaMA-Factory's sharegpt ranking form: the prompt turns, the demo answer as ``chosen`` and, as ``rejected``, the
  answer of the next conversation of the same source (the same kind of task) whose answer differs: a fluent answer
  to another question (for the refusals, which all read alike, the next other answer of any task);
- ``tulu3_demo_kto.jsonl`` (``stage: kto``): ``{"id", "messages", "label", "source"}``, alternating rows keeping the
  demo answer (``label: true``) and rows with that rejected answer (``label: false``).

Usage::

    python -m scripts.make_stage_data [--data-dir data] [--num-rows 128]
"""

import argparse
import json
from pathlib import Path

SOURCE_FILE = "tulu3_demo.jsonl"
TEXT_FILE = "tulu3_demo_text.jsonl"
PREF_FILE = "tulu3_demo_pref.jsonl"
KTO_FILE = "tulu3_demo_kto.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_jsonl(rows: list[dict], path: Path) -> None:
    """One JSON object per line (UTF-8, stable key order, trailing newline)."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def as_text(messages: list[dict]) -> str:
    """A conversation as plain text, one `Role: content` paragraph per turn."""
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def rejected_answers(rows: list[dict]) -> list[str]:
    """For each row, the last answer of the next row (cyclically) of the same source whose last answer differs.

    Where a source's rows all answer alike (the refusals), the next row of any source with another answer.
    """
    by_source: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_source.setdefault(row["source"], []).append(i)
    answers = [row["messages"][-1]["content"] for row in rows]
    out = []
    for i, row in enumerate(rows):
        peers = by_source[row["source"]]
        start = peers.index(i)
        ordered = peers[start + 1 :] + peers[:start] + list(range(i + 1, len(rows))) + list(range(i))
        out.append(next(answers[j] for j in ordered if answers[j] != answers[i]))
    return out


def make_stage_rows(rows: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """The (pt text, preference, kto) rows of `rows`, in their order."""
    rejected = rejected_answers(rows)
    text, pref, kto = [], [], []
    for i, (row, wrong) in enumerate(zip(rows, rejected)):
        suffix = row["id"].removeprefix("tulu3_demo_train_")
        prompt, answer = row["messages"][:-1], row["messages"][-1]
        text.append({"id": f"tulu3_demo_text_{suffix}", "text": as_text(row["messages"])})
        pref.append(
            {
                "id": f"tulu3_demo_pref_{suffix}",
                "messages": prompt,
                "chosen": answer,
                "rejected": {"role": "assistant", "content": wrong},
                "source": row["source"],
            }
        )
        desirable = i % 2 == 0
        reply = answer if desirable else {"role": "assistant", "content": wrong}
        kto.append(
            {
                "id": f"tulu3_demo_kto_{suffix}",
                "messages": [*prompt, reply],
                "label": desirable,
                "source": row["source"],
            }
        )
    return text, pref, kto


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help=f"holds {SOURCE_FILE}; outputs go here")
    parser.add_argument("--out-dir", type=Path, default=None, help="where to write (default: --data-dir)")
    parser.add_argument("--num-rows", type=int, default=128, help="how many of the first demo rows to derive from")
    args = parser.parse_args(argv)

    rows = read_jsonl(args.data_dir / SOURCE_FILE)[: args.num_rows]
    out_dir = args.out_dir or args.data_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, derived in zip((TEXT_FILE, PREF_FILE, KTO_FILE), make_stage_rows(rows)):
        write_jsonl(derived, out_dir / name)
        print(f"wrote {len(derived)} rows to {out_dir / name}")


if __name__ == "__main__":
    main()
