"""phi4_pron.callbacks: checkpoints named by epoch, and the evaluation after each on evaluate's fast path, leaving
training as it found it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MINI, compose

ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=ON_GPU)])
def test_the_per_epoch_evaluation_takes_the_fast_path_without_recompiling_training(tmp_path, device):
    """The evaluation inside training (static cache; on a GPU flash attention and the compiled CUDA-graph decoding
    step): the same answers as the eager path on the same adapter, and the training's compiled layers are not
    recompiled by it (a step after it runs under ``fail_on_recompile``)."""
    from phi4_pron.callbacks import EpochEvalCallback
    from phi4_pron.data import load_split
    from phi4_pron.jobs.train import build_trainer, prepare
    from phi4_pron.trainer import sft_config

    on_cpu = ["hardware.num_gpus=0", "hardware.bf16=false", "hardware.dataloader_num_workers=0"]
    cfg = compose(
        [
            "experiment=smoke",
            "hardware=h100",  # compiled layers, compiled decoding
            *(on_cpu if device == "cpu" else ["model.dtype=bfloat16"]),
            "data.max_train_samples=16",
            "optim.effective_batch_size=16",
            "logger=none",
        ]
    )
    args = sft_config(cfg, tmp_path, world_size=1)
    prepared = prepare(cfg, args.device)
    trainer = build_trainer(prepared, args)
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    dataset = load_split(str(MINI), "test", limit=8)

    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets before its first step

    def step():
        trainer.training_step(trainer.model, next(iter(trainer.get_train_dataloader())))

    def evaluate(compiled: bool) -> list:
        callback = EpochEvalCallback(
            trainer,
            prepared.tokenizer,
            prepared.feature_extractor,
            prepared.questions,
            dataset,
            tmp_path / ("fast" if compiled else "eager"),
            batch_size=4,
            max_new_tokens=12,
            compiled=compiled,
        )
        callback.evaluate(prepared.model, epoch=1, step=1)
        predictions = tmp_path / ("fast" if compiled else "eager") / "eval" / "checkpoint-epoch-1" / "predictions.jsonl"
        return [json.loads(line)["raw"] for line in predictions.read_text().splitlines()]

    step()  # the layers compile for training
    eager, fast = evaluate(False), evaluate(True)
    with torch.compiler.set_stance("fail_on_recompile"):
        step()
    assert fast == eager and len(fast) == 8
