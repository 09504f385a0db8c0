"""The frozen audio encoder run once per training run instead of at every step.

The speech LoRA sits on the language model; the audio encoder and its speech projection are frozen and, in
Phi-4-multimodal's configuration (no dropout, no streaming chunks), compute the same in training as in evaluation
mode. So every training recording's audio embeddings are computed once, before the first step, in batches sorted by
duration, and kept on the model's device in one table (``[embeddings, hidden]``). Each dataset row gets its span of
that table (``audio_span``); the collator then hands the trainer the spans' table rows (``audio_rows``) instead of
log-mel features, and the trainer writes those rows over the audio placeholders' token embeddings, where the model's
own ``Phi4MultimodalAudioEmbedding`` writes them. No feature extraction in the data workers, no audio encoder in the
training step.

A recording's embeddings depend a little on the padding after it in its batch (the conformer's convolutions see the
padded frames), cached or not; duration-sorted batches pad as little as the split allows.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel
from torch.utils.data import DataLoader

from phi4_pron.data import check_audio_file

log = logging.getLogger(__name__)

AUDIO_SPAN = "audio_span"  # dataset column: [first table row, number of audio embeddings]
AUDIO_ROWS = "audio_rows"  # batch key: the table rows of the batch's audio placeholders, in reading order


def unsupported_reason(config) -> str | None:
    """Why this model's audio embeddings differ between training and evaluation mode (so cannot be cached), if so."""
    audio = config.audio_config
    if audio.dropout_rate or config.embd_pdrop:
        return f"dropout in the audio embedding (dropout_rate={audio.dropout_rate}, embd_pdrop={config.embd_pdrop})"
    if audio.chunk_size > 0:
        return f"streaming chunks (audio chunk_size={audio.chunk_size}) are laid out at random in training mode"
    return None


def _audio_embedding(model):
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return base.model.embed_tokens_extend.audio_embed


@torch.inference_mode()
def compute_audio_table(
    model, dataset: Dataset, collator, batch_size: int, num_workers: int = 0
) -> tuple[torch.Tensor, list[list[int]]]:
    """Every row's audio embeddings stacked into one table on the model's device, and each row's ``[start, count]``.

    Runs the model's own audio embedding (encoder, speech projection, placement) on the generation collator's batches,
    longest recordings first, and reads the embeddings back from the audio placeholders' positions. Longest first, the
    first batch reserves the largest blocks and the later, smaller ones reuse them; shortest first, every batch needs
    larger blocks than the allocator's pool holds (about twice the memory reserved over the training split).
    """
    module = _audio_embedding(model)
    device, dtype = module.up_proj_for_speech.bias.device, module.up_proj_for_speech.bias.dtype
    hidden = model.config.hidden_size
    if "seconds" in dataset.column_names:  # data.with_lengths
        seconds = list(dataset["seconds"])  # a list: sorting by a Column's items reads them one by one
    else:
        seconds = [check_audio_file(a, u) for u, a in zip(dataset["id"], dataset["audio"], strict=True)]
    order = sorted(range(len(dataset)), key=seconds.__getitem__, reverse=True)
    batches = DataLoader(
        dataset.select(order),
        batch_size=batch_size,
        collate_fn=dataclasses.replace(collator, with_answer=False, padding_side="right", audio_from_table=False),
        num_workers=num_workers,
    )
    was_training = module.training
    module.eval()
    pieces, spans, start, done = [], [None] * len(dataset), 0, 0
    for batch in batches:
        ids = batch["input_ids"].to(device)
        mask = batch.get("audio_attention_mask")
        merged = module(
            ids,
            torch.zeros(*ids.shape, hidden, dtype=dtype, device=device),
            audio_input_features=batch["audio_input_features"],
            audio_embed_sizes=batch["audio_embed_sizes"],
            audio_attention_mask=None if mask is None else mask.to(device),
        )
        pieces.append(merged[ids == collator.audio_token_id])
        for n in batch["audio_embed_sizes"].tolist():
            spans[order[done]] = [start, n]
            start, done = start + n, done + 1
    module.train(was_training)
    return torch.cat(pieces), spans


def shared_audio_table(
    model, recordings: Dataset, collator, batch_size: int, num_workers: int = 0
) -> tuple[torch.Tensor, list[list[int]]] | None:
    """Evaluation's audio embeddings (:func:`compute_audio_table`, the model in evaluation mode), one recording a
    row: its prompts, one a question, read them by ``audio_span`` instead of running the audio encoder each (the
    paper's task asks two). ``None``, with a warning, where a recording cannot be read or embedded: the prompts then
    read their own audio, and the broken recording fails alone, counted."""
    try:
        return compute_audio_table(model, recordings, collator, batch_size, num_workers)
    except Exception as e:  # noqa: BLE001 - the prompts' own path finds and counts the broken recording
        log.warning("audio embeddings not shared between questions (each prompt reads its own audio): %s", e)
        return None


def cache_audio_embeddings(
    model, dataset: Dataset, collator, batch_size: int, num_workers: int = 0
) -> tuple[Dataset, Any, torch.Tensor] | None:
    """The dataset with ``audio_span`` (and no audio), a collator that reads it, and the table; ``None`` (with a
    warning) where the model's audio embedding differs in training mode.

    A recording asked several questions (several rows with its ``id``) is embedded once; its rows share the span.
    """
    reason = unsupported_reason(model.config)
    if reason:
        log.warning("audio embeddings not cached (computed at every step): %s", reason)
        return None
    t0 = time.perf_counter()
    ids = dataset["id"]
    first = {}
    for i, utt in enumerate(ids):
        first.setdefault(utt, i)
    table, spans = compute_audio_table(model, dataset.select(list(first.values())), collator, batch_size, num_workers)
    span_of = dict(zip(first, spans, strict=True))
    log.info(
        "audio embeddings of %d recordings cached: %d x %d (%.0f MiB) in %.1f s",
        len(first),
        *table.shape,
        table.nbytes / 2**20,
        time.perf_counter() - t0,
    )
    cached = dataset.remove_columns("audio").add_column(AUDIO_SPAN, [span_of[u] for u in ids])
    return cached, dataclasses.replace(collator, audio_from_table=True), table


def embed_from_table(model, inputs: dict[str, torch.Tensor], table: torch.Tensor) -> dict[str, torch.Tensor]:
    """``inputs`` with ``inputs_embeds`` (token embeddings, the table's rows at the audio placeholders) in place of
    ``input_ids`` and ``audio_rows``, as the model's audio embedding would place its own."""
    inputs = dict(inputs)
    ids, rows = inputs.pop("input_ids"), inputs.pop(AUDIO_ROWS)
    embeds = model.get_input_embeddings()(ids)
    placeholders = (ids == model.config.audio_config.audio_token_id).unsqueeze(-1)
    inputs["inputs_embeds"] = embeds.masked_scatter(placeholders, table[rows].to(embeds.dtype))
    return inputs
