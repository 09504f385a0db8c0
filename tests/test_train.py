"""The real entrypoint trains the tiny model with each LoRA config and leaves a complete run folder."""

from __future__ import annotations

import json

import pytest
from conftest import MINI


@pytest.fixture(scope="module", params=["r64", "r320"])
def smoke_run(request, smoke_runs):
    return request.param, smoke_runs(request.param)


@pytest.mark.slow
def test_run_folder_is_complete(smoke_run):
    _, run_dir = smoke_run
    for name in ["checkpoint-epoch-1", "checkpoint-epoch-2", "checkpoint-epoch-3", "logs", ".hydra"]:
        assert (run_dir / name).is_dir(), name
    for name in ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "preprocessor_config.json"]:
        assert (run_dir / "final_model" / name).exists(), name
    for name in ["optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"]:
        assert (run_dir / "checkpoint-epoch-3" / name).exists(), name
    assert list((run_dir / "logs").glob("events.out.tfevents.*"))
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert list((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_loss_decreases(smoke_run):
    _, run_dir = smoke_run
    history = json.loads((run_dir / "checkpoint-epoch-3" / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) >= 6
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first - 0.2, losses


@pytest.mark.slow
def test_training_config_records_the_lora_setup(smoke_run):
    lora, run_dir = smoke_run
    tc = json.loads((run_dir / "training_config.json").read_text())
    expected = {"r64": (64, 128, 0.05, "fresh"), "r320": (320, 640, 0.01, "pretrained")}[lora]
    speech = tc["speech_lora"]
    assert (speech["r"], speech["alpha"], speech["dropout"], speech["init"]) == expected
    assert tc["vision_lora"] == {
        "r": 256,
        "alpha": 512,
        "trainable": False,
        "loaded": False,
        "note": "speech inputs never use the vision LoRA",
    }
    assert 0 < tc["trainable_params"] < speech["total_params"]
    assert tc["trainable_share"] == pytest.approx(tc["trainable_params"] / speech["total_params"])
    assert tc["effective_batch_size"] == 4
    assert tc["training_arguments"]["gradient_accumulation_steps"] == 1
    assert tc["config_name"] == run_dir.name
    assert tc["audio_embeddings_cached"] is True  # hardware.cache_audio_embeddings, on by default
    assert tc["task"] == {"name": "paper", "questions": ["apa", "mdd"]} and tc["train_samples"] == 2 * 32
    # r320 continues the checkpoint's own adapter: all 16 tensors of the published speech-lora/ (2 layers x 4 x A, B)
    assert speech["tensors_loaded"] == {"r64": 0, "r320": 16}[lora]


@pytest.mark.slow
def test_saved_adapter_reloads_and_generates(smoke_run):
    import torch

    from phi4_pron.collator import PronunciationCollator
    from phi4_pron.data import load_split
    from phi4_pron.inference import generate_answers, load_adapter_for_inference, saved_questions

    lora, run_dir = smoke_run
    adapter = json.loads((run_dir / "final_model" / "adapter_config.json").read_text())
    assert adapter["r"] == {"r64": 64, "r320": 320}[lora]
    rows = load_split(str(MINI), "test", limit=2)
    merged, tokenizer, fe = load_adapter_for_inference(run_dir / "final_model")
    questions = saved_questions(run_dir / "final_model")
    unmerged, _, _ = load_adapter_for_inference(run_dir / "final_model", merge=False)
    assert unmerged.peft_config["default"].r == adapter["r"] and not hasattr(merged, "peft_config")
    rows = [{**rows[0], "question": "apa"}, {**rows[1], "question": "mdd"}]
    batch = PronunciationCollator(tokenizer, fe, questions)([rows[0], rows[1]])
    with torch.no_grad():  # merging the adapter into the weights leaves the function unchanged
        a, b = merged(**batch).logits, unmerged(**batch).logits  # fp32 sums in another order: scale-relative
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    answers = generate_answers(merged, tokenizer, fe, questions, [rows[0], rows[1]], max_new_tokens=8)
    assert len(answers) == 2 and all(isinstance(a, str) and a for a in answers)


@pytest.mark.slow
def test_every_epoch_is_evaluated_and_logged(smoke_run):
    _, run_dir = smoke_run
    for epoch in (1, 2, 3):
        out = run_dir / "eval" / f"checkpoint-epoch-{epoch}"
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["epoch"] == epoch and metrics["n_utterances"] == 8 and metrics["task"] == "paper"
        assert (out / "predictions.jsonl").exists() and (out / "grid_total.png").exists()
    history = json.loads((run_dir / "checkpoint-epoch-3" / "trainer_state.json").read_text())["log_history"]
    # the epoch-3 evaluation runs after that checkpoint's state was written, so two epochs are in it
    assert [round(h["epoch"]) for h in history if "eval/mdd_f1" in h][:2] == [1, 2]


@pytest.mark.slow
def test_trains_from_the_hub_dataset_as_downloaded(hub_snapshot, tmp_path):
    """``data.path`` = a folder of ``hf download mispeech/speechocean762 --repo-type dataset`` (the audio embedded in
    parquet files): the entrypoint trains an epoch from it and evaluates under the corpus's utterance ids."""
    from conftest import run_cli

    from phi4_pron.data import load_split

    run_cli(["-m", "phi4_pron.train", "experiment=smoke", f"data.path={hub_snapshot}", "optim.epochs=1",
             "logger=none", f"output_root={tmp_path}"])  # fmt: skip
    out = tmp_path / "paper_r64" / "eval" / "checkpoint-epoch-1"
    ids = [json.loads(line)["id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(ids) == 8 and set(ids) <= set(load_split(str(MINI), "test")["id"])
    assert json.loads((out / "metrics.json").read_text())["n_failed"] == 0
