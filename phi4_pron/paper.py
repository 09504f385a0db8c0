"""Ahn & Nam (arXiv 2509.02915), Table 3, and the result columns every report uses. Imports nothing heavy: reports
and metrics tables read it without torch."""

from __future__ import annotations

from phi4_pron.answer import SCORE_KEYS

# Table 3 columns, in the paper's order, and the headline metrics logged per evaluation.
METRIC_COLUMNS = [
    "pcc_accuracy",
    "pcc_fluency",
    "pcc_prosodic",
    "pcc_total",
    "wer",
    "per",
    "mdd_f1",
    "mdd_precision",
    "mdd_recall",
]
HEADERS = ["PCC acc", "PCC flu", "PCC pro", "PCC tot", "WER", "PER", "F1", "Prec", "Rec"]
HEADLINE = [*METRIC_COLUMNS, "n_failed", "n_unparseable"]
# beside each PCC (phi4_pron.stats): rank correlation, squared error, and PCC's p-value
AGREEMENT_COLUMNS = [f"{m}_{k}" for m in ("scc", "mse") for k in SCORE_KEYS]
PVALUE_COLUMNS = [f"pcc_{k}_p" for k in SCORE_KEYS]


def logged(metrics: dict) -> dict[str, float]:
    """One evaluation's values for a tracker, flat: the headline, SCC, MSE, PCC p-values, and each interval as
    ``{metric}_lo`` / ``{metric}_hi``."""
    out = {k: metrics[k] for k in [*HEADLINE, *AGREEMENT_COLUMNS, *PVALUE_COLUMNS] if k in metrics}
    for key, value in metrics.items():
        if key.endswith("_ci") and value:
            out[f"{key[:-3]}_lo"], out[f"{key[:-3]}_hi"] = value
    return out


def _row(*values: float) -> dict[str, float]:
    return dict(zip(METRIC_COLUMNS, values, strict=True))


# (setting, epoch) -> metrics on the test split (2500 utterances). "LoRA": only the LoRA trains; "Unfreeze": the LoRA
# plus the audio encoder and its projector; epoch 0: no training.
PAPER_TABLE3: dict[tuple[str, int], dict[str, float]] = {
    ("LoRA", 0): _row(-0.041, -0.017, -0.0493, -0.104, 0.97, 0.792, 0.143, 0.154, 0.134),
    ("LoRA", 1): _row(0.547, 0.585, 0.567, 0.544, 0.15, 0.137, 0.686, 0.689, 0.682),
    ("LoRA", 2): _row(0.637, 0.726, 0.709, 0.662, 0.139, 0.118, 0.722, 0.725, 0.719),
    ("LoRA", 3): _row(0.656, 0.727, 0.711, 0.675, 0.14, 0.114, 0.724, 0.728, 0.721),
    ("LoRA", 4): _row(0.645, 0.733, 0.714, 0.668, 0.148, 0.121, 0.721, 0.723, 0.72),
    ("Unfreeze", 1): _row(0.535, 0.559, 0.564, 0.55, 0.159, 0.199, 0.575, 0.579, 0.57),
    ("Unfreeze", 2): _row(0.624, 0.668, 0.653, 0.634, 0.145, 0.154, 0.651, 0.651, 0.651),
    ("Unfreeze", 3): _row(0.621, 0.669, 0.655, 0.637, 0.148, 0.15, 0.663, 0.665, 0.662),
    ("Unfreeze", 4): _row(0.743, 0.717, 0.704, 0.666, 0.142, 0.142, 0.667, 0.671, 0.663),
}
PAPER_ROW = PAPER_TABLE3[("LoRA", 3)]  # the headline: LoRA only, epoch 3


def paper_setting(train_audio_encoder: bool) -> str:
    """The paper's name for a run's setting."""
    return "Unfreeze" if train_audio_encoder else "LoRA"


def paper_row(setting: str, epoch: int | None) -> dict[str, float] | None:
    """The paper's row for a setting and epoch (epoch 0 is the untrained model in both settings), if it has one."""
    if epoch is None:
        return None
    return PAPER_TABLE3.get(("LoRA" if epoch == 0 else setting, epoch))
