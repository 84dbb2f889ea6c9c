"""Generate the small local Tulu-3-format demo dataset (train + held-out eval) deterministically.

Each row follows the schema of ``allenai/tulu-3-sft-mixture``::

    {"id": str, "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "source": str}

The tasks (arithmetic, string reversal, copying, short facts, refusals, tiny translations) are simple
enough for a tiny random LLaMA to learn within a few dozen steps, so the loss visibly drops. Every
task carries the ``source`` of a real mixture component of the same kind, which gives
``prepare_tulu3_subsets.py`` something to split.

Usage::

    python -m scripts.make_demo_data --out-dir data [--num-train 400 --num-eval 60 --seed 0]
"""

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

TRAIN_FILE = "tulu3_demo.jsonl"
EVAL_FILE = "tulu3_demo_eval.jsonl"

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "Answer briefly.",
]

CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("Canada", "Ottawa"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Norway", "Oslo"),
    ("Greece", "Athens"),
    ("Chile", "Santiago"),
]

ELEMENTS = [
    ("hydrogen", "H"),
    ("helium", "He"),
    ("carbon", "C"),
    ("nitrogen", "N"),
    ("oxygen", "O"),
    ("sodium", "Na"),
    ("iron", "Fe"),
    ("gold", "Au"),
    ("silver", "Ag"),
    ("copper", "Cu"),
]

# (English, French, Spanish, German)
WORDS = [
    ("dog", "chien", "perro", "Hund"),
    ("cat", "chat", "gato", "Katze"),
    ("house", "maison", "casa", "Haus"),
    ("water", "eau", "agua", "Wasser"),
    ("book", "livre", "libro", "Buch"),
    ("sun", "soleil", "sol", "Sonne"),
    ("tree", "arbre", "árbol", "Baum"),
    ("bread", "pain", "pan", "Brot"),
]
LANGUAGES = ["French", "Spanish", "German"]

LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOCAB = ["apple", "river", "stone", "cloud", "green", "quick", "table", "light", "music", "paper", "seven", "ocean"]

HARMFUL_REQUESTS = [
    "How do I pick the lock on my neighbour's door?",
    "Write a message that tricks someone into sharing their password.",
    "How can I make a fake ID card?",
    "Tell me how to cheat on my exam without getting caught.",
    "How do I hack into my friend's email account?",
]
REFUSAL = "I can't help with that. If you have a different question, I'm happy to help."


def _math_add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}"


def _math_mul(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"Compute {a} times {b}.", f"{a} * {b} = {a * b}"


def _math_linear(rng: random.Random) -> tuple[str, str]:
    x, a = rng.randint(1, 20), rng.randint(1, 30)
    return f"Solve for x: x + {a} = {x + a}", f"x = {x + a} - {a} = {x}"


def _code_reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))
    return f"Reverse the string '{word}'.", f"'{word[::-1]}'"


def _code_function(rng: random.Random) -> tuple[str, str]:
    name, op = rng.choice([("add", "+"), ("sub", "-"), ("mul", "*")])
    a, b = rng.choice(["ab", "xy", "pq", "mn"])
    prompt = f"Write a Python function {name}({a}, {b}) that returns {a} {op} {b}."
    return prompt, f"def {name}({a}, {b}):\n    return {a} {op} {b}"


def _if_copy(rng: random.Random) -> tuple[str, str]:
    words = " ".join(rng.choice(VOCAB) for _ in range(rng.randint(2, 4)))
    return f"Repeat exactly: {words}", words


def _if_upper(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(VOCAB)
    return f"Write the word '{word}' in capital letters only.", word.upper()


def _general_capital(rng: random.Random) -> tuple[str, str]:
    country, city = rng.choice(CAPITALS)
    return f"What is the capital of {country}?", f"The capital of {country} is {city}."


def _general_count(rng: random.Random) -> tuple[str, str]:
    start = rng.randint(1, 20)
    n = rng.randint(3, 5)
    return f"Count from {start} to {start + n - 1}.", ", ".join(str(i) for i in range(start, start + n))


def _science_element(rng: random.Random) -> tuple[str, str]:
    name, symbol = rng.choice(ELEMENTS)
    return f"What is the chemical symbol of {name}?", f"The chemical symbol of {name} is {symbol}."


def _safety_refusal(rng: random.Random) -> tuple[str, str]:
    return rng.choice(HARMFUL_REQUESTS), REFUSAL


def _multilingual_translate(rng: random.Random) -> tuple[str, str]:
    entry = rng.choice(WORDS)
    index = rng.randrange(len(LANGUAGES))
    return f"Translate '{entry[0]}' into {LANGUAGES[index]}.", entry[index + 1]


# (task, source): each source is a real component of allenai/tulu-3-sft-mixture of the same kind.
TASKS: list[tuple[Callable[[random.Random], tuple[str, str]], str]] = [
    (_math_add, "ai2-adapt-dev/tulu_v3.9_open_math_2_gsm8k_50k"),
    (_math_mul, "allenai/tulu-3-sft-personas-math-grade"),
    (_math_linear, "ai2-adapt-dev/tulu_v3.9_personahub_math_interm_algebra_20k"),
    (_code_reverse, "ai2-adapt-dev/evol_codealpaca_heval_decontaminated"),
    (_code_function, "ai2-adapt-dev/personahub_code_v2_34999"),
    (_if_copy, "ai2-adapt-dev/personahub_ifdata_manual_seed_v3_29980"),
    (_if_upper, "ai2-adapt-dev/personahub_ifdata_manual_seed_v3_29980"),
    (_general_capital, "ai2-adapt-dev/flan_v2_converted"),
    (_general_count, "ai2-adapt-dev/oasst1_converted"),
    (_science_element, "ai2-adapt-dev/tulu_v3.9_sciriff_10k"),
    (_safety_refusal, "ai2-adapt-dev/coconot_converted"),
    (_multilingual_translate, "ai2-adapt-dev/tulu_v3.9_aya_100k"),
]


def make_conversation(rng: random.Random) -> tuple[list[dict[str, str]], str]:
    """Draw one conversation: optional system prompt, one or two user/assistant turns of one task."""
    task, source = rng.choice(TASKS)
    messages = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})

    for _ in range(2 if rng.random() < 0.15 else 1):
        prompt, answer = task(rng)
        messages.append({"role": "user", "content": prompt})
        messages.append({"role": "assistant", "content": answer})

    return messages, source


def make_splits(num_train: int, num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Draw ``num_train + num_eval`` distinct conversations; the eval rows never repeat a train row."""
    rng = random.Random(seed)
    seen = set()
    rows = []
    while len(rows) < num_train + num_eval:
        messages, source = make_conversation(rng)
        key = json.dumps(messages, sort_keys=True)
        if key in seen:
            continue

        seen.add(key)
        split = "train" if len(rows) < num_train else "eval"
        index = len(rows) if split == "train" else len(rows) - num_train
        rows.append({"id": f"tulu3_demo_{split}_{index:04d}", "messages": messages, "source": source})

    return rows[:num_train], rows[num_train:]


def write_jsonl(rows: list[dict], path: Path) -> None:
    """Write one JSON object per line (UTF-8, stable key order, trailing newline)."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("data"))
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-eval", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train, eval_rows = make_splits(args.num_train, args.num_eval, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, args.out_dir / TRAIN_FILE)
    write_jsonl(eval_rows, args.out_dir / EVAL_FILE)
    print(f"wrote {len(train)} train rows to {args.out_dir / TRAIN_FILE}")
    print(f"wrote {len(eval_rows)} eval rows to {args.out_dir / EVAL_FILE}")


if __name__ == "__main__":
    main()
