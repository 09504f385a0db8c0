"""Table 3: every evaluated checkpoint of a run or sweep folder, each next to the paper's matching row.

    python -m phi4_pron.report output/paper_r64                # one run
    python -m phi4_pron.report multirun/2026-11-22/10-00-00    # a whole sweep

Writes ``table3.md`` and ``table3.csv`` into the folder and prints the markdown. A row's paper counterpart is the
paper's row of the same setting (LoRA or Unfreeze) and epoch (epoch 0: no training). A row of a task whose prompts
contain the sentence (``task=joint``) is marked: its WER and PER are not comparable with the paper's.
Imports no torch.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
import sys
from pathlib import Path

from phi4_pron.paper import HEADERS, METRIC_COLUMNS, paper_row, paper_setting
from phi4_pron.results import SET_ASIDE, write_text_atomic

log = logging.getLogger(__name__)
_EPOCH = re.compile(r"checkpoint-epoch-(\d+)")
NOT_COMPARABLE = "WER/PER not comparable with the paper: the prompt contains the sentence"


def collect(root: Path, skipped: list[str] | None = None) -> list[dict]:
    """A row per ``eval/<checkpoint>/metrics.json`` below ``root`` (not in a run set aside as ``previous-*``); a file
    that cannot be read is left out, named in ``skipped`` (or a warning)."""
    rows = []
    for f in sorted(root.rglob("eval/*/metrics.json")):
        if any(p.startswith(SET_ASIDE) for p in f.relative_to(root).parts):
            continue
        try:
            m = json.loads(f.read_text())
            if not isinstance(m, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
            problem = f"{f}: {e}: left out (evaluate its checkpoint again to rewrite it)"
            (skipped.append if skipped is not None else log.warning)(problem)
            continue
        run_dir = f.parent.parent.parent
        epoch = m.get("epoch")
        if epoch is None and (e := _EPOCH.search(f.parent.name)):
            epoch = int(e.group(1))
        rows.append(
            {
                "run": str(run_dir.relative_to(root)) if run_dir != root else run_dir.name,
                "checkpoint": f.parent.name,
                "epoch": epoch,
                "task": m.get("task", "joint"),  # results written before tasks existed were the joint format
                "comparable": bool(m.get("comparable_with_paper", False)),
                "setting": paper_setting(bool(m.get("train_audio_encoder", False))),
                "n": m.get("n_utterances"),
                "unparseable": m.get("n_unparseable", 0) + m.get("n_failed", 0),
                **{c: m.get(c, math.nan) for c in METRIC_COLUMNS},
            }
        )
    return sorted(rows, key=lambda r: (r["run"], r["epoch"] if r["epoch"] is not None else 1e9, r["checkpoint"]))


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def table3(rows: list[dict]) -> str:
    """The markdown table: each row, then the paper's row for its setting and epoch."""
    lines = [
        "| run | checkpoint | task | setting | epoch | n | failed/unparseable | " + " | ".join(HEADERS) + " |",
        "|" + "---|" * (7 + len(HEADERS)),
    ]
    notes = set()
    for r in rows:
        mark = "" if r["comparable"] else " (*)"
        if mark:
            notes.add(NOT_COMPARABLE)
        epoch = "" if r["epoch"] is None else r["epoch"]
        lines.append(
            f"| {r['run']} | {r['checkpoint']} | {r['task']}{mark} | {r['setting']} | {epoch} | {r['n']} | "
            f"{r['unparseable']} | " + " | ".join(_fmt(r[c]) for c in METRIC_COLUMNS) + " |"
        )
        paper = paper_row(r["setting"], r["epoch"])
        if paper is not None:
            setting = "no training" if r["epoch"] == 0 else r["setting"]
            lines.append(
                f"| paper (Ahn & Nam) | | paper | {setting} | {epoch} | 2500 | | "
                + " | ".join(_fmt(paper[c]) for c in METRIC_COLUMNS)
                + " |"
            )
    md = "\n".join(lines) + "\n"
    if notes:
        md += "\n(*) " + "; ".join(sorted(notes)) + ".\n"
    return md


def write_table3(root: str | Path, rows: list[dict] | None = None) -> str:
    """Write ``table3.md`` / ``table3.csv`` of ``rows`` (default: :func:`collect` of ``root``) into ``root``; returns
    the markdown."""
    root = Path(root)
    rows = collect(root) if rows is None else rows
    md = table3(rows)
    buf = io.StringIO()
    fields = ["run", "checkpoint", "task", "comparable", "setting", "epoch", "n", "unparseable", *METRIC_COLUMNS]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for r in rows:
        writer.writerow(r)
        paper = paper_row(r["setting"], r["epoch"])
        if paper is not None:
            writer.writerow(
                {
                    "run": "paper",
                    "task": "paper",
                    "comparable": True,
                    "setting": r["setting"],
                    "epoch": r["epoch"],
                    "n": 2500,
                    **paper,
                }
            )
    write_text_atomic(root / "table3.md", md)
    write_text_atomic(root / "table3.csv", buf.getvalue())
    return md


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a run folder or a sweep folder")
    folder = parser.parse_args(argv).folder
    if not folder.is_dir():
        parser.error(f"{folder} is not a folder")
    skipped: list[str] = []
    rows = collect(folder, skipped)
    for problem in skipped:
        print(f"warning: {problem}", file=sys.stderr)
    if not rows:
        parser.error(
            f"{folder} holds no evaluated checkpoint (eval/<checkpoint>/metrics.json, in it or in the run folders "
            "below it): evaluate one first, python -m phi4_pron.evaluate run_dir=<run folder>"
        )
    print(write_table3(folder, rows), end="")


if __name__ == "__main__":
    main()
