"""phi4_pron.audio_cache: training from the cached audio embeddings gives the loss and gradients of the encoder run
in the step; no cache where training mode changes them."""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_trainer, loss_and_grads, task_questions, tiny_lora_model


def test_cached_audio_embeddings_give_the_reference_loss_and_gradients(
    tiny_model_dir, tiny_processing, mini_train, tmp_path
):
    """Training from the cached audio embeddings (``hardware.cache_audio_embeddings``) gives the loss and gradients
    of the audio encoder run in the step, when the table was computed from the same recordings."""

    from phi4_pron.audio_cache import AUDIO_ROWS, cache_audio_embeddings
    from phi4_pron.collator import PronunciationCollator

    model = tiny_lora_model(tiny_model_dir).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    rows = mini_train.select([3, 0, 2, 1])
    plain = PronunciationCollator(*tiny_processing, task_questions("joint"))
    batch = plain([rows[i] for i in range(4)])

    ref_loss, ref_grads = loss_and_grads(model, lambda: model(**batch).loss)
    cached_rows, collator, table = cache_audio_embeddings(model, rows, plain, batch_size=4)
    spans = cached_rows["audio_span"]
    assert [s for s, _ in spans] != sorted(s for s, _ in spans)  # computed longest first: the spans map back
    assert spans[max(range(4), key=lambda i: spans[i][1])][0] == 0  # the longest (most embeddings) first
    assert "audio" not in cached_rows.column_names and table.shape[0] == sum(n for _, n in spans)
    cached = collator([cached_rows[i] for i in range(4)])
    assert "audio_input_features" not in cached and cached[AUDIO_ROWS].shape == (table.shape[0],)
    assert torch.equal(cached["input_ids"], batch["input_ids"]) and torch.equal(cached["labels"], batch["labels"])
    trainer = cpu_trainer(model, tiny_processing, mini_train, tmp_path)
    trainer.audio_table = table
    fast_loss, fast_grads = loss_and_grads(model, lambda: trainer.compute_loss(trainer.model, dict(cached)))
    assert fast_loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(fast_grads) == set(ref_grads) and len(ref_grads) == 16
    for name, g in ref_grads.items():
        assert (fast_grads[name] - g).norm() <= 1e-4 * g.norm() + 1e-8, name


def test_audio_embeddings_stay_uncached_where_training_mode_changes_them(tiny_model_dir, caplog):
    """Dropout or streaming chunks in the audio embedding make training mode differ: no cache, a warning."""
    from transformers import AutoConfig

    from phi4_pron.audio_cache import cache_audio_embeddings, unsupported_reason

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert unsupported_reason(config) is None
    config.audio_config.chunk_size = 18
    assert "chunk_size=18" in unsupported_reason(config)
    config.audio_config.chunk_size, config.embd_pdrop = -1, 0.1
    assert "embd_pdrop=0.1" in unsupported_reason(config)

    class Model:
        pass

    model = Model()
    model.config = config
    with caplog.at_level("WARNING"):
        assert cache_audio_embeddings(model, None, None, batch_size=4) is None
    assert "not cached" in caplog.text


def test_collator_asks_for_the_audio_span_column(tiny_processing, mini_train):
    from phi4_pron.collator import PronunciationCollator

    with pytest.raises(ValueError, match="audio_span.*cache_audio_embeddings"):
        PronunciationCollator(*tiny_processing, task_questions("joint"), audio_from_table=True)([mini_train[0]])
