"""Load a trained adapter for inference and generate answers in batches."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from phi4_pron.answer import END
from phi4_pron.collator import PronunciationCollator, pad_token_id
from phi4_pron.modeling import ModelPathError, load_base_model, load_tokenizer_and_features


def load_adapter_for_inference(
    adapter_dir: str | Path,
    dtype: str | None = None,
    attn_implementation: str = "sdpa",
    device: str | None = None,
    merge: bool = True,
):
    """Base model named in ``adapter_config.json`` + the adapter, with the tokenizer saved beside it.

    ``merge`` folds the LoRA weights into the base weights: the same function, and generation 1.6x faster
    (experiments/benchmarks/eval.md).
    """
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.exists():
        raise ModelPathError(
            f"{adapter_dir} has no adapter_config.json: give a run's final_model/ or checkpoint-epoch-N/ folder."
        )
    adapter_cfg = json.loads(config_file.read_text())
    base = adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise ModelPathError(f"{config_file} names no base_model_name_or_path; set it to the base checkpoint.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model = load_base_model(base, adapter_cfg.get("revision"), torch_dtype, attn_implementation)
    model = PeftModel.from_pretrained(model, adapter_dir)
    model = (model.merge_and_unload() if merge else model).to(device).eval()
    has_processing = all((adapter_dir / f).exists() for f in ("tokenizer_config.json", "preprocessor_config.json"))
    if has_processing:
        tokenizer, feature_extractor = load_tokenizer_and_features(str(adapter_dir))
    else:
        tokenizer, feature_extractor = load_tokenizer_and_features(base, adapter_cfg.get("revision"))
    return model, tokenizer, feature_extractor


def batches(rows: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(rows), size):
        yield [rows[j] for j in range(i, min(i + size, len(rows)))]


def generation_collator(tokenizer, feature_extractor) -> PronunciationCollator:
    """Prompts only, padded on the left so every row's answer starts at the same position."""
    return PronunciationCollator(tokenizer, feature_extractor, with_answer=False, padding_side="left")


@torch.inference_mode()
def generate_from_batch(model, tokenizer, batch: dict[str, torch.Tensor], max_new_tokens: int = 256) -> list[str]:
    """Greedy answers for one collated batch (from :func:`generation_collator`), prompt stripped."""
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=[tokenizer.convert_tokens_to_ids(END), tokenizer.eos_token_id],
        pad_token_id=pad_token_id(tokenizer),
    )
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def generate_answers(
    model, tokenizer, feature_extractor, rows: list[dict[str, Any]], max_new_tokens: int = 256
) -> list[str]:
    """Greedy answers for one batch of rows (each with ``audio`` and ``text``), prompt stripped."""
    batch = generation_collator(tokenizer, feature_extractor)(rows)
    return generate_from_batch(model, tokenizer, batch, max_new_tokens)
