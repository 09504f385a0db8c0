"""The job behind ``python -m phi4_pron.check``: a pre-flight with the real files, run once on a new machine.

Checks the corpus at ``data.path`` as training does (layout, every annotation and recording header of both splits),
loads tokenizer, feature extractor, model and speech adapter exactly as ``phi4_pron.train`` does
(:func:`phi4_pron.jobs.train.load_model`), then runs one forward + backward pass on two of the corpus's test
recordings (every question of the task) and one greedy answer per question, looks for the C++ compiler where the
preset launches compiled layers from C++, and prints a checklist: what each step found, and what to do where one fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig


class Checklist:
    """Runs named steps in order; a failed step is recorded with its advice and stops the steps that need it."""

    def __init__(self) -> None:
        self.failed = False

    def step(self, name: str, fn: Callable[[], str], advice: str) -> Any:
        if self.failed:
            print(f"[skip] {name}")
            return None
        try:
            found = fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported, with what to do
            self.failed = True
            print(f"[FAIL] {name}: {type(e).__name__}: {e}\n       -> {advice}")
            return None
        print(f"[ ok ] {name}: {found}")
        return found


def run_check(cfg: DictConfig) -> bool:
    import torch

    from phi4_pron.answer import questions_from_config
    from phi4_pron.collator import PronunciationCollator
    from phi4_pron.data import expand_questions, load_checked
    from phi4_pron.fast.layers import cpp_compiler
    from phi4_pron.inference import generate_answers
    from phi4_pron.jobs.train import load_model, model_path
    from phi4_pron.modeling import check_native_layout, download_hint

    device = "cuda" if torch.cuda.is_available() and cfg.hardware.num_gpus > 0 else "cpu"
    state: dict[str, Any] = {}
    check = Checklist()

    def data() -> str:
        found = []
        for split, limit in ((cfg.data.train_split, cfg.data.max_train_samples), (cfg.data.eval_split, cfg.eval.limit)):
            ds, problems = load_checked(cfg.data, split, limit)  # data.on_bad=error: every problem raised, named
            state["recordings"] = ds  # the evaluation split's, for the steps below
            skipped = f", {len(problems)} left out (data.on_bad=skip)" if problems else ""
            found.append(f"{split}: {len(ds)} utterances{skipped}")
        return f"{cfg.data.path}: " + "; ".join(found)

    def layout() -> str:
        path = model_path(cfg.model)
        config = check_native_layout(path, cfg.model.revision)
        state["path"] = path
        return f"{path} is the native layout (model_type {config['model_type']})"

    def model() -> str:
        state["model"], state["tok"], state["fe"], _, state["n"] = load_model(cfg, device)
        tok = state["tok"]
        return f"loaded on {device}; audio token {tok.audio_token!r} (id {tok.audio_token_id}) matches the config"

    def adapter() -> str:
        summary = state["model"].peft_config["default"]
        origin = f"{state['n']} tensors loaded from {cfg.lora.adapter_subfolder}/" if state["n"] else "fresh"
        return f"r {summary.r}, alpha {summary.lora_alpha}: {origin}"

    def step() -> str:
        questions = questions_from_config(cfg.task)
        rows = expand_questions(state["recordings"].select(range(min(2, len(state["recordings"])))), questions)
        state["questions"], state["rows"] = questions, rows
        collator = PronunciationCollator(state["tok"], state["fe"], questions, max_length=cfg.model.max_length)
        batch = {k: v.to(device) for k, v in collator(list(rows)).items()}
        m = state["model"]
        m.train()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda" and cfg.hardware.bf16):
            loss = m(**batch).loss
        loss.backward()
        grads = [p.grad.norm().item() for n, p in m.named_parameters() if p.requires_grad and p.grad is not None]
        m.zero_grad(set_to_none=True)
        if not math.isfinite(loss.item()) or not grads or not any(g > 0 for g in grads):
            raise RuntimeError(f"loss {loss.item()}, {len(grads)} trainable tensors with a gradient")
        return f"{len(rows)} samples, loss {loss.item():.3f}, gradients on {len(grads)} trainable tensors"

    def generate() -> str:
        m = state["model"].eval()
        rows = [r for r in state["rows"] if r["id"] == state["rows"][0]["id"]]
        answers = generate_answers(m, state["tok"], state["fe"], state["questions"], rows, max_new_tokens=32)
        return "; ".join(f"{r['question']}: {a[:60]!r}" for r, a in zip(rows, answers, strict=True))

    def compiler() -> str:
        found = cpp_compiler(cfg.hardware)  # raises, naming what to do, where none is found
        if found is None:
            return "not needed (hardware.compile_cpp_wrapper is off)"
        return f"{found} builds the compiled layers' kernel launchers (hardware.compile_cpp_wrapper)"

    print(
        f"phi4_pron.check: model={cfg.model.name_or_path} revision={cfg.model.revision} lora={cfg.lora.name} "
        f"task={cfg.task.name}"
    )
    check.step("data", data, "fix or remove the utterances named (or data.on_bad=skip), or point data.path elsewhere")
    check.step("checkpoint layout", layout, "download the native files: " + download_hint())
    check.step(
        "tokenizer, feature extractor, model",
        model,
        "load tokenizer and model from one native checkpoint folder (see the message above)",
    )
    check.step("speech adapter", adapter, "for lora=r320 the checkpoint needs speech-lora/ with all its tensors")
    check.step(
        "forward + backward on 2 test recordings",
        step,
        "a bad loss or no gradient: report it with this output (python -m phi4_pron.check ...)",
    )
    check.step("generation", generate, "generation failed: check the GPU memory and transformers version")
    check.step("C++ compiler", compiler, "install g++ or train with hardware.compile_cpp_wrapper=false")
    print("all checks passed" if not check.failed else "some checks failed: see [FAIL] above")
    return not check.failed
