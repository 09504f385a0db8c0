"""Table 3: every evaluated checkpoint of a run or sweep folder, each next to the paper's matching row, with 95%
intervals; runs that differ only in their seed pooled; paired significance tests between evaluations.

    python -m phi4_pron.report output/paper_r64                # one run
    python -m phi4_pron.report multirun/2026-11-22/10-00-00    # a whole sweep (--compare: every pair of runs)
    python -m phi4_pron.report output/paper_r64 output/pretrained_r320     # two runs (or eval folders) compared
    python -m phi4_pron.report multirun/... --html             # report.html, one self-contained page

Writes ``table3.md`` and ``table3.csv`` into the folder and prints the markdown. A row's paper counterpart is the
paper's row of the same setting (LoRA or Unfreeze) and epoch (epoch 0: no training). A row of a task whose prompts
contain the sentence (``task=joint``) is marked: its WER and PER are not comparable with the paper's.
Imports no torch.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

from phi4_pron.results import read_predictions
from phi4_pron.table3 import collect, fmt, write_table3


def evaluations(path: Path) -> dict[str, Path]:
    """An evaluation folder (``eval/<checkpoint>/``, holding predictions.jsonl) as ``{its name: it}``, or a run
    folder's evaluations by checkpoint."""
    if (path / "predictions.jsonl").exists():
        return {path.name: path}
    return {d.name: d for d in sorted((path / "eval").glob("*")) if (d / "predictions.jsonl").exists()}


def compare(a: Path, b: Path, resamples: int = 1000, seed: int = 0) -> list[dict]:
    """Paired tests of B against A at every checkpoint both evaluated (or the two evaluation folders given)."""
    from phi4_pron.stats import paired_difference

    ea, eb = evaluations(a), evaluations(b)
    if len(ea) == len(eb) == 1:  # two evaluation folders (or runs with one each): whatever their checkpoints' names
        pairs = [(*ea.values(), *eb.values())]
    else:
        pairs = [(ea[k], eb[k]) for k in ea if k in eb]
    if not pairs:
        raise ValueError(f"{a} and {b} have no evaluated checkpoint in common (eval/<checkpoint>/predictions.jsonl)")
    return [
        {
            "a": str(x),
            "b": str(y),
            **paired_difference(
                read_predictions(x / "predictions.jsonl"), read_predictions(y / "predictions.jsonl"), resamples, seed
            ),
        }
        for x, y in pairs
    ]


def sweep_pairs(rows: list[dict]) -> list[tuple[Path, Path]]:
    """Every pair of runs evaluated at the same checkpoint."""
    by_checkpoint: dict[str, list[Path]] = {}
    for r in rows:
        by_checkpoint.setdefault(r["checkpoint"], []).append(Path(r["eval_dir"]))
    return [pair for dirs in by_checkpoint.values() for pair in itertools.combinations(dirs, 2)]


def newest_pairs(rows: list[dict]) -> list[tuple[Path, Path]]:
    """Every pair of runs at the newest checkpoint both evaluated (by epoch)."""
    runs: dict[str, dict[str, dict]] = {}
    for r in rows:
        runs.setdefault(r["run"], {})[r["checkpoint"]] = r
    pairs = []
    for a, b in itertools.combinations(sorted(runs), 2):
        common = [runs[a][c] for c in runs[a] if c in runs[b]]
        if common:
            newest = max(common, key=lambda r: (r["epoch"] if r["epoch"] is not None else 1e9, r["checkpoint"]))
            pairs.append((Path(newest["eval_dir"]), Path(runs[b][newest["checkpoint"]]["eval_dir"])))
    return pairs


def pairs_summary(results: list[dict], root: Path) -> str:
    """One line per comparison: B - A of the headline metrics with p (``*``: p < 0.05)."""
    from phi4_pron.paper import HEADERS, METRIC_COLUMNS

    lines = [
        "Paired tests, each pair of runs at its newest common checkpoint: B - A (p); * p < 0.05 (--compare: in full)\n",
        "| A | B | checkpoint | n | " + " | ".join(HEADERS) + " |",
        "|" + "---|" * (4 + len(HEADERS)),
    ]
    for r in results:
        a, b = Path(r["a"]), Path(r["b"])
        cells = [
            "n/a"
            if math.isnan(r[m]["p"])
            else f"{fmt(r[m]['difference'])} ({r[m]['p']:.2f}){' *' * (r[m]['p'] < 0.05)}"
            for m in METRIC_COLUMNS
        ]
        names = [
            str(p.parent.parent.relative_to(root)) if p.parent.parent != root else p.parent.parent.name for p in (a, b)
        ]
        lines.append(f"| {names[0]} | {names[1]} | {a.name} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_table(result: dict) -> str:
    from phi4_pron.stats import METRICS

    lines = [
        f"B - A on {result['n']} recordings (paired bootstrap; * p < 0.05)\n  A: {result['a']}\n  B: {result['b']}\n",
        "| metric | A | B | B - A | 95% interval | p |",
        "|---|---|---|---|---|---|",
    ]
    for m in METRICS:
        d = result[m]
        star = " *" if d["p"] < 0.05 else ""
        lines.append(
            f"| {m} | {fmt(d['a'])} | {fmt(d['b'])} | {fmt(d['difference'])}{star} | "
            f"[{fmt(d['ci'][0])}, {fmt(d['ci'][1])}] | {d['p']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", type=Path, nargs="+", help="a run or sweep folder; or two runs/evaluations (A B)")
    parser.add_argument("--compare", action="store_true", help="paired tests of every two runs at each checkpoint")
    parser.add_argument("--html", action="store_true", help="write report.html into the folder")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the paired tests")
    args = parser.parse_args(argv)
    for folder in args.folders:
        if not folder.is_dir():
            parser.error(f"{folder} is not a folder")
    if len(args.folders) == 2:
        for result in compare(*args.folders, resamples=args.resamples):
            print(comparison_table(result))
        return
    if len(args.folders) > 2:
        parser.error("give one folder (a run or a sweep), or two to compare")
    folder = args.folders[0]
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
    comparisons = []
    if args.compare or args.html:
        comparisons = [c for x, y in sweep_pairs(rows) for c in compare(x, y, resamples=args.resamples)]
    if args.compare:
        for result in comparisons:
            print("\n" + comparison_table(result), end="")
    elif pairs := newest_pairs(rows):
        print("\n" + pairs_summary([c for x, y in pairs for c in compare(x, y, resamples=args.resamples)], folder))
    if args.html:
        from phi4_pron.report_html import write_report_html

        print(f"\nwrote {write_report_html(folder, rows, comparisons)}")


if __name__ == "__main__":
    main()
