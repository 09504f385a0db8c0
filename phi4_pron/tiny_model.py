"""Build a tiny random-weight Phi-4-multimodal checkpoint offline, laid out as the published one.

The folder copies ``microsoft/Phi-4-multimodal-instruct`` at its native revision (``refs/pr/70``), not what this
project would find convenient:

- ``config.json`` (``model_type: phi4_multimodal``) + sharded ``model-0000N-of-0000M.safetensors`` with their index,
  ``generation_config.json``, the feature extractor's ``preprocessor_config.json``;
- a tokenizer with the real special tokens and roles: ``<|endoftext|>`` bos/eos/pad/unk, ``<|end|>``, ``<|user|>``,
  ``<|assistant|>``, ``<|system|>``, image ``<|endoftext10|>`` and audio ``<|endoftext11|>`` named in
  ``extra_special_tokens``; ``eos_token_id`` = [endoftext, end] as in the real config;
- ``speech-lora/`` (r 320 / alpha 640 / dropout 0.01) and ``vision-lora/`` (r 256 / alpha 512 / dropout 0.0) in the
  conversion's layout: tensors named ``model.layers.N.<module>.lora_A.weight`` (no ``base_model.model.`` prefix) and
  an ``adapter_config.json`` whose ``target_modules`` is the published regex.

``initializer_range`` is 0.5 (transformers' default 0.02 gives nearly flat logits that a LoRA on a frozen 64-wide
model cannot sharpen, so nothing could be shown to learn), and the ``<|endoftext|>`` embedding row (also the pad
token, which ``nn.Embedding`` zeroes at init) is random like the others: with tied, frozen embeddings a zero row
gives EOS a logit of 0 that no LoRA can make the largest, so answers could never learn to end as the real model's do.
Everything is seeded: two builds give the same weights.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from phi4_pron.config import LORA_TARGET_MODULES
from phi4_pron.results import atomic_folder

# Bump when the builder changes: the cache folder name carries it, so a stale build is never reused.
TINY_MODEL_VERSION = "v5"
TINY_MARKER = "TINY_MODEL.json"  # what was built, and how; a folder without it was not built here

BOS_EOS = "<|endoftext|>"
IMAGE_TOKEN, AUDIO_TOKEN = "<|endoftext10|>", "<|endoftext11|>"
# In the real vocabulary's order (ids 199999, 200010, 200011, 200019-200022).
SPECIAL_TOKENS = [BOS_EOS, IMAGE_TOKEN, AUDIO_TOKEN, "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]


def _training_text(corpus_dir: Path | None) -> list[str]:
    """Text the tiny BPE is trained on: the tasks' questions (``conf/task/``: control text, instruction, JSON keys;
    not the files' comments or other settings, so editing those never changes the tokenizer), the answer formats'
    keys and the corpus's words and phones, so that prompts take about as many tokens as the real tokenizer gives
    them."""
    from omegaconf import OmegaConf

    tasks = Path(__file__).resolve().parent.parent / "conf" / "task"
    lines = []
    for f in sorted(tasks.glob("*.yaml")):
        for q in OmegaConf.to_container(OmegaConf.load(f))["questions"].values():
            lines += [
                q.get("control") or "",
                *q["instruction"].splitlines(),
                *q["fields"],
                *(q.get("keys") or {}).values(),
            ]
    lines += [
        '{"accuracy": 8, "fluency": 9, "prosodic": 7, "total": 8}',
        '{"word_transcript": "", "phoneme_transcript": ""}',
        '{"transcript": "", "phones": "", "mispronunciations": []}',
        "Rate the pronunciation of the audio. Transcribe the audio utterance. <|APA|> <|MDD|>",
    ]
    if corpus_dir is not None and (corpus_dir / "resource" / "lexicon.txt").exists():
        lines += (corpus_dir / "resource" / "lexicon.txt").read_text().splitlines()
    return lines


def build_tokenizer(corpus_dir: Path | None = None, vocab_size: int = 2048, extra_text: Sequence[str] = ()):
    """A byte-level BPE tokenizer (``vocab_size`` tokens) with Phi-4-multimodal's special tokens and roles."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*_training_text(corpus_dir), *extra_text], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_EOS,
        eos_token=BOS_EOS,
        pad_token=BOS_EOS,
        unk_token=BOS_EOS,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        extra_special_tokens={"image_token": IMAGE_TOKEN, "audio_token": AUDIO_TOKEN},
        model_max_length=131072,
    )


