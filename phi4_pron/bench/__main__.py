"""``python -m phi4_pron.bench train|memory|eval|check|floor|job [--tiny] [--out DIR] [--only NAME ...]``: speed and
memory of the framework's own commands on a full-size random-weight model (see ``phi4_pron/bench/__init__.py``)."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from phi4_pron.bench import stand_in
from phi4_pron.bench.measure import compose, eval_row, free_memory, job_row, train_row, versions
from phi4_pron.config import REPO_ROOT

COLUMNS = {
    "train": [
        "label",
        "lora",
        "s_per_step",
        "epoch_s",
        "timed",
        "vs_original",
        "audio_cache_s",
        "warmup_s",
        "samples_per_epoch",
        "tokens_per_sample",
        "tflops",
        "peak_gib",
    ],
    "memory": ["preset", "lora", "extra", "peak_gib", "prepare_peak_gib", "card_gib", "free_share", "fits"],
    "eval": [
        "label",
        "recordings",
        "test_split_s",
        "vs_original",
        "generate_s",
        "wall_s",
        "max_new_tokens",
        "failed",
        "peak_gib",
    ],
    "check": ["label", "s_per_step", "losses"],
    "job": [
        "label",
        "total_s",
        "load_s",
        "eval_first_s",
        "compile_steps_s",
        "steps_s",
        "save_s",
        "eval_s",
        "final_s",
        "epoch_s",
        "projected_4_epochs_s",
        "steps_peak_gib",
        "eval_peak_gib",
    ],
    "floor": [
        "label",
        "epoch_s",
        "s_per_micro_batch",
        "micro_batches",
        "tokens_per_sample",
        "padding_share",
        "tflops",
        "peak_gib",
    ],
}
# the tiny model on a CPU: every row's code path runs, nothing is measured
TINY_BASE = ["experiment=smoke", "logger=none", "eval.every_epoch=false", "optim.effective_batch_size=64"]
TINY_AFTER = [
    "hardware.num_gpus=0",
    "hardware.bf16=false",
    "hardware.compile=false",
    "hardware.dataloader_num_workers=0",
]


def settings(mode: str):
    return OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "conf" / "bench" / f"{mode}.yaml"))


def row_overrides(spec: dict, row: dict) -> list[str]:
    """The settings' common overrides, the row's preset, ``lora=``, the row's own and ``extra`` ones."""
    preset = row.get("preset")
    return [
        *spec.get("common", []),
        *(spec.get("presets", {}).get(preset) or ([f"hardware={preset}"] if preset else [])),
        *([f"lora={row['lora']}"] if "lora" in row else []),
        *row.get("overrides", []),
        *row.get("extra", []),
    ]


def base_overrides(
    root: Path, tiny: bool, seconds: float | None = None, n: int = stand_in.SPLIT_RECORDINGS
) -> list[str]:
    """The stand-ins: the full-size checkpoint and the synthetic corpus (every recording ``seconds`` long if given);
    tiny: the smoke experiment (tiny model, the bundled corpus, or a 64-recording synthetic one of ``seconds``)."""
    name = f"corpus-{seconds:g}s-{n}" if seconds else "corpus"
    if tiny:
        return [*TINY_BASE, *([f"data.path={stand_in.ensure_corpus(root / name, 64, seconds)}"] if seconds else [])]
    model = stand_in.ensure_full_checkpoint(root / "phi4mm-random")
    corpus = stand_in.ensure_corpus(root / name, n, seconds=seconds)
    return [
        f"model.name_or_path={model}",
        "model.revision=null",
        f"data.path={corpus}",
        "logger=none",
        "eval.every_epoch=false",
    ]


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)  # a leftover run would be resumed
    return path


def run_train_rows(spec, rows, base, after, root, tiny, mode, keep=False, epoch=False) -> list[dict[str, Any]]:
    """Each row trained and timed (``epoch``: to the end of its first epoch, each row's ``warmup`` steps excepted)."""
    out = []
    for i, row in rows:
        warmup, steps = (1, 1) if tiny else (row.get("warmup", spec.get("warmup", 1)), row.get("steps", spec["steps"]))
        steps = -1 if epoch else steps
        overrides = [*base, *row_overrides(spec, row), *after]
        try:
            result = train_row(overrides, warmup, steps, fresh_dir(root / "runs" / f"{mode}-{i}"))
        except Exception as e:  # out of memory, above all: the row says so, the others still run
            if not _out_of_memory(e):
                raise
            free_memory()
            result = {"error": f"out of memory: {str(e)[:200]}", "peak_gib": math.inf}
        out.append({**row, **result, "row": i})
        report(out[-1])
        if not keep:  # checkpoints with optimizer states: tens of GB over the rows
            shutil.rmtree(root / "runs" / f"{mode}-{i}", ignore_errors=True)
    return out


