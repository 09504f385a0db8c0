"""How sure a metric is, and whether two evaluations differ: the paper's metrics recomputed from per-recording
quantities, so that resampling recordings is cheap.

- ``intervals``: a 95% interval for every metric by bootstrap over recordings (``scipy.stats.bootstrap``'s resamples,
  seeded; the percentile interval of those where the metric is defined).
- ``paired_difference``: two evaluations of the same recordings, resampled together (paired bootstrap): the
  difference B - A of each metric, its interval and a two-sided p-value (twice the share of resampled differences on
  the other side of 0).
- ``pcc_pvalue``, SCC and MSE beside each PCC (``scipy.stats.pearsonr`` / ``spearmanr``).

Corpus-level rates stay corpus-level in every resample: WER and PER are the resample's summed errors over its summed
reference length, MDD precision/recall/F1 its summed counts. A failed recording counts in no metric, as in ``score``.
Imports no torch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import DegenerateDataWarning, bootstrap, pearsonr, rankdata

from phi4_pron.answer import SCORE_KEYS
from phi4_pron.metrics import detected_mispronunciations, edit_counts, mdd_scores, normalise_text, phone_string

LEVEL = 0.95
RATES = ("wer", "per", "mdd_precision", "mdd_recall", "mdd_f1")
METRICS = [*(f"{m}_{k}" for k in SCORE_KEYS for m in ("pcc", "scc", "mse")), *RATES]
LOWER_IS_BETTER = {"wer", "per", *(f"mse_{k}" for k in SCORE_KEYS)}


@dataclass
class Recordings:
    """One value per recording of what the metrics pool (NaN: the answer gave no such score)."""

    ids: list[str]
    predicted: dict[str, np.ndarray]
    human: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]  # word/phone errors and reference lengths, MDD tp/fp/fn; 0 for a failed recording


def recordings(records: list[dict[str, Any]]) -> Recordings:
    n = len(records)
    predicted = {k: np.full(n, np.nan) for k in SCORE_KEYS}
    human = {k: np.full(n, np.nan) for k in SCORE_KEYS}
    counts = {c: np.zeros(n) for c in ("word_errors", "words", "phone_errors", "phones", "tp", "fp", "fn")}
    for i, r in enumerate(records):
        if r.get("error") is not None:
            continue
        parsed, ref = r["parsed"] or {}, r["reference"]
        for k in SCORE_KEYS:
            human[k][i] = ref[k]
            if k in parsed:
                predicted[k][i] = parsed[k]
        counts["word_errors"][i], counts["words"][i] = edit_counts(
            normalise_text(ref["text"]), normalise_text(parsed.get("transcript", ""))
        )
        counts["phone_errors"][i], counts["phones"][i] = edit_counts(
            phone_string(ref["phones"]), phone_string(parsed.get("phones", ""))
        )
        mdd = mdd_scores(
            [ref["mispronounced"]], [detected_mispronunciations(ref["canonical"], parsed.get("phones", ""))]
        )
        for c in ("tp", "fp", "fn"):
            counts[c][i] = mdd[c]
    return Recordings([r.get("id") for r in records], predicted, human, counts)


def _pearson(x: np.ndarray, y: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Pearson's r along the last axis over the ``present`` entries (NaN where undefined)."""
    n = present.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        dx = np.where(present, x - np.nansum(np.where(present, x, 0), -1, keepdims=True) / n[..., None], 0)
        dy = np.where(present, y - np.nansum(np.where(present, y, 0), -1, keepdims=True) / n[..., None], 0)
        r = (dx * dy).sum(-1) / np.sqrt((dx * dx).sum(-1) * (dy * dy).sum(-1))
    return np.where((n >= 2) & np.isfinite(r), np.clip(r, -1, 1), np.nan)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def metric_values(t: Recordings, idx: np.ndarray) -> np.ndarray:
    """Every metric of :data:`METRICS` over the recordings ``idx`` (shape ``(..., n)``: one resample a row), stacked
    on the first axis."""
    out = []
    for k in SCORE_KEYS:
        x, y = t.predicted[k][idx], t.human[k][idx]
        present = ~np.isnan(x) & ~np.isnan(y)
        xm, ym = np.where(present, x, np.nan), np.where(present, y, np.nan)
        ranks = [rankdata(v, axis=-1, nan_policy="omit") for v in (xm, ym)]
        with np.errstate(invalid="ignore", divide="ignore"):
            mse = np.where(present, (x - y) ** 2, 0).sum(-1) / present.sum(-1)
        out += [_pearson(x, y, present), _pearson(*ranks, present), mse]
    c = {name: v[idx].sum(-1) for name, v in t.counts.items()}
    precision, recall = _ratio(c["tp"], c["tp"] + c["fp"]), _ratio(c["tp"], c["tp"] + c["fn"])
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(c["tp"] > 0, 2 * precision * recall / (precision + recall), 0.0)
    f1 = np.where(c["tp"] + c["fp"] + c["fn"] > 0, f1, np.nan)
    out += [_ratio(c["word_errors"], c["words"]), _ratio(c["phone_errors"], c["phones"]), precision, recall, f1]
    return np.stack(out)


