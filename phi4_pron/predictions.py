"""Generate answers for a split, score them with the paper's metrics, and write the results.

An utterance whose audio cannot be decoded or whose generation fails is recorded with its error and
counted; it never stops the evaluation. An answer that cannot be parsed is counted too, and enters the
metrics as the empty answer: left out of PCC, an empty transcript / phone string for WER and PER (all
deletions), every canonical phone "mispronounced" for MDD.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from phi4_pron.answer import (
    SCORE_KEYS,
    Question,
    canonical_phones,
    join_answers,
    join_parsed,
    mispronounced_flags,
    pronounced_phones,
)
from phi4_pron.audio_cache import AUDIO_SPAN, shared_audio_table
from phi4_pron.data import expand_questions, with_lengths
from phi4_pron.fast.generation import static_cache_len
from phi4_pron.inference import generate_answers, generate_from_batch, generation_collator
from phi4_pron.metrics import detected_mispronunciations, mdd_scores, pcc, per, wer
from phi4_pron.paper import HEADLINE
from phi4_pron.results import json_line, read_predictions, write_json_atomic, write_text_atomic
from phi4_pron.stats import intervals, point_values, recordings

log = logging.getLogger(__name__)

__all__ = ["HEADLINE", "evaluate_model", "generate_records", "read_predictions", "reparse", "score", "write_results"]


def reference(row: dict[str, Any]) -> dict[str, Any]:
    """What an answer is scored against, from one corpus row."""
    return {
        **{k: float(row[k]) for k in SCORE_KEYS},
        "text": row["text"],
        "phones": " ".join(pronounced_phones(row["words"])),
        "canonical": canonical_phones(row["words"]),
        "mispronounced": mispronounced_flags(row["words"]),
    }


class _CollateOrError:
    """Runs in DataLoader workers: (the rows without their audio, the batch or the exception collating raised)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, rows):
        meta = [{k: v for k, v in r.items() if k != "audio"} for r in rows]
        try:
            return meta, self.collator(rows)
        except Exception as e:  # noqa: BLE001 - the main process retries the batch row by row
            return meta, e