def build_config(tokenizer):
    """A ~0.5M-parameter Phi4MultimodalConfig with the real model's structure."""
    from transformers import Phi4MultimodalConfig

    eos_id = tokenizer.convert_tokens_to_ids(BOS_EOS)
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    return Phi4MultimodalConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75},
        initializer_range=0.5,
        bos_token_id=eos_id,
        eos_token_id=[eos_id, end_id],
        pad_token_id=eos_id,
        tie_word_embeddings=True,
        audio_config={
            "hidden_size": 64,
            "intermediate_size": 64,
            "num_blocks": 2,
            "num_attention_heads": 4,
            "ext_pw_out_channel": 64,
            "depthwise_separable_out_channel": 64,
            "nemo_conv_channels": 64,
            "audio_token_id": tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        },
    )


def save_converted_adapter(model, out_dir: Path, r: int, alpha: int, dropout: float, seed: int) -> None:
    """A LoRA adapter with non-zero weights, written as the published conversion writes one.

    Tensors ``model.layers.N.<module>.lora_{A,B}.weight`` (the conversion strips the original ``.speech`` /
    ``.vision`` adapter names and adds no PEFT prefix); ``adapter_config.json`` with the published regex.
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGET_MODULES)
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    state = get_peft_model_state_dict(peft_model)
    peft_model.unload()  # restore the plain base modules
    out_dir.mkdir(parents=True)
    prefix = "base_model.model."
    save_file({k.removeprefix(prefix): v.contiguous() for k, v in state.items()}, out_dir / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": LORA_TARGET_MODULES,
        "bias": "none",
        "inference_mode": True,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _own_random_state():
    """The CPU's random state, and the current GPU's where there is one, restored on exit: ``torch.manual_seed``
    seeds every device (a GPU not yet initialised when it first is), so the GPU's is forked too."""
    if not torch.cuda.is_available():
        return torch.random.fork_rng(devices=[])
    torch.cuda.init()
    return torch.random.fork_rng(devices=[torch.cuda.current_device()])


def write_checkpoint(
    out_dir: str | Path,
    tokenizer,
    config,
    *,
    seed: int,
    marker: dict,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    max_shard_size: str = "1MB",
) -> Path:
    """Write a random-weight checkpoint of ``config`` to ``out_dir`` in the published layout (atomically: a
    half-built folder never appears): sharded weights + index, tokenizer, feature extractor, generation config,
    ``speech-lora/`` and ``vision-lora/``, and ``marker`` as ``TINY_MODEL.json`` (what was built, and how).

    The caller's random state is left as it was: a run that builds the checkpoint first (a fresh cache) trains
    exactly as one that finds it built (before, a fresh machine's first ``make smoke`` trained on from the
    builder's random state and answered 0/8 recordings parseably, the next run 8/8)."""
    from transformers import GenerationConfig, Phi4MultimodalFeatureExtractor, Phi4MultimodalForCausalLM

    previous = torch.get_default_dtype()
    with _own_random_state(), atomic_folder(out_dir) as tmp:
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = Phi4MultimodalForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(previous)
        with torch.no_grad():  # nn.Embedding zeroes its padding row (pad = <|endoftext|>); the real row is trained
            model.get_input_embeddings().weight[config.pad_token_id].normal_(0.0, config.initializer_range)
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        )
        # every process that builds it writes it whole: under torchrun, transformers writes weights on rank 0 only,
        # and another rank's folder without them could be the one that lands first
        model.should_save_on_this_rank = lambda is_main_process: True
        model.save_pretrained(tmp, max_shard_size=max_shard_size)  # sharded with an index, as the real one
        tokenizer.save_pretrained(tmp)
        Phi4MultimodalFeatureExtractor().save_pretrained(tmp)
        save_converted_adapter(model, tmp / "speech-lora", r=320, alpha=640, dropout=0.01, seed=seed + 1)
        save_converted_adapter(model, tmp / "vision-lora", r=256, alpha=512, dropout=0.0, seed=seed + 2)
        (tmp / TINY_MARKER).write_text(json.dumps({**marker, "seed": seed}))
    return Path(out_dir)


def build_tiny_checkpoint(out_dir: str | Path, corpus_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Write the tiny checkpoint to ``out_dir`` (atomically: a half-built folder never appears)."""
    tokenizer = build_tokenizer(Path(corpus_dir) if corpus_dir else None)
    return write_checkpoint(
        out_dir, tokenizer, build_config(tokenizer), seed=seed, marker={"version": TINY_MODEL_VERSION}
    )


def ensure_tiny_checkpoint(out_dir: str | Path, corpus_dir: str | Path | None = None) -> Path:
    """Return ``out_dir``, building the tiny checkpoint there first if it is missing."""
    out_dir = Path(out_dir).expanduser()
    if not (out_dir / TINY_MARKER).exists():
        build_tiny_checkpoint(out_dir, corpus_dir)
    return out_dir