def _bootstrap(statistic, n: int, resamples: int, seed: int):
    with warnings.catch_warnings():  # a degenerate resample distribution (a perfect score): its interval is a point
        warnings.simplefilter("ignore", DegenerateDataWarning)
        return _resampled(statistic, n, resamples, seed)


def _resampled(statistic, n: int, resamples: int, seed: int):
    return bootstrap(
        (np.arange(n),),
        lambda idx, axis=-1: statistic(idx),
        vectorized=True,
        n_resamples=resamples,
        batch=max(1, 2_000_000 // max(n, 1)),  # memory: a batch of resamples x recordings at a time
        method="percentile",
        confidence_level=LEVEL,
        random_state=seed,
    )


def _table(records: list[dict[str, Any]] | Recordings) -> Recordings:
    return records if isinstance(records, Recordings) else recordings(records)


def point_values(records: list[dict[str, Any]] | Recordings) -> dict[str, float]:
    """SCC, MSE and PCC's p-value of each aspect (PCC, WER, PER and MDD are ``score``'s)."""
    t = _table(records)
    values = dict(zip(METRICS, metric_values(t, np.arange(len(t.ids))).tolist(), strict=True))
    out = {m: _float(values[m]) for m in METRICS if m.startswith(("scc_", "mse_"))}
    for k in SCORE_KEYS:
        present = ~np.isnan(t.predicted[k]) & ~np.isnan(t.human[k])
        out[f"pcc_{k}_p"] = pcc_pvalue(t.predicted[k][present], t.human[k][present])
    return out


def pcc_pvalue(predicted: np.ndarray, human: np.ndarray) -> float:
    """The two-sided p-value of Pearson's r against no correlation; NaN where r is undefined."""
    if len(predicted) < 3 or np.ptp(predicted) == 0 or np.ptp(human) == 0:
        return math.nan
    return float(pearsonr(predicted, human).pvalue)


def intervals(
    records: list[dict[str, Any]] | Recordings, resamples: int = 1000, seed: int = 0
) -> dict[str, list[float | None]]:
    """``{metric}_ci: [low, high]``, the 95% bootstrap interval of every metric over the recordings (none with
    ``resamples=0`` or fewer than 2 recordings)."""
    t = _table(records)
    if resamples <= 0 or len(t.ids) < 2:
        return {}
    with np.errstate(invalid="ignore"):
        res = _bootstrap(lambda idx: metric_values(t, idx), len(t.ids), resamples, seed)
    low, high = _percentiles(res.bootstrap_distribution)
    return {f"{m}_ci": [_float(lo), _float(hi)] for m, lo, hi in zip(METRICS, low, high, strict=True)}


def _percentiles(distribution: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval of each metric's resampled values, leaving out resamples where it is undefined (a
    resample without a mispronounced phone has no MDD recall)."""
    tail = 100 * (1 - LEVEL) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a metric undefined in every resample: NaN
        return tuple(np.nanpercentile(distribution, [tail, 100 - tail], axis=-1))


def paired_difference(
    a: list[dict[str, Any]], b: list[dict[str, Any]], resamples: int = 1000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """B - A for every metric on the recordings both evaluated, resampled together: ``{metric: {a, b, difference,
    ci: [low, high], p}}``, and ``n`` the recordings compared."""
    by_id = {r["id"]: r for r in b}
    common = [r for r in a if r["id"] in by_id]
    if len(common) < 2:
        raise ValueError(f"the two evaluations share {len(common)} recordings: compare evaluations of one split")
    ta, tb = recordings(common), recordings([by_id[r["id"]] for r in common])
    n = len(common)
    both = np.arange(n)
    va, vb = metric_values(ta, both), metric_values(tb, both)
    with np.errstate(invalid="ignore"):
        res = _bootstrap(lambda idx: metric_values(tb, idx) - metric_values(ta, idx), n, resamples, seed)
    out: dict[str, Any] = {"n": n}
    low, high = _percentiles(res.bootstrap_distribution)
    for i, m in enumerate(METRICS):
        d = res.bootstrap_distribution[i]
        d = d[~np.isnan(d)]
        p = min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())) if len(d) else math.nan
        out[m] = {
            "a": _float(va[i]),
            "b": _float(vb[i]),
            "difference": _float(vb[i] - va[i]),
            "ci": [_float(low[i]), _float(high[i])],
            "p": float(p),
        }
    return out


def _float(v: Any) -> float:
    return float(v) if v is not None and np.isfinite(v) else math.nan
