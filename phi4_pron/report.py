"""Table 3: every evaluated checkpoint of a run or sweep folder next to the paper's row.

    python -m phi4_pron.report output/paper_r64          # one run
    python -m phi4_pron.report multirun/2026-11-22/10-00-00   # a whole sweep

Writes ``table3.md`` and ``table3.csv`` into the folder and prints the markdown.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
from pathlib import Path

from phi4_pron.evaluation import PAPER_ROW
from phi4_pron.io import write_text_atomic

COLUMNS = ["pcc_accuracy", "pcc_fluency", "pcc_prosodic", "pcc_total", "wer", "per", "mdd_f1"]
HEADERS = ["PCC acc", "PCC flu", "PCC pro", "PCC tot", "WER", "PER", "F1"]
_EPOCH = re.compile(r"checkpoint-epoch-(\d+)")


def collect(root: Path) -> list[dict]:
    rows = []
    for f in sorted(root.rglob("eval/*/metrics.json")):
        m = json.loads(f.read_text())
        run_dir = f.parent.parent.parent
        epoch = m.get("epoch") or (int(e.group(1)) if (e := _EPOCH.search(f.parent.name)) else None)
        rows.append(
            {
                "run": str(run_dir.relative_to(root)) if run_dir != root else run_dir.name,
                "checkpoint": f.parent.name,
                "epoch": epoch,
                "n": m.get("n_utterances"),
                "unparseable": m.get("n_unparseable", 0) + m.get("n_failed", 0),
                **{c: m.get(c, math.nan) for c in COLUMNS},
            }
        )
    return rows


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def write_table3(root: str | Path) -> str:
    """Write ``table3.md`` / ``table3.csv`` into ``root``; returns the markdown."""
    root = Path(root)
    rows = collect(root)
    lines = [
        "| run | checkpoint | epoch | n | failed/unparseable | " + " | ".join(HEADERS) + " |",
        "|" + "---|" * (5 + len(HEADERS)),
    ]
    lines.append(
        "| paper (Ahn & Nam, LoRA only) | | 3 | 2500 | | " + " | ".join(_fmt(PAPER_ROW[c]) for c in COLUMNS) + " |"
    )
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['checkpoint']} | {r['epoch'] or ''} | {r['n']} | {r['unparseable']} | "
            + " | ".join(_fmt(r[c]) for c in COLUMNS)
            + " |"
        )
    md = "\n".join(lines) + "\n"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["run", "checkpoint", "epoch", "n", "unparseable", *COLUMNS])
    writer.writeheader()
    writer.writerow({"run": "paper", "epoch": 3, "n": 2500, **PAPER_ROW})
    writer.writerows(rows)
    write_text_atomic(root / "table3.md", md)
    write_text_atomic(root / "table3.csv", buf.getvalue())
    return md


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a run folder or a sweep folder")
    folder = parser.parse_args(argv).folder
    if not folder.is_dir():
        parser.error(f"{folder} is not a folder")
    print(write_table3(folder), end="")


if __name__ == "__main__":
    main()
