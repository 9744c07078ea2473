"""Write a small GSM8K-format dataset (`question`, `answer` ending in `#### N`) as Parquet: one- and two-step word
problems from templates, seeded, so the example needs no download. Usage:

    python deploy/examples/byo_hf/make_data.py deploy/examples/byo_hf   # writes train.parquet and test.parquet
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elif", "Femi", "Gus", "Hana", "Ivo", "June", "Kai", "Lena"]
THINGS = ["apples", "stickers", "marbles", "books", "coins", "shells", "pencils", "cards"]


def problem(rng: random.Random) -> dict[str, str]:
    """One problem: a start amount changed by one or two steps; the answer shows each step, then `#### total`."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    start = rng.randint(5, 60)
    steps = [("buys", rng.randint(2, 30))] if rng.random() < 0.5 else []
    steps.append(
        ("gives away", rng.randint(1, start)) if rng.random() < 0.5 else ("finds", rng.randint(2, 25))
    )
    text = [f"{name} has {start} {thing}."]
    work, total = [], start
    for verb, amount in steps:
        text.append(f"Then {name} {verb} {amount}.")
        new = total - amount if verb == "gives away" else total + amount
        work.append(f"{total} {'-' if verb == 'gives away' else '+'} {amount} = {new}.")
        total = new
    text.append(f"How many {thing} does {name} have now?")
    return {"question": " ".join(text), "answer": " ".join(work) + f"\n#### {total}"}


def make(train: int = 2000, test: int = 200, seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """Disjoint train and test splits (no question in both)."""
    rng, seen = random.Random(seed), set()
    rows: list[dict[str, str]] = []
    while len(rows) < train + test:
        row = problem(rng)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    return {"train": rows[:train], "test": rows[train:]}


def write(folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in make().items():
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}.parquet")


if __name__ == "__main__":
    write(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