def generate_records(
    model,
    tokenizer,
    feature_extractor,
    questions: dict[str, Question],
    dataset,
    *,
    batch_size: int,
    max_new_tokens: int,
    progress: bool = True,
    num_workers: int = 0,
    compiled: bool = False,
    resamples: int = 0,
) -> list[dict[str, Any]]:
    """One record per recording, in the dataset's order: id, raw answers (question -> text), the answers parsed and
    joined into one dict of fields (None if none parses), reference, error (None, or why a question failed).

    Every question of every recording is one prompt. Prompts are batched question by question, longest first
    (token counts from the recordings' headers), so a batch carries little padding and stops at its question's
    answer budget (:meth:`Question.answer_budget`: an APA batch after a few dozen tokens). Each recording's audio
    embeddings are computed once, before the first prompt, for all its questions
    (:func:`audio_cache.shared_audio_table`; where a recording cannot be read, every prompt reads its own audio).
    ``num_workers`` DataLoader processes collate the next batches while the GPU generates.
    ``compiled``: a static cache and compiled decoding steps (:func:`inference.generate_from_batch`), compiled once:
    every batch has one cache length (the longest prompt's and its answer's) and one batch size (a question's last
    batch filled up with repeats), so all share one cache where the caller reuses it
    (:func:`phi4_pron.fast.generation.fast_generation`).
    """
    names = list(questions)
    n = len(dataset)
    prompts = expand_questions(dataset, names)  # prompt j asks question names[j // n] about recording j % n
    collator = generation_collator(tokenizer, feature_extractor, questions)
    # token counts with the audio placeholders from each recording's header (an unreadable one counts none: its
    # batch fails and is retried prompt by prompt, where it is recorded as failed)
    # (a list: sorting by a datasets Column's items takes seconds)
    prompts = with_lengths(prompts, collator.num_tokens, unreadable_seconds=0.0)
    length = list(prompts["length"])
    budget = [questions[names[j // n]].answer_budget(max_new_tokens) for j in range(len(prompts))]
    batches = []  # question by question, longest prompts first
    for k in range(len(names)):
        order = sorted(range(k * n, (k + 1) * n), key=length.__getitem__, reverse=True)
        batches += [order[i : i + batch_size] for i in range(0, n, batch_size)]
        if compiled and n:
            batches[-1] += batches[-1][:1] * (batch_size - len(batches[-1]))
    # one static cache for all: the longest prompt (8 more: a header's duration may differ a little from the decoded
    # one) + its answer
    longest = max((collator.padded_length(length[b[0]] + 8) + budget[b[0]] for b in batches), default=0)
    cache_len = static_cache_len(longest) if compiled else None
    table = shared_audio_table(model, prompts.select(range(n)), collator, batch_size, num_workers) if n else None
    if table is not None:  # every question's prompts read their audio embeddings from it: no audio in the loader
        table, spans = table
        loaded = prompts.remove_columns("audio").add_column(AUDIO_SPAN, [spans[j % n] for j in range(len(prompts))])
        loaded_collator = dataclasses.replace(collator, audio_from_table=True)
    else:
        loaded, loaded_collator = prompts, collator
    loader = DataLoader(
        loaded,
        batch_sampler=batches,
        collate_fn=_CollateOrError(loaded_collator),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    answers: list[str | Exception | None] = [None] * len(prompts)
    meta: list[dict[str, Any] | None] = [None] * n
    bar = tqdm(total=len(prompts), desc="evaluating", unit="prompt", disable=not progress)
    try:
        for indices, (rows, batch) in zip(batches, loader, strict=True):
            try:
                if isinstance(batch, Exception):
                    raise batch
                out: list[str | Exception] = generate_from_batch(
                    model, tokenizer, batch, [budget[j] for j in indices], cache_len, table
                )
            except Exception:  # find the culprit(s): retry one by one, reading the rows (audio too) again
                out = []
                for j in indices:
                    row = prompts[j]
                    try:
                        out += generate_answers(model, tokenizer, feature_extractor, questions, [row], max_new_tokens)
                    except Exception as e:
                        log.warning("utterance %s (%s) failed: %s", row["id"], row["question"], e)
                        out.append(e)
            for j, row, answer in zip(indices, rows, out, strict=True):
                answers[j] = answer
                meta[j % n] = row
            bar.update(len(set(indices)))
    finally:
        bar.close()
    return [_record(meta[i], {q: answers[k * n + i] for k, q in enumerate(names)}, questions) for i in range(n)]


def _record(row: dict[str, Any], answers: dict[str, str | Exception], questions: dict[str, Question]) -> dict:
    raw, parsed, error = join_answers(answers, questions)
    return {"id": row["id"], "raw": raw, "parsed": parsed, "error": error, "reference": reference(row)}


def reparse(records: list[dict[str, Any]], questions: dict[str, Question]) -> list[dict[str, Any]]:
    """Parse saved raw answers again (re-scoring needs no model). A raw answer saved as one string (the format before
    tasks) is read by the task's only question."""
    out = []
    for r in records:
        raw = r.get("raw")
        if isinstance(raw, str):
            if len(questions) != 1:
                raise ValueError(f"record {r.get('id')}: one raw answer, but the task asks {list(questions)}")
            raw = {next(iter(questions)): raw}
        unknown = set(raw or {}) - set(questions)
        if unknown:
            raise ValueError(f"record {r.get('id')}: answers to {sorted(unknown)}, which the task does not ask")
        failed = raw is None or any(v is None for v in raw.values())
        parsed = None if failed else join_parsed({q: questions[q].parse(v) for q, v in raw.items()})
        out.append({**r, "raw": raw, "parsed": parsed})
    return out


def score(records: list[dict[str, Any]], resamples: int = 0, seed: int = 0) -> dict[str, Any]:
    """The paper's metrics over a list of records, with the failure counts; SCC, MSE and PCC's p-value of each aspect;
    with ``resamples`` a 95% bootstrap interval of every metric (``{metric}_ci``, :mod:`phi4_pron.stats`)."""
    answered = [r for r in records if r.get("error") is None]
    metrics: dict[str, Any] = {
        "n_utterances": len(records),
        "n_failed": len(records) - len(answered),
        "n_unparseable": sum(r["parsed"] is None for r in answered),
    }
    parsed = [(r["parsed"] or {}, r["reference"]) for r in answered]
    for k in SCORE_KEYS:
        pairs = [(p[k], ref[k]) for p, ref in parsed if k in p]
        metrics[f"pcc_{k}"] = pcc([a for a, _ in pairs], [b for _, b in pairs])
        metrics[f"n_{k}"] = len(pairs)
    metrics["wer"] = wer([ref["text"] for _, ref in parsed], [p.get("transcript", "") for p, _ in parsed])
    metrics["per"] = per([ref["phones"] for _, ref in parsed], [p.get("phones", "") for p, _ in parsed])
    mdd = mdd_scores(
        [ref["mispronounced"] for _, ref in parsed],
        [detected_mispronunciations(ref["canonical"], p.get("phones", "")) for p, ref in parsed],
    )
    metrics.update({f"mdd_{k}": v for k, v in mdd.items()})
    per_recording = recordings(records)  # what the metrics pool, once for both
    metrics.update(point_values(per_recording))
    metrics.update(intervals(per_recording, resamples, seed))
    metrics["bootstrap_resamples"] = resamples if len(records) >= 2 else 0
    return metrics


def count_grid(records: list[dict[str, Any]], aspect: str) -> np.ndarray:
    """Recordings per (human, predicted) score, both rounded to 0-10: ``grid[human, predicted]``."""
    grid = np.zeros((11, 11), dtype=int)
    for r in records:
        if r.get("parsed") and aspect in r["parsed"]:
            grid[round(r["reference"][aspect]), round(r["parsed"][aspect])] += 1
    return grid


def grid_plots(records: list[dict[str, Any]], metrics: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Predicted vs human score as a count grid (cell colour and number: recordings), one PNG per aspect: integer
    scores of thousands of recordings fall on at most 121 cells, which a scatter plot overprints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    for k in SCORE_KEYS:
        grid = count_grid(records, k)
        fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=100)
        ax.imshow(grid.T, origin="lower", cmap="Blues", extent=(-0.5, 10.5, -0.5, 10.5))
        for h, p in zip(*np.nonzero(grid), strict=True):
            dark = grid[h, p] > grid.max() / 2
            ax.text(h, p, str(grid[h, p]), ha="center", va="center", fontsize=6, color="white" if dark else "black")
        ax.plot([-0.5, 10.5], [-0.5, 10.5], color="grey", lw=0.6)
        pcc_, scc_ = (metrics.get(f"{m}_{k}", math.nan) for m in ("pcc", "scc"))
        ax.set(
            xticks=range(11),
            yticks=range(11),
            xlabel=f"human {k}",
            ylabel=f"predicted {k}",
            title=f"{k}: PCC {_fmt(pcc_)}, SCC {_fmt(scc_)} (n={grid.sum()})",
        )
        fig.tight_layout()
        tmp = out_dir / f".grid_{k}.png.tmp"
        fig.savefig(tmp, format="png")
        plt.close(fig)
        paths[k] = tmp.replace(out_dir / f"grid_{k}.png")
    return paths


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.3f}"


def write_results(
    out_dir: Path, records: list[dict[str, Any]], metrics: dict[str, Any], info: dict[str, Any] | None = None
) -> dict[str, Path]:
    """``predictions.jsonl``, ``metrics.json`` and the count grids, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "predictions.jsonl", "".join(map(json_line, records)))
    write_json_atomic(out_dir / "metrics.json", {**(info or {}), **metrics})
    return grid_plots(records, metrics, out_dir)


def evaluate_model(
    model,
    tokenizer,
    feature_extractor,
    questions: dict[str, Question],
    dataset,
    out_dir: Path,
    *,
    batch_size: int,
    max_new_tokens: int,
    info: dict[str, Any] | None = None,
    num_workers: int = 0,
    compiled: bool = False,
    resamples: int = 0,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Generate, score and write one evaluation; returns the metrics and the plot files."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        records = generate_records(
            model,
            tokenizer,
            feature_extractor,
            questions,
            dataset,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            num_workers=num_workers,
            compiled=compiled,
        )
    finally:
        model.train(was_training)
    generated = time.perf_counter()
    metrics = score(records, resamples)
    seconds = {"generate": generated - start, "score": time.perf_counter() - generated}  # compile included
    plots = write_results(out_dir, records, metrics, {**(info or {}), "seconds": seconds})
    log.info("%s: %s", out_dir, {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return metrics, plots
