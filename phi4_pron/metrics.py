"""The paper's metrics, as pure functions.

- PCC: Pearson's r (scipy) between predicted and human utterance scores, per aspect. NaN (reported, not
  raised) when fewer than two pairs or either side is constant.
- WER: jiwer's corpus-level word error rate of the predicted transcript against the prompt text, both
  upper-cased with punctuation removed.
- PER: jiwer's error rate over phone tokens of the predicted pronounced phones against the reference
  pronounced phones. Stress digits do not count (both sides are stripped of them: 39 ARPAbet phones).
- Mispronunciation detection (MDD) over canonical phones: truth = the phone is in the corpus's
  ``mispronunciations``; prediction = the model's pronounced phone, aligned to the canonical sequence by edit
  distance (jiwer's alignment), is a different phone or is missing. Precision, recall and F1 of the
  "mispronounced" class, counted over all canonical phones of all utterances.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jiwer
from scipy.stats import pearsonr

from phi4_pron.answer import strip_stress

_PUNCT = re.compile(r"[^\w\s']")


def pcc(predicted: Sequence[float], human: Sequence[float]) -> float:
    """Pearson correlation; NaN when it is undefined (n < 2 or a constant side)."""
    if len(predicted) != len(human):
        raise ValueError(f"{len(predicted)} predictions for {len(human)} human scores")
    if len(predicted) < 2 or len(set(predicted)) < 2 or len(set(human)) < 2:
        return math.nan
    return float(pearsonr(predicted, human).statistic)


def normalise_text(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.upper()).split())


def _error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    refs = list(references)
    if not refs or not any(refs):
        return math.nan
    # jiwer refuses empty references; an empty hypothesis is fine (all deletions).
    pairs = [(r, h) for r, h in zip(refs, hypotheses, strict=True) if r]
    out = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
    return float(out.wer)


def edit_counts(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference tokens) of one pair of normalised strings: the terms a
    corpus error rate sums (an empty reference counts in neither)."""
    n = len(reference.split())
    if not n:
        return 0, 0
    if not hypothesis.strip():
        return n, n
    out = jiwer.process_words(reference, hypothesis)
    return out.substitutions + out.deletions + out.insertions, n


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER over normalised text (case and punctuation ignored)."""
    return _error_rate([normalise_text(r) for r in references], [normalise_text(h) for h in hypotheses])


def phone_string(phones: str | Sequence[str]) -> str:
    tokens = phones.split() if isinstance(phones, str) else list(phones)
    return " ".join(strip_stress(p.upper()) if p.lower() != "<unk>" else "<unk>" for p in tokens)


def per(references: Sequence[str | Sequence[str]], hypotheses: Sequence[str | Sequence[str]]) -> float:
    """Corpus phone error rate, stress digits ignored."""
    return _error_rate([phone_string(r) for r in references], [phone_string(h) for h in hypotheses])


def detected_mispronunciations(canonical: Sequence[str], pronounced: str | Sequence[str]) -> list[bool]:
    """Per canonical phone: does the aligned pronounced phone differ (substituted or deleted)?"""
    ref = phone_string(canonical)
    hyp = phone_string(pronounced)
    if not ref:
        return []
    if not hyp:
        return [True] * len(ref.split())
    flags = [False] * len(ref.split())
    for chunk in jiwer.process_words(ref, hyp).alignments[0]:
        if chunk.type in ("substitute", "delete"):
            for i in range(chunk.ref_start_idx, chunk.ref_end_idx):
                flags[i] = True
    return flags


def mdd_scores(truth: Sequence[Sequence[bool]], predicted: Sequence[Sequence[bool]]) -> dict[str, float]:
    """Precision, recall and F1 of detecting mispronounced canonical phones, pooled over utterances."""
    tp = fp = fn = 0
    for t_utt, p_utt in zip(truth, predicted, strict=True):
        for t, p in zip(t_utt, p_utt, strict=True):
            tp += t and p
            fp += p and not t
            fn += t and not p
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    f1 = 2 * precision * recall / (precision + recall) if tp else (0.0 if tp + fp + fn else math.nan)
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}
