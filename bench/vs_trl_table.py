"""bench/README.md's one table of aha against TRL, made from the workloads' last full runs of `bench/vs_trl.py`.

`vs_trl.py` (not `--quick`) keeps each workload's result in bench/results/vs_trl_<workload>.json, with the commit,
date, machine and command, and calls `write_readme`; a row is only ever rewritten by a new run of its workload.

    .venv/bin/python bench/vs_trl_table.py     # re-render the table from the kept results
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "bench" / "README.md"
BEGIN, END = "<!-- vs_trl table: bench/vs_trl_table.py writes it -->", "<!-- /vs_trl table -->"
GAIN = "0.10"
"""The held-out gain over the start at which time to accuracy is compared in the table (vs_trl's GAINS)."""


def row(workload: str, result: dict) -> dict:
    """One workload's table row from its kept result (`vs_trl.py`'s per-workload entry plus its `meta`)."""
    runs = result["runs"]
    paired = [r for r in runs if "ratio_aha_over_trl" in r]

    def median_of(side: str, key: str) -> float | None:
        values = [r[side]["steps"][key] for r in runs if key in r.get(side, {}).get("steps", {})]
        return round(statistics.median(values), 3) if values else None

    reached = None
    starts = [r["aha"]["eval"]["0"] for r in runs if "0" in r["aha"].get("eval", {})]
    if starts and "time_to_accuracy" in result:
        target = statistics.mean(starts) + float(GAIN)
        reached = next(
            (v for k, v in result["time_to_accuracy"].items() if abs(float(k) - round(target, 3)) < 5e-4),
            None,
        )
    gap = result.get("accuracy_gap", {}).get("after_0")
    return {
        "workload": workload,
        "seeds": len(paired),
        "aha_step_s": median_of("aha", "step_s"),
        "trl_step_s": median_of("trl", "step_s"),
        "ratio": result.get("ratio_aha_over_trl"),
        "time_to_accuracy_ratio": None if reached is None else reached.get("ratio_aha_over_trl"),
        "gap_points": None if gap is None else (round(100 * gap["mean"], 1), round(100 * gap["se"], 1)),
        "step_over_floor": median_of("aha", "step_over_floor"),
        "commit": result["meta"]["commit"],
        "date": result["meta"]["date"],
        "machine": result["meta"]["machine"],
    }


def _cell(value, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def render(rows: list[dict]) -> str:
    """The markdown table: one line per workload."""
    lines = [
        "| workload | seeds | aha s/step | TRL s/step | step ratio | time to start + 10 points, ratio "
        "| learning gap, points (aha - TRL) | aha step / its floor | commit, date, machine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = "-" if r["gap_points"] is None else f"{r['gap_points'][0]:+.1f} +- {r['gap_points'][1]:.1f}"
        lines.append(
            f"| {r['workload']} | {r['seeds']} | {_cell(r['aha_step_s'])} | {_cell(r['trl_step_s'])} "
            f"| {_cell(r['ratio'])} | {_cell(r['time_to_accuracy_ratio'])} | {gap} "
            f"| {_cell(r['step_over_floor'])} | {r['commit'][:7]}, {r['date']}, {r['machine']} |"
        )
    return "\n".join(lines)


def kept_rows(results: Path = RESULTS) -> list[dict]:
    paths = sorted(results.glob("vs_trl_*.json"))
    return [row(p.stem.removeprefix("vs_trl_"), json.loads(p.read_text())) for p in paths]


def replace_table(text: str, table: str) -> str:
    """`text` with the part between BEGIN and END replaced by `table`; a ValueError if the markers are missing."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"the markers {BEGIN!r} ... {END!r} are not in the file")
    return pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", text)


def write_readme(readme: Path = README, results: Path = RESULTS) -> str:
    table = render(kept_rows(results))
    readme.write_text(replace_table(readme.read_text(), table))
    return table


if __name__ == "__main__":
    print(write_readme())
    sys.exit(0)
