"""Typed schema of every config group, registered in Hydra's ConfigStore.

``conf/train.yaml`` starts its defaults list with ``train_schema``, so every composed config is checked
against :class:`TrainConfig`: an unknown key (``optim.lrr=1``) or a value of the wrong type
(``optim.epochs=three``) stops the run before anything is loaded, with Hydra naming the key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent

HUB_MODEL_ID = "microsoft/Phi-4-multimodal-instruct"
# The hub repo's main branch is the remote-code layout (model_type phi4mm); the native transformers classes load the
# converted files published as this revision (transformers' own tests load it so).
NATIVE_REVISION = "refs/pr/70"
# The speech and vision adapters' target modules, exactly as the published adapter_config.json writes them (PEFT
# full-matches a string against each module's name: the language model's attention and MLP projections).
LORA_TARGET_MODULES = r"model.layers.\d+.((self_attn.(qkv|o)_proj)|(mlp.(gate_up|down)_proj))"


class OnBad(str, Enum):
    error = "error"
    skip = "skip"


class LoraInit(str, Enum):
    fresh = "fresh"  # new adapter, B = 0
    pretrained = "pretrained"  # the checkpoint's own adapter folder (speech-lora/), trained further


@dataclass
class ModelConfig:
    name: str = MISSING
    name_or_path: str = MISSING  # hub id or local folder
    revision: str | None = NATIVE_REVISION  # hub ids only; a local folder is read as it is
    build_tiny: bool = False  # build the tiny random checkpoint at name_or_path when it is missing
    dtype: str = "bfloat16"
    max_length: int = 2048


@dataclass
class VisionLoraConfig:
    r: int = 256
    alpha: int = 512
    trainable: bool = False  # speech inputs never pass through it; it is recorded, not loaded


@dataclass
class SpeechLoraConfig:
    name: str = MISSING
    run_name: str = MISSING  # the run folder's name
    description: str = ""
    init: LoraInit = LoraInit.fresh
    adapter_subfolder: str = "speech-lora"  # read when init=pretrained
    r: int = 64
    alpha: int = 128
    dropout: float = 0.05
    target_modules: str = LORA_TARGET_MODULES  # fresh adapters; a pretrained one keeps its file's
    vision: VisionLoraConfig = field(default_factory=VisionLoraConfig)


@dataclass
class QuestionConfig:
    """One question per recording (phi4_pron.answer.Question)."""

    instruction: str = MISSING  # after the audio; {text} stands for the prompt sentence
    fields: list[str] = MISSING  # accuracy fluency prosodic total transcript phones mispronunciations
    control: str = ""  # plain text between <|user|> and the audio, e.g. <|APA|>
    keys: dict[str, str] = field(default_factory=dict)  # field -> JSON key where they differ
    max_new_tokens: int | None = None  # the longest answer generation lets it have (None: eval.max_new_tokens)


@dataclass
class TaskConfig:
    name: str = MISSING
    description: str = ""
    comparable_with_paper: bool = False  # may its WER/PER stand beside the paper's (no sentence in any prompt)?
    questions: dict[str, QuestionConfig] = MISSING


@dataclass
class OptimConfig:
    name: str = "adamw"
    optimizer: str = "adamw_torch_fused"  # a transformers OptimizerNames value
    lr: float = 2e-5
    epochs: float = 3
    effective_batch_size: int = 64  # per-device batch x devices x accumulation; accumulation is derived
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    max_steps: int = -1  # > 0 stops early (smoke tests)


@dataclass
class DataConfig:
    name: str = MISSING
    path: str = MISSING  # hub id, corpus release folder or save_to_disk folder
    revision: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    max_train_samples: int | None = None
    group_by_length: bool = True  # batch utterances of similar token length (audio + text) together: less padding
    # The feature extractor's window is 400 samples (25 ms); the audio encoder attends within 500 positions of 80 ms
    # (40 s): longer recordings take its unfolding path, which fails when batched with others.
    min_seconds: float = 0.025
    max_seconds: float = 40.0
    on_bad: OnBad = OnBad.error  # a bad utterance (audio or annotation): stop, listing all of them; or skip, counted


@dataclass
class HardwareConfig:
    name: str = MISSING
    num_gpus: int = 1  # 0 = CPU
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 32
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    checkpoint_audio_encoder: bool = False  # Unfreeze: trained audio layers recomputed in the backward
    # ... but the last N of them keep their activations: between the two in speed and memory (Phi-4 has 24 layers;
    # N at least that keeps them all)
    audio_layers_kept: int = 0
    compile: bool = False  # torch.compile each decoder and audio layer (one compile per run, then faster steps)
    # with compile: Inductor's C++ wrapper launches the compiled layers' kernels instead of its Python one (less host
    # time a step; a longer compile, needs a C++ compiler, as Inductor on a GPU does anyway)
    compile_cpp_wrapper: bool = False
    cache_audio_embeddings: bool = True  # frozen audio encoder run once per run, not at every step (audio_cache.py)
    bf16: bool = True
    dataloader_num_workers: int = 4
    # batches in pinned memory, copied to the GPU without the host waiting for it (accelerate's non_blocking): the
    # host can prepare the next step's batches while the GPU still runs the last one
    dataloader_pin_memory: bool = True


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "phi4-pron"
    entity: str | None = None
    mode: str = "online"  # online | offline | disabled
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    log_audio: bool = False  # each evaluation's answers table carries the recordings (the test split: ~300 MB)


@dataclass
class LoggerConfig:
    name: str = MISSING
    tensorboard: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    logging_steps: int = 10


@dataclass
class EvalConfig:
    every_epoch: bool = True  # evaluate after each epoch's checkpoint, inside training
    before_training: bool = False  # and once before the first step (eval/checkpoint-epoch-0: the paper's epoch 0)
    limit: int | None = None  # first N utterances of the eval split; None = all
    max_new_tokens: int = 256
    batch_size: int | None = None  # None = hardware.per_device_eval_batch_size
    compile: bool | None = None  # phi4_pron.evaluate: static cache + compiled decoding (GPU); None = hardware.compile
    bootstrap: int = 1000  # resamples of the recordings for every metric's 95% interval (seeded); 0: none


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    lora: SpeechLoraConfig = MISSING
    task: TaskConfig = MISSING
    optim: OptimConfig = MISSING
    data: DataConfig = MISSING
    hardware: HardwareConfig = MISSING
    logger: LoggerConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    experiment_name: str = "default"
    experiment_description: str = ""
    output_root: str = "output"
    run_name: str = "${lora.run_name}${if:${train_audio_encoder},_unfreeze,''}"
    cache_dir: str = "${oc.env:PHI4_PRON_CACHE,'~/.cache/phi4_pron'}"
    seed: int = 42
    # "Unfreeze" (the paper's Table 3): the audio encoder and its projection train with the LoRA (no audio cache)
    train_audio_encoder: bool = False
    resume: str = "auto"  # auto: continue from the run folder's newest checkpoint if any; true: must; false: never
    # the newest N checkpoints keep their optimizer state (resumable); older ones keep adapter and trainer state
    # (evaluable), which bounds the disk a run takes (Unfreeze's optimizer state is GBs an epoch); -1 keeps all
    keep_optimizer_states: int = 1


def unset(schema: type) -> type:
    """``schema`` with every field optional and None by default, nested groups alike: what a command line changes in
    settings that come from elsewhere (``evaluate`` takes a run's own data, hardware and logger settings)."""
    hints = typing.get_type_hints(schema)
    spec: list[tuple] = []
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            nested = unset(kind)
            spec.append((f.name, nested, field(default_factory=nested)))
        else:
            spec.append((f.name, typing.Optional[kind], None))  # noqa: UP045 (a type object, not an annotation)
    return dataclasses.make_dataclass(f"Unset{schema.__name__}", spec)


DataChanges, HardwareChanges, LoggerChanges = unset(DataConfig), unset(HardwareConfig), unset(LoggerConfig)


@dataclass
class EvaluateConfig:
    """``python -m phi4_pron.evaluate``: a run's checkpoint on the test split, or saved predictions re-scored."""

    run_dir: str | None = None
    checkpoint: str = "final_model"  # or checkpoint-epoch-N
    predictions: str | None = None  # re-score this predictions.jsonl; no model is loaded
    eval: EvalConfig = field(default_factory=EvalConfig)
    # data, hardware, logger: as the run was trained (its training_config.json), or a group option picked here
    # (data=mini); either way with the keys set here on top (data.path=..., hardware.per_device_eval_batch_size=16)
    data: DataChanges = field(default_factory=DataChanges)
    task: TaskConfig | None = None  # None: the questions saved with the adapter (task.json)
    hardware: HardwareChanges = field(default_factory=HardwareChanges)
    logger: LoggerChanges = field(default_factory=LoggerChanges)
    out_dir: str = "${eval_out_dir:${run_dir},${checkpoint},${predictions}}"


@dataclass
class AssessConfig:
    """``python -m phi4_pron.assess``: score one recording, or a folder of them, with a trained adapter."""

    model_path: str = MISSING  # a run's final_model/ (or checkpoint-epoch-N/)
    audio: str | None = None  # one recording (any format FFmpeg reads)
    text: str | None = None  # what the learner was asked to read
    audio_dir: str | None = None  # or a folder of recordings ...
    texts: str | None = None  # ... with a TSV of "<file name>\t<text>" lines
    out: str | None = None  # write JSON lines here (default: print)
    batch_size: int = 8
    max_new_tokens: int = 256


def _at_least(n: float):
    return (lambda v: v >= n, f"must be {n} or above")


def _above(n: float):
    return (lambda v: v > n, f"must be above {n}")


def _one_of(*options: str):
    return (lambda v: str(v).lower() in options, f"must be one of {', '.join(options)}")


DTYPES = ("bfloat16", "float16", "float32")
RESUME_MODES = ("auto", "true", "false", "force", "yes", "no", "1", "0")
# Every numeric and enumerated setting's range (a key absent from a command's schema, or None, is not checked). The
# optimizer and scheduler names are checked by TrainingArguments, before the model loads.
RULES = {
    "model.dtype": _one_of(*DTYPES),
    "model.max_length": _at_least(1),
    "lora.r": _at_least(1),
    "lora.alpha": _above(0),
    "lora.dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "lora.vision.r": _at_least(1),
    "lora.vision.alpha": _above(0),
    "optim.lr": _above(0),
    "optim.epochs": _above(0),
    "optim.effective_batch_size": _at_least(1),
    "optim.weight_decay": _at_least(0),
    "optim.warmup_ratio": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "optim.max_grad_norm": _at_least(0),
    "optim.max_steps": (lambda v: v == -1 or v >= 1, "must be -1 (no limit) or 1 or above"),
    "data.max_train_samples": _at_least(1),
    "hardware.num_gpus": _at_least(0),
    "hardware.per_device_train_batch_size": _at_least(1),
    "hardware.per_device_eval_batch_size": _at_least(1),
    "hardware.audio_layers_kept": _at_least(0),
    "hardware.dataloader_num_workers": _at_least(0),
    "logger.logging_steps": _at_least(1),
    "logger.wandb.mode": _one_of("online", "offline", "disabled"),
    "eval.limit": _at_least(1),
    "eval.max_new_tokens": _at_least(1),
    "eval.batch_size": _at_least(1),
    "eval.bootstrap": _at_least(0),
    "resume": _one_of(*RESUME_MODES),
    "seed": _at_least(0),
    "keep_optimizer_states": (lambda v: v == -1 or v >= 1, "must be -1 (keep all) or 1 or above"),
    "batch_size": _at_least(1),  # assess
    "max_new_tokens": _at_least(1),  # assess
}


class SettingError(ValueError):
    """A setting no run can use; the message names the key and what to do."""


def check_settings(cfg, schema: type) -> None:
    """What Hydra lets through: keys added with ``+key=value`` that the schema lacks (Hydra accepts them into a
    structured config), and values outside their range. Every problem at once, before anything loads."""
    from omegaconf.errors import ConfigKeyError

    settings = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"}
    try:
        OmegaConf.merge(OmegaConf.structured(schema), settings)
    except ConfigKeyError as e:
        raise SettingError(
            f"{e.full_key or e.key} is not a setting ({e.msg.splitlines()[0]}). Check its spelling: "
            "python -m phi4_pron.train --cfg job lists every setting."
        ) from None
    problems = [
        f"{key}={value!r} {what}"
        for key, (ok, what) in RULES.items()
        if (value := OmegaConf.select(cfg, key, default=None)) is not None and not ok(value)
    ]
    data = cfg.get("data")
    if (
        data is not None
        and None not in (data.get("min_seconds"), data.get("max_seconds"))
        and not 0 < data.min_seconds < data.max_seconds
    ):
        problems.append(
            f"data.min_seconds={data.min_seconds} and data.max_seconds={data.max_seconds}: need 0 < min < max"
        )
    if problems:
        raise SettingError("; ".join(problems) + ".")


def swept_keys() -> set[str]:
    """Keys that take several values in this sweep: ``a=1,2`` on the command line or ``hydra.sweeper.params``."""
    import sys

    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = set(HydraConfig.get().sweeper.get("params") or {}) if HydraConfig.initialized() else set()
    args = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    try:
        keys |= {o.get_key_element() for o in OverridesParser.create().parse_overrides(args) if o.is_sweep_override()}
    except Exception:  # not Hydra overrides (e.g. under pytest): only the config's sweeper params count
        pass
    return {k.lstrip("+~") for k in keys}


def job_dirname(run_name: str, task_overrides: list[str]) -> str:
    """``paper_r64`` or ``paper_r64,optim.lr=1e-05``: the LoRA config, then the job's other swept values."""
    swept = swept_keys() - {"lora", "experiment", "train_audio_encoder"}  # run_name names these
    return ",".join([run_name, *(o for o in task_overrides if o.split("=", 1)[0].lstrip("+~") in swept)])


def _eval_out_dir(run_dir: str | None, checkpoint: str, predictions: str | None) -> str:
    if predictions:  # beside the originals, never over them
        return str(Path(predictions).expanduser().parent / "rescored")
    if not run_dir:
        return "."
    return str(Path(run_dir) / "eval" / checkpoint)


def register_configs() -> None:
    """Register the schema and the ``repo_root`` resolver; safe to call more than once."""
    if not OmegaConf.has_resolver("repo_root"):
        OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))
    if not OmegaConf.has_resolver("if"):
        OmegaConf.register_new_resolver("if", lambda cond, yes, no="": yes if cond else no)
    if not OmegaConf.has_resolver("job_dirname"):
        OmegaConf.register_new_resolver("job_dirname", job_dirname)
    if not OmegaConf.has_resolver("eval_out_dir"):
        OmegaConf.register_new_resolver("eval_out_dir", _eval_out_dir)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="assess_schema", node=AssessConfig)


register_configs()
