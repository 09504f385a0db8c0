"""``report FOLDER --html``: one self-contained page (no network at view time: images inlined) with Table 3 and its
intervals, the paired comparisons, each metric against the epoch (a line per run, the paper's rows as points), the
count grids of each run's newest evaluation and the twenty answers farthest from the human scores. Imports no torch."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from phi4_pron.answer import SCORE_KEYS
from phi4_pron.paper import HEADERS, METRIC_COLUMNS, PAPER_TABLE3, paper_row
from phi4_pron.results import read_predictions, write_text_atomic
from phi4_pron.stats import METRICS
from phi4_pron.table3 import AGREEMENT_HEADERS, COLUMNS, cell, fmt, pooled_row, seed_groups

STYLE = """body{font:14px system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child,th:first-child{text-align:left}
tr.paper td{color:#777;font-style:italic}img{margin:4px}.sig{font-weight:bold}h2{margin-top:2em}"""
# marks the page as rendered once every image has decoded (checked by a headless browser)
SCRIPT = """window.addEventListener('load',()=>{const i=[...document.images];
document.body.dataset.imagesDecoded=i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length;});"""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return _img(buf.getvalue())


def _img(data: bytes, alt: str = "") -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        f'<tr class="{c}">' + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
        for row, c in zip(rows, classes or [""] * len(rows), strict=True)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def epoch_plots(rows: list[dict]) -> str:
    """Each Table 3 metric against the epoch: a line per run (its interval as error bars), the paper's as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(12, 9))
    runs = sorted({r["run"] for r in rows})
    for ax, column, title in zip(axes.flat, METRIC_COLUMNS, HEADERS, strict=True):
        for run in runs:
            points = sorted((r["epoch"], r) for r in rows if r["run"] == run and r["epoch"] is not None)
            if not points:
                continue
            x = [e for e, _ in points]
            y = [r[column] for _, r in points]
            ci = [r.get(f"{column}_ci") or [v, v] for (_, r), v in zip(points, y, strict=True)]
            err = [
                [max(0.0, v - (lo if lo is not None else v)) for v, (lo, _) in zip(y, ci, strict=True)],
                [max(0.0, (hi if hi is not None else v) - v) for v, (_, hi) in zip(y, ci, strict=True)],
            ]
            ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, label=run)
        for setting, marker in (("LoRA", "s"), ("Unfreeze", "^")):
            paper = sorted((e, row[column]) for (s, e), row in PAPER_TABLE3.items() if s == setting)
            ax.plot(*zip(*paper, strict=True), marker, color="grey", ms=5, ls=":", label=f"paper {setting}")
        ax.set(title=title, xlabel="epoch")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def farthest_answers(rows: list[dict], n: int = 20) -> list[list[str]]:
    """The ``n`` answers (of each run's newest evaluation) farthest from the human scores: the summed absolute
    difference over the aspects the answer scored."""
    newest = {}
    for r in rows:
        if r["run"] not in newest or (r["epoch"] or -1) >= (newest[r["run"]]["epoch"] or -1):
            newest[r["run"]] = r
    found = []
    for run, r in newest.items():
        for rec in read_predictions(Path(r["eval_dir"]) / "predictions.jsonl"):
            parsed = rec.get("parsed") or {}
            scored = [k for k in SCORE_KEYS if k in parsed]
            if scored:
                distance = sum(abs(parsed[k] - rec["reference"][k]) for k in scored)
                found.append((distance, run, r["checkpoint"], rec, parsed))
    found.sort(key=lambda f: -f[0])
    return [
        [
            run,
            ckpt,
            rec["id"],
            f"{d:.1f}",
            " ".join(f"{rec['reference'][k]:g}" for k in SCORE_KEYS),
            " ".join(fmt(parsed[k]) if k in parsed else "-" for k in SCORE_KEYS),
            rec["reference"]["text"],
            str(parsed.get("transcript", "")),
        ]
        for d, run, ckpt, rec, parsed in found[:n]
    ]


def write_report_html(folder: Path, rows: list[dict], comparisons: list[dict]) -> Path:
    body = [f"<h1>phi4-pron report: {html.escape(str(folder))}</h1>", "<h2>Table 3</h2>"]
    table_rows, classes = [], []
    for r in rows:
        table_rows.append(
            [
                r["run"],
                r["checkpoint"],
                r["setting"],
                r["epoch"],
                r["n"],
                r["unparseable"],
                *(cell(r, c) for c in COLUMNS),
            ]
        )
        classes.append("")
        if (paper := paper_row(r["setting"], r["epoch"])) is not None:
            table_rows.append(
                [
                    "paper (Ahn & Nam)",
                    "",
                    r["setting"],
                    r["epoch"],
                    2500,
                    "",
                    *(fmt(paper[c]) for c in METRIC_COLUMNS),
                    *[""] * (len(COLUMNS) - len(METRIC_COLUMNS)),
                ]
            )
            classes.append("paper")
    header = ["run", "checkpoint", "setting", "epoch", "n", "failed/unparseable", *HEADERS, *AGREEMENT_HEADERS]
    body.append(_table(header, table_rows, classes))
    body.append("<p>Intervals: 95%, bootstrap over the recordings.</p>")
    if groups := seed_groups(rows):
        body.append("<h2>Seeds: mean ± standard deviation</h2>")
        pooled = [(k, pooled_row(v)) for k, v in sorted(groups.items())]
        body.append(
            _table(
                ["configuration", "checkpoint", "seeds", *HEADERS],
                [
                    [c, ck, p["seeds"], *(f"{fmt(p[m])} ± {fmt(p[m + '_sd'])}" for m in METRIC_COLUMNS)]
                    for (c, ck), p in pooled
                ],
            )
        )
    if comparisons:
        body.append("<h2>Paired comparisons (B - A, paired bootstrap; bold: p &lt; 0.05)</h2>")
        for c in comparisons:
            body.append(f"<p>A: {html.escape(c['a'])}<br>B: {html.escape(c['b'])} ({c['n']} recordings)</p>")
            cells = [
                [
                    m,
                    fmt(c[m]["a"]),
                    fmt(c[m]["b"]),
                    fmt(c[m]["difference"]),
                    f"[{fmt(c[m]['ci'][0])}, {fmt(c[m]['ci'][1])}]",
                    f"{c[m]['p']:.3f}",
                ]
                for m in METRICS
            ]
            body.append(
                _table(
                    ["metric", "A", "B", "B - A", "95% interval", "p"],
                    cells,
                    ["sig" if c[m]["p"] < 0.05 else "" for m in METRICS],
                )
            )
    body += ["<h2>Each metric against the epoch</h2>", epoch_plots(rows), "<h2>Predicted against human scores</h2>"]
    newest = {}
    for r in rows:
        newest[r["run"]] = r
    for run, r in newest.items():
        body.append(f"<h3>{html.escape(run)}, {html.escape(r['checkpoint'])}</h3>")
        for k in SCORE_KEYS:
            grid = Path(r["eval_dir"]) / f"grid_{k}.png"
            if grid.exists():
                body.append(_img(grid.read_bytes(), f"{run} {k}"))
    body.append("<h2>The twenty answers farthest from the human scores</h2>")
    body.append(
        _table(
            [
                "run",
                "checkpoint",
                "utterance",
                "distance",
                "human acc flu pro tot",
                "predicted acc flu pro tot",
                "prompt text",
                "predicted transcript",
            ],
            farthest_answers(rows),
        )
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>phi4-pron report</title><style>{STYLE}</style>"
        f"<script>{SCRIPT}</script></head><body>{''.join(body)}</body></html>"
    )
    return write_text_atomic(folder / "report.html", page)
