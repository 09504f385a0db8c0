"""Load a trained adapter for inference and generate answers in batches."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from phi4_pron.adapters import ADAPTER_CONFIG, attach_lora_from
from phi4_pron.answer import END, TASK_FILE, Question, questions_from_config
from phi4_pron.audio_cache import AUDIO_ROWS, embed_from_table
from phi4_pron.collator import PronunciationCollator, pad_token_id
from phi4_pron.modeling import ModelPathError, audio_token_id, load_base_model, load_tokenizer_and_features


def load_adapter_for_inference(
    adapter_dir: str | Path,
    dtype: str | None = None,
    attn_implementation: str = "sdpa",
    device: str | None = None,
    merge: bool = True,
):
    """(model, tokenizer, feature extractor): the base model named in ``adapter_config.json`` with the adapter (any
    key layout, every tensor checked), in evaluation mode, and the processing saved beside it (a run's final_model/
    or checkpoint-epoch-N/). ``merge`` folds the LoRA weights into the base weights: the same function, faster."""
    adapter_dir = Path(adapter_dir)
    adapter_cfg = adapter_config(adapter_dir)
    base = adapter_cfg["base_model_name_or_path"]
    revision = None if Path(base).expanduser().is_dir() else adapter_cfg.get("revision")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model = load_base_model(base, revision, torch_dtype, attn_implementation)
    model, _ = attach_lora_from(model, str(adapter_dir))
    model = (model.merge_and_unload() if merge else model).to(device).eval()
    has_processing = all((adapter_dir / f).exists() for f in ("tokenizer_config.json", "preprocessor_config.json"))
    if has_processing:
        tokenizer, feature_extractor = load_tokenizer_and_features(str(adapter_dir))
    else:
        tokenizer, feature_extractor = load_tokenizer_and_features(base, revision)
    audio_token_id(tokenizer, model.config)
    return model, tokenizer, feature_extractor


def adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """A trained adapter's ``adapter_config.json``, checked to name its base checkpoint (before any weights load)."""
    config_file = adapter_dir / ADAPTER_CONFIG
    if not config_file.exists():
        raise ModelPathError(
            f"{adapter_dir} has no adapter_config.json: give a run's final_model/ or checkpoint-epoch-N/ folder."
        )
    adapter_cfg = json.loads(config_file.read_text())
    if not adapter_cfg.get("base_model_name_or_path"):
        raise ModelPathError(f"{config_file} names no base_model_name_or_path; set it to the base checkpoint.")
    return adapter_cfg


def saved_task(adapter_dir: str | Path) -> dict[str, Any]:
    """The task an adapter was trained on: its ``task.json``, else its run's ``training_config.json``."""
    adapter_dir = Path(adapter_dir)
    task_file = adapter_dir / TASK_FILE
    if task_file.exists():
        return json.loads(task_file.read_text())
    run_record = adapter_dir.parent / "training_config.json"
    task = json.loads(run_record.read_text())["config"].get("task") if run_record.exists() else None
    if task is not None:
        return task
    raise ModelPathError(
        f"{adapter_dir} has no {TASK_FILE} (and no training_config.json beside it): the questions this adapter "
        "answers are unknown. Copy the run's task.json there."
    )


def saved_questions(adapter_dir: str | Path) -> dict[str, Question]:
    """The questions an adapter was trained to answer (:func:`saved_task`)."""
    return questions_from_config(saved_task(adapter_dir))


def batches(rows: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(rows), size):
        yield [rows[j] for j in range(i, min(i + size, len(rows)))]


def generation_collator(tokenizer, feature_extractor, questions: dict[str, Question]) -> PronunciationCollator:
    """Prompts only, padded on the left so every row's answer starts at the same position."""
    return PronunciationCollator(tokenizer, feature_extractor, questions, with_answer=False, padding_side="left")


def placeholder_ids(config) -> list[int]:
    """The audio and image placeholder ids of a Phi-4-multimodal config."""
    return [config.audio_config.audio_token_id, config.vision_config.image_token_id]


@torch.inference_mode()
def generate_from_batch(
    model,
    tokenizer,
    batch: dict[str, torch.Tensor],
    budgets: Sequence[int],
    cache_len: int | None = None,
    audio_table: torch.Tensor | None = None,
) -> list[str]:
    """Greedy answers for one collated batch (from :func:`generation_collator`), prompt stripped, each row's cut at
    its own number of new tokens (``budgets``: its question's cap), whatever its batch mates need. A batch collated
    from ``audio_table`` (``audio_rows``, :mod:`phi4_pron.audio_cache`) takes its audio embeddings from there.
    ``cache_len``: a static cache of that many positions (at least the prompt + the largest budget), with which
    transformers compiles the decoding step on a GPU.
    """
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if AUDIO_ROWS in batch:  # the prefill reads the table's embeddings; the decoding steps the ids
        batch = {**embed_from_table(model, batch, audio_table), "input_ids": batch["input_ids"]}
    extra = {"cache_implementation": "static", "max_cache_len": cache_len} if cache_len else {}
    out = model.generate(
        **batch,
        max_new_tokens=max(budgets),
        do_sample=False,
        eos_token_id=[tokenizer.convert_tokens_to_ids(END), tokenizer.eos_token_id],
        pad_token_id=pad_token_id(tokenizer),
        # generate's default (1) slices the prompt's last position as a strided view, which the LM head multiplies
        # as a batched matmul reading the whole 200k-token weight once per row; an index tensor copies the positions
        # first, and the LM head is one matmul.
        logits_to_keep=torch.tensor([-1], device=device),
        # an answer never holds a modality placeholder: one generated would be read as audio at the next step
        suppress_tokens=placeholder_ids(model.config),
        **extra,
    )
    answers = out[:, batch["input_ids"].shape[1] :]
    return [tokenizer.decode(a[:n], skip_special_tokens=True) for a, n in zip(answers, budgets, strict=True)]


def generate_answers(
    model,
    tokenizer,
    feature_extractor,
    questions: dict[str, Question],
    rows: list[dict[str, Any]],
    max_new_tokens: int = 256,
) -> list[str]:
    """Greedy answers for one batch of rows (each with ``audio``, ``text`` and, where the task asks several, its
    ``question``), prompt stripped; at most ``max_new_tokens``, or the rows' questions' own cap where smaller."""
    collator = generation_collator(tokenizer, feature_extractor, questions)
    budgets = [collator.question(r).answer_budget(max_new_tokens) for r in rows]
    return generate_from_batch(model, tokenizer, collator(rows), budgets)
