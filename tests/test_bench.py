"""The benchmark's code path (tiny model, CPU), and the trainer's fast loss against the reference loss."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli


@pytest.mark.parametrize("mode", ["train", "eval", "memory"])
def test_bench_runs_on_the_tiny_model(mode, tmp_path):
    run_cli(["-m", "phi4_pron.bench", mode, "--tiny", "--out", str(tmp_path)], timeout=600)
    results = json.loads((tmp_path / f"{mode}.json").read_text())
    assert len(results) == 2 and all("error" not in r for r in results)
    key = "test_eval_s" if mode == "eval" else "epoch_s"
    assert all(r[key] > 0 for r in results)
    assert (tmp_path / f"{mode}.md").read_text().startswith("| setting")


def test_fused_answer_only_loss_equals_the_plain_loss(tiny_model_dir, tiny_processing, mini_train, tmp_path):
    """TRL's fused LM head (loss over answer positions only) gives the model's own full-logits loss."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from phi4_pron.collator import PronunciationCollator
    from phi4_pron.modeling import attach_speech_lora

    tokenizer, fe = tiny_processing
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = OmegaConf.create(
        {
            "init": "fresh",
            "r": 8,
            "alpha": 16,
            "dropout": 0.0,
            "target_modules": r".*model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))",
        }
    )
    model = attach_speech_lora(model, lora, path=str(tiny_model_dir)).eval()
    collator = PronunciationCollator(tokenizer, fe)
    batch = collator([mini_train[i] for i in range(4)])
    with torch.no_grad():
        reference = model(**batch).loss
    args = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=mini_train.select(range(2)),
        data_collator=collator,
        processing_class=tokenizer,
    )
    with torch.no_grad():
        fast = trainer.compute_loss(trainer.model, dict(batch))
    assert fast.item() == pytest.approx(reference.item(), rel=1e-5)