def report(row: dict[str, Any]) -> None:
    """Print a finished row, and append it to ``$PHI4_PRON_BENCH_LOG`` if set (a killed run keeps its rows)."""
    line = json.dumps(row)
    print(line, flush=True)
    if log := os.environ.get("PHI4_PRON_BENCH_LOG"):
        with open(log, "a") as f:
            f.write(line + "\n")


def _out_of_memory(e: Exception) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def longest_answer_tokens(model_path: str, data_path: str, split: str, task: Any) -> dict[str, int]:
    """Per question, the longest reference answer of ``split`` in tokens (+1 for <|end|>): an upper bound on a trained
    model's answers, which random weights (that never say <|end|>) are capped at."""
    from phi4_pron.answer import questions_from_config
    from phi4_pron.data import load_split
    from phi4_pron.modeling import load_tokenizer_and_features

    tokenizer, _ = load_tokenizer_and_features(model_path)
    rows = load_split(data_path, split).remove_columns("audio").to_list()
    return {
        name: 1 + max(len(tokenizer(q.target(r), add_special_tokens=False)["input_ids"]) for r in rows)
        for name, q in questions_from_config(task).items()
    }


def answer_caps(cfg, tiny: bool) -> list[str]:
    """Overrides capping each question's answers at its longest reference answer (8 tokens on the tiny model)."""
    from phi4_pron.jobs.train import model_path

    longest = longest_answer_tokens(model_path(cfg.model), cfg.data.path, cfg.data.eval_split, cfg.task)
    if tiny:
        longest = dict.fromkeys(longest, 8)
    caps = [f"task.questions.{q}.max_new_tokens={n}" for q, n in longest.items()]
    return [*caps, f"eval.max_new_tokens={max(longest.values())}"]


def run_eval(spec, rows, base, after, root, tiny) -> list[dict[str, Any]]:
    overrides = [*base, *spec["train"], *after]
    trained = train_row(overrides, 0, 1, fresh_dir(root / "runs" / "eval-model"))
    run_dir = Path(trained["run_dir"])
    cfg = compose("train", overrides)
    caps = answer_caps(cfg, tiny)
    out = []
    for i, row in rows:
        overrides = [f"run_dir={run_dir}", *row["overrides"], *after, f"task={cfg.task.name}", *caps]
        result = eval_row(overrides, scale_to=stand_in.SPLIT_RECORDINGS)
        budgets = ", ".join(c.split("questions.")[1].replace(".max_new_tokens=", " ") for c in caps[:-1])
        out.append({**row, **result, "max_new_tokens": budgets, "row": i})
        report(out[-1])
    return out


def run_job_rows(spec, rows, base, after, root, tiny) -> list[dict[str, Any]]:
    """Each row: one epoch of the main job's shape, timed with its parts (:func:`measure.job_row`)."""
    out = []
    for name, row in rows:
        overrides = [*base, *row_overrides(spec, row), *after, *(["optim.effective_batch_size=16"] if tiny else [])]
        overrides += answer_caps(compose("train", overrides), tiny)
        warmup = 1 if tiny else spec["warmup"]
        result = job_row(overrides, warmup, fresh_dir(root / "runs" / f"job-{name}"), epochs=spec["epochs"])
        out.append({**row, **result, "row": name})
        report(out[-1])
        shutil.rmtree(root / "runs" / f"job-{name}", ignore_errors=True)
    return out


def table3_projection(results: list[dict[str, Any]], spec: dict) -> dict[str, Any]:
    """``experiment=paper_table3`` (every row's configuration, ``epochs`` each) projected from the measured rows: a
    configuration not measured takes the first measured row's figures, and is named."""
    key = f"projected_{spec['epochs']}_epochs_s"
    measured = {r["row"]: r[key] for r in results}
    if not measured:
        return {}
    first = results[0]["row"]
    assumed = [name for name in spec["rows"] if name not in measured]
    total = sum(measured.get(name, measured[first]) for name in spec["rows"])
    return {
        "paper_table3_projection_s": total,
        "paper_table3_projection": f"{total / 60:.1f} min for {len(spec['rows'])} jobs of {spec['epochs']} epochs",
        "measured": ", ".join(measured),
        "assumed_as_" + first: ", ".join(assumed) or "none",
    }


