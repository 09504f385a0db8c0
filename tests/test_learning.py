"""Proof that the loop learns: the tiny model overfits four bundled recordings through the real entrypoints until
``evaluate`` on them is perfect, and its transcripts follow the audio, not the prompt.

Each run goes through ``python -m phi4_pron.train`` and ``python -m phi4_pron.evaluate``: prompt, audio placeholders,
label masking, cached (or per-step) audio embeddings, LoRA, generation, parsing and metrics all have to work for
PCC 1.0, WER 0, PER 0 and F1 1.0. The APA instruction is shortened (a config value): the 2-layer, 64-wide tiny model
cannot carry the audio across the paper's 570-token rubric in a test's budget of steps.
"""

from __future__ import annotations

import json

import pytest
from conftest import MINI, run_cli

SHORT_APA = "task.questions.apa.instruction='Rate the pronunciation of the audio.'"
# Each value of each factor (LoRA config, audio cache, task format) twice, in four runs rather than all eight.
RUNS = [("r64", True, "paper"), ("r320", False, "paper"), ("r64", False, "joint"), ("r320", True, "joint")]
# Steps and learning rate per LoRA config: r320 starts from the checkpoint's (random, r 320) adapter and needs a lower
# rate and more steps. Another CPU's rounding takes training elsewhere, so the schedule must overfit with room to
# spare: with 150 / 250 epochs an AMD EPYC's r320-nocache-paper run answered one recording's MDD with another's
# transcript (its lead -0.03) and r64-cache-paper was at 0.23. With these, every answer token's logit leads the
# runner-up by at least 3.7 there (teacher-forced, batched as evaluate batches,
# by scripts/overfit_margins.py of commit 17cc71b: 3.73, 5.27, 7.32, 7.62 for the four runs in RUNS' order).
SCHEDULE = {"r64": ("optim.epochs=200", "optim.lr=5e-3"), "r320": ("optim.epochs=400", "optim.lr=2e-3")}


def overfit(out, lora: str, cache: bool, task: str):
    run_dir = out / "run"
    run_cli(
        [
            "-m",
            "phi4_pron.train",
            "experiment=smoke",
            f"lora={lora}",
            f"task={task}",
            f"hardware.cache_audio_embeddings={cache}",
            "data.max_train_samples=4",
            *SCHEDULE[lora],
            "optim.effective_batch_size=8",
            "hardware.per_device_train_batch_size=8",
            "eval.every_epoch=false",
            "logger=none",
            *([SHORT_APA] if task == "paper" else []),
            f"hydra.run.dir={run_dir}",
        ]
    )
    run_cli(
        [
            "-m",
            "phi4_pron.evaluate",
            f"run_dir={run_dir}",
            "data=mini",
            "data.eval_split=train",  # the four training recordings
            "eval.limit=4",
            "eval.max_new_tokens=96",
        ]
    )
    return run_dir


@pytest.fixture(scope="module")
def overfit_runs(tmp_path_factory):
    runs = {}

    def get(key):
        if key not in runs:
            runs[key] = overfit(tmp_path_factory.mktemp("overfit"), *key)
        return runs[key]

    return get


@pytest.mark.slow
def test_the_four_recordings_can_show_it():
    """Their human scores differ on every aspect and one phone is mispronounced: PCC and F1 are defined."""
    from phi4_pron.data import load_split

    rows = load_split(str(MINI), "train", limit=4)
    for aspect in ("accuracy", "fluency", "prosodic", "total"):
        assert len(set(rows[aspect])) > 1, aspect
    assert any(m for w in rows["words"] for word in w for m in word["mispronunciations"])


@pytest.mark.slow
@pytest.mark.parametrize("lora,cache,task", RUNS, ids=[f"{lo}-{'cache' if c else 'nocache'}-{t}" for lo, c, t in RUNS])
def test_overfit_model_answers_its_training_recordings_perfectly(overfit_runs, lora, cache, task):
    run_dir = overfit_runs((lora, cache, task))
    training = json.loads((run_dir / "training_config.json").read_text())
    assert training["audio_embeddings_cached"] is cache and training["task"]["name"] == task
    metrics = json.loads((run_dir / "eval" / "final_model" / "metrics.json").read_text())
    assert (metrics["n_failed"], metrics["n_unparseable"]) == (0, 0)
    for aspect in ("accuracy", "fluency", "prosodic", "total"):
        assert metrics[f"pcc_{aspect}"] == pytest.approx(1.0) and metrics[f"n_{aspect}"] == 4, aspect
    assert (metrics["wer"], metrics["per"], metrics["mdd_f1"]) == (0.0, 0.0, 1.0)
    for record in map(json.loads, (run_dir / "eval" / "final_model" / "predictions.jsonl").read_text().splitlines()):
        ref, got = record["reference"], record["parsed"]
        assert [got[k] for k in ("accuracy", "fluency", "prosodic", "total")] == [
            ref[k] for k in ("accuracy", "fluency", "prosodic", "total")
        ]
        assert (got["transcript"], got["phones"]) == (ref["text"], ref["phones"])


@pytest.mark.slow
def test_transcripts_follow_the_audio_not_the_prompt(overfit_runs):
    """The paper's MDD prompt holds no sentence: given recording B's audio under recording A's row, the overfit model
    transcribes B. So the audio reaches the language model through the placeholders in training and generation."""
    from phi4_pron.data import load_split
    from phi4_pron.inference import generate_answers, load_adapter_for_inference, saved_questions

    run_dir = overfit_runs(("r64", True, "paper"))
    model, tokenizer, fe = load_adapter_for_inference(run_dir / "final_model")
    questions = saved_questions(run_dir / "final_model")
    rows = list(load_split(str(MINI), "train", limit=4))
    swapped = [{**row, "audio": rows[(i + 1) % 4]["audio"], "question": "mdd"} for i, row in enumerate(rows)]
    answers = generate_answers(model, tokenizer, fe, questions, swapped, max_new_tokens=96)
    said = [questions["mdd"].parse(a)["transcript"] for a in answers]
    assert said == [rows[(i + 1) % 4]["text"] for i in range(4)]
    assert all(s != row["text"] for s, row in zip(said, rows, strict=True))
