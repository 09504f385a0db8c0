"""Table 3: every evaluated checkpoint below a folder, each next to the paper's matching row, with its 95% intervals,
SCC and MSE; runs that differ only in their seed pooled (mean ± standard deviation). ``table3.md`` / ``table3.csv``
are written into the folder. A row's paper counterpart is the paper's row of the same setting (LoRA or Unfreeze) and
epoch (epoch 0: no training). A row of a task whose prompts contain the sentence (``task=joint``) is marked: its WER
and PER are not comparable with the paper's. Imports no torch.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import statistics
from pathlib import Path

from phi4_pron.paper import AGREEMENT_COLUMNS, HEADERS, METRIC_COLUMNS, paper_row, paper_setting
from phi4_pron.results import SET_ASIDE, write_text_atomic

log = logging.getLogger(__name__)
_EPOCH = re.compile(r"checkpoint-epoch-(\d+)")
_SEED = re.compile(r",?seed=\d+")
NOT_COMPARABLE = "WER/PER not comparable with the paper: the prompt contains the sentence"
COLUMNS = [*METRIC_COLUMNS, *AGREEMENT_COLUMNS]
AGREEMENT_HEADERS = [f"{m} {k[:3]}" for m in ("SCC", "MSE") for k in ("accuracy", "fluency", "prosodic", "total")]


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
                **{c: _number(m.get(c)) for c in COLUMNS},
                **{f"{c}_ci": m.get(f"{c}_ci") for c in COLUMNS if m.get(f"{c}_ci")},
                "eval_dir": str(f.parent),
            }
        )
    return sorted(rows, key=lambda r: (r["run"], r["epoch"] if r["epoch"] is not None else 1e9, r["checkpoint"]))


def _number(v) -> float:
    return math.nan if v is None else v


def fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def cell(row: dict, column: str) -> str:
    """The value, with its 95% interval where the evaluation has one: ``0.675 [0.650, 0.700]``."""
    ci = row.get(f"{column}_ci")
    if not ci or None in ci:
        return fmt(row[column])
    return f"{fmt(row[column])} [{fmt(ci[0])}, {fmt(ci[1])}]"


def table3(rows: list[dict]) -> str:
    """The markdown table: each row (with intervals, then SCC and MSE), then the paper's row for its setting and
    epoch; then the runs that differ only in their seed, pooled."""
    lines = [
        "| run | checkpoint | task | setting | epoch | n | failed/unparseable | "
        + " | ".join([*HEADERS, *AGREEMENT_HEADERS])
        + " |",
        "|" + "---|" * (7 + len(COLUMNS)),
    ]
    notes = set()
    for r in rows:
        mark = "" if r["comparable"] else " (*)"
        if mark:
            notes.add(NOT_COMPARABLE)
        epoch = "" if r["epoch"] is None else r["epoch"]
        lines.append(
            f"| {r['run']} | {r['checkpoint']} | {r['task']}{mark} | {r['setting']} | {epoch} | {r['n']} | "
            f"{r['unparseable']} | " + " | ".join(cell(r, c) for c in COLUMNS) + " |"
        )
        paper = paper_row(r["setting"], r["epoch"])
        if paper is not None:
            setting = "no training" if r["epoch"] == 0 else r["setting"]
            lines.append(
                f"| paper (Ahn & Nam) | | paper | {setting} | {epoch} | 2500 | | "
                + " | ".join(fmt(paper[c]) for c in METRIC_COLUMNS)
                + " |" * (1 + len(AGREEMENT_COLUMNS))
            )
    md = "\n".join(lines) + "\n"
    if notes:
        md += "\n(*) " + "; ".join(sorted(notes)) + ".\n"
    if pooled := seed_groups(rows):
        md += "\n" + seeds_table(pooled)
    md += "\nIntervals: 95%, bootstrap over the recordings (eval.bootstrap resamples).\n" if _has_ci(rows) else ""
    return md


def _has_ci(rows: list[dict]) -> bool:
    return any(k.endswith("_ci") for r in rows for k in r)


def seed_groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows of runs whose folder names differ only in ``seed=N`` (a ``seed=1,2,3`` sweep), by (configuration,
    checkpoint); only groups of two runs or more."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if _SEED.search(r["run"]):
            groups.setdefault((_SEED.sub("", r["run"]), r["checkpoint"]), []).append(r)
    return {k: v for k, v in groups.items() if len(v) > 1}


def pooled_row(rows: list[dict]) -> dict:
    """Mean and standard deviation of each metric over the seeds (the way GOPT and MultiPA report five seeds)."""
    out = {"seeds": len(rows), "epoch": rows[0]["epoch"], "setting": rows[0]["setting"]}
    for c in COLUMNS:
        values = [r[c] for r in rows if not math.isnan(r[c])]
        out[c] = statistics.fmean(values) if values else math.nan
        out[f"{c}_sd"] = statistics.stdev(values) if len(values) > 1 else math.nan
    return out


def seeds_table(groups: dict[tuple[str, str], list[dict]]) -> str:
    lines = [
        "Runs that differ only in their seed: mean ± standard deviation over the seeds\n",
        "| configuration | checkpoint | seeds | " + " | ".join(HEADERS) + " |",
        "|" + "---|" * (3 + len(HEADERS)),
    ]
    for (config, checkpoint), rows in sorted(groups.items()):
        p = pooled_row(rows)
        cells = [f"{fmt(p[c])} ± {fmt(p[f'{c}_sd'])}" for c in METRIC_COLUMNS]
        lines.append(f"| {config} | {checkpoint} | {p['seeds']} | " + " | ".join(cells) + " |")
        if (paper := paper_row(p["setting"], p["epoch"])) is not None:
            lines.append("| paper (Ahn & Nam) | | | " + " | ".join(fmt(paper[c]) for c in METRIC_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_table3(root: str | Path, rows: list[dict] | None = None) -> str:
    """Write ``table3.md`` / ``table3.csv`` of ``rows`` (default: :func:`collect` of ``root``) into ``root``; returns
    the markdown."""
    root = Path(root)
    rows = collect(root) if rows is None else rows
    md = table3(rows)
    buf = io.StringIO()
    intervals = [f"{c}_{end}" for c in COLUMNS for end in ("lo", "hi")]
    fields = ["run", "checkpoint", "task", "comparable", "setting", "epoch", "n", "unparseable", *COLUMNS, *intervals]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        ci = {f"{c}_{end}": v for c in COLUMNS for end, v in zip(("lo", "hi"), r.get(f"{c}_ci") or (), strict=False)}
        writer.writerow({**r, **ci})
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