def compare(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-step losses' largest relative difference; the final adapters' and their updates' (from the checkpoint's
    speech-lora, where both start) relative difference."""
    import torch
    from safetensors.torch import load_file

    from phi4_pron.adapters import PEFT_PREFIX

    a, b = results
    record = json.loads((Path(b["run_dir"]) / "training_config.json").read_text())
    model_dir = Path(record["model"]["name_or_path"])
    loss_diff = max(abs(x - y) / abs(y) for x, y in zip(a["losses"], b["losses"], strict=True))
    start = {
        PEFT_PREFIX + k: v.float()
        for k, v in load_file(model_dir / "speech-lora" / "adapter_model.safetensors").items()
    }
    fa, fb = (load_file(Path(r["run_dir"]) / "final_model" / "adapter_model.safetensors") for r in (a, b))

    def norm(tensors) -> float:
        return math.sqrt(sum(float(t.float().pow(2).sum()) for t in tensors))

    keys = sorted(fb)
    return {
        "max_loss_rel_diff": loss_diff,
        "adapter_rel_diff": norm(fa[k] - fb[k] for k in keys) / norm(fb[k] for k in keys),
        "update_rel_diff": norm((fa[k].float() - start[k]) - (fb[k].float() - start[k]) for k in keys)
        / norm(fb[k].float() - start[k] for k in keys),
        "update_rel_size": norm(fb[k].float() - start[k] for k in keys) / norm(start[k] for k in keys),
        "dtype": str(next(iter(fb.values())).dtype),
        "torch": torch.__version__,
    }


def markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        if isinstance(v, list):
            return " ".join(fmt(x) for x in v) if v and not isinstance(v[0], str) else " ".join(v)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    lines += ["", "Commands (row: command):", ""] + [f"- {r['row']}: `{r['command']}`" for r in rows if "command" in r]
    return "\n".join(lines) + "\n"


def ratios(rows: list[dict[str, Any]], key: str) -> None:
    """Each row's ``key`` as a multiple of speed of the first (original) row of the same kind."""
    base = rows[0].get(key) if rows and "original" in rows[0].get("label", "").lower() else None
    for r in rows:
        if base and r.get(key) and "original" not in r.get("label", "").lower():
            r["vs_original"] = f"{base / r[key]:.1f}x faster"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("mode", choices=list(COLUMNS))
    p.add_argument("--tiny", action="store_true", help="the tiny model on the CPU: checks every path, measures nothing")
    p.add_argument("--only", nargs="*", help="names of the rows to run (conf/bench/<mode>.yaml)")
    p.add_argument("--epoch", action="store_true", help="train: time each row's whole first epoch, not its steps")
    p.add_argument("--root", type=Path, default=REPO_ROOT / "output" / "bench", help="stand-ins and run folders")
    p.add_argument("--out", type=Path, help="write <mode>.json and <mode>.md here")
    a = p.parse_args(argv)

    spec = settings(a.mode)
    unknown = sorted(set(a.only or ()) - set(spec["rows"]))
    if unknown:
        p.error(f"no row {unknown} in conf/bench/{a.mode}.yaml; its rows: {', '.join(spec['rows'])}")
    rows = [(name, r) for name, r in spec["rows"].items() if a.only is None or name in a.only]
    after = TINY_AFTER if a.tiny else []
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    summary: dict[str, Any] = {}
    if a.mode == "floor":
        from phi4_pron.bench.floor import run_floor

        results = run_floor(spec, rows, base_overrides(a.root, a.tiny), after)
    elif a.mode == "eval":
        results = run_eval(spec, rows, base_overrides(a.root, a.tiny), after, a.root, a.tiny)
        ratios(results, "test_split_s")
    elif a.mode == "job":
        results = run_job_rows(spec, rows, base_overrides(a.root, a.tiny), after, a.root, a.tiny)
        summary = table3_projection(results, spec)
    elif a.mode == "memory":
        base = base_overrides(a.root, a.tiny, seconds=spec["seconds"], n=spec["recordings"])
        results = run_train_rows(spec, rows, base, after, a.root, a.tiny, a.mode)
        for r in results:
            r["extra"] = " ".join(r.get("extra", []))
            r["peak_gib"] = max(r["peak_gib"], r.get("prepare_peak_gib", 0))
            r["free_share"] = 1 - r["peak_gib"] / r["card_gib"]
            r["fits"] = r["free_share"] >= 0.10
    else:
        base = base_overrides(a.root, a.tiny, seconds=spec.get("seconds"))
        check = a.mode == "check"
        results = run_train_rows(spec, rows, base, after, a.root, a.tiny, a.mode, keep=check, epoch=a.epoch)
        if a.mode == "train":
            ratios(results, "epoch_s")
        if check and len(results) == 2:
            summary = compare(results)
        for r in results if check else []:
            shutil.rmtree(r.get("run_dir", ""), ignore_errors=True)
    meta = {**versions(), "date": started, "argv": " ".join(sys.argv[1:] if argv is None else argv)}
    table = markdown(results, COLUMNS[a.mode])
    if summary:
        table += (
            "\n"
            + "\n".join(f"- {k}: {v:.3g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in summary.items())
            + "\n"
        )
    table = f"`python -m phi4_pron.bench {meta['argv']}` on {meta['device']}, {meta['date']}\n\n" + table
    print(table)
    if a.out:
        from phi4_pron.results import write_json_atomic, write_text_atomic

        write_json_atomic(a.out / f"{a.mode}.json", {"meta": meta, "rows": results, "summary": summary})
        write_text_atomic(a.out / f"{a.mode}.md", table)


if __name__ == "__main__":
    main()
