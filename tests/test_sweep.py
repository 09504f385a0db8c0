"""Sweeps through the real entrypoint, W&B grouping, resuming an interrupted run, and a failing sweep job."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, run_cli


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "s"
    run_cli(["-m", "phi4_pron.train", "experiment=smoke_table3", f"hydra.sweep.dir={out}"])
    return out


JOBS = ("pretrained_r320", "pretrained_r320_unfreeze", "paper_r64", "paper_r64_unfreeze")


@pytest.mark.slow
def test_sweep_runs_the_papers_table3_grid_into_complete_job_folders(sweep_dir):
    settings = {}
    for job in JOBS:
        tc = json.loads((sweep_dir / job / "training_config.json").read_text())
        lora = tc["speech_lora"]
        settings[job] = (lora["r"], lora["alpha"], lora["dropout"], tc["train_audio_encoder"])
        assert (sweep_dir / job / "final_model" / "adapter_model.safetensors").exists()
        assert (sweep_dir / job / "checkpoint-epoch-2").is_dir() and (
            sweep_dir / job / "eval" / "checkpoint-epoch-0"
        ).is_dir()
        assert tc["task"]["name"] == "paper" and tc["audio_embeddings_cached"] is not tc["train_audio_encoder"]
    assert settings == {
        "pretrained_r320": (320, 640, 0.01, False),
        "pretrained_r320_unfreeze": (320, 640, 0.01, True),
        "paper_r64": (64, 128, 0.05, False),
        "paper_r64_unfreeze": (64, 128, 0.05, True),
    }
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert [j["status"] for j in summary["jobs"]] == ["completed"] * 4 and summary["failed"] == []


@pytest.mark.slow
def test_unfreeze_trains_the_audio_encoder_and_its_weights_reload(sweep_dir, tiny_model_dir):
    """Unfreeze saves the trained audio encoder + projection with the adapter; inference loads exactly those."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from phi4_pron.inference import load_adapter_for_inference

    saved = load_file(sweep_dir / "paper_r64_unfreeze" / "final_model" / "adapter_model.safetensors")
    audio = {k: v for k, v in saved.items() if ".audio_embed." in k}
    assert any(".encoder." in k for k in audio) and any("up_proj_for_speech" in k for k in audio)
    assert not any(
        ".audio_embed." in k for k in load_file(sweep_dir / "paper_r64" / "final_model" / "adapter_model.safetensors")
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()  # parameters and buffers
    merged, *_ = load_adapter_for_inference(sweep_dir / "paper_r64_unfreeze" / "final_model", merge=True)
    loaded = merged.state_dict()
    changed = 0
    for key, value in audio.items():
        name = key.removeprefix("base_model.model.")
        assert torch.equal(loaded[name].detach(), value), name  # the trained weights are the ones that run
        changed += not torch.equal(base[name].detach(), value)
    assert changed > len(audio) // 2  # training moved them


@pytest.mark.slow
def test_sweep_has_one_wandb_group_and_a_table3(sweep_dir):
    group = f"sweep-{sweep_dir.parent.name}-{sweep_dir.name}"
    runs = sorted(sweep_dir.glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 4
    for run in runs:  # the group and the job's name are in W&B's own run record
        data = run.read_bytes()
        assert group.encode() in data and run.parents[2].name.encode() in data
    table = (sweep_dir / "table3.md").read_text()
    assert table.count("checkpoint-epoch-") == 4 * 3 and all(f"| {job} |" in table for job in JOBS)
    assert "| paper (Ahn & Nam) | | paper | no training | 0 | 2500 | | -0.041 |" in table
    assert "| paper (Ahn & Nam) | | paper | Unfreeze | 2 | 2500 | | 0.624 |" in table
    assert "(*)" not in table  # the paper's task: every row comparable


@pytest.mark.slow
def test_other_swept_values_name_the_job_folder(tmp_path):
    out = tmp_path / "s"
    run_cli(
        [
            "-m",
            "phi4_pron.train",
            "-m",
            "experiment=smoke",
            "lora=r64",
            "optim.lr=1e-3,3e-3",
            "optim.max_steps=2",
            "eval.every_epoch=false",
            "logger=none",
            f"hydra.sweep.dir={out}",
        ]
    )
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "paper_r64,optim.lr=0.001",
        "paper_r64,optim.lr=0.003",
    ]


@pytest.mark.slow
def test_a_failing_job_is_reported_and_the_others_finish(tmp_path):
    out = tmp_path / "s"
    proc = run_cli(
        [
            "-m",
            "phi4_pron.train",
            "-m",
            "experiment=smoke",
            "lora=r64",
            "optim.max_steps=2",
            "eval.every_epoch=false",
            "logger=none",
            f"data.path=/does/not/exist,{REPO / 'data/speechocean762-mini'}",
            f"hydra.sweep.dir={out}",
        ],
        check=False,
    )
    assert proc.returncode != 0  # Hydra re-raises the failure once the sweep is over
    summary = json.loads((out / "sweep_summary.json").read_text())
    assert [j["status"] for j in summary["jobs"]] == ["failed", "completed"] and summary["failed"] == [0]
    assert "DataError" in summary["jobs"][0]["error"]
    assert (out / summary["jobs"][1]["run_dir"] / "final_model" / "adapter_model.safetensors").exists()
    assert "sweep job #0" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_end(tmp_path):
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "phi4_pron.train",
        "experiment=smoke",
        "lora=r64",
        "eval.every_epoch=false",
        "logger=tensorboard",
        f"output_root={out}",
    ]
    run_dir = out / "paper_r64"
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + 300
    while not (run_dir / "checkpoint-epoch-1" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "final_model").exists() and not (run_dir / "checkpoint-epoch-3").exists()

    run_cli(args[1:] + ["resume=true"])
    state = json.loads((run_dir / "checkpoint-epoch-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 48 and round(state["epoch"]) == 3  # 32 recordings x 2 questions / 4 per step x 3
    logged_steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert logged_steps[-1] == 48
    assert (run_dir / "final_model" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_resume_true_without_checkpoint_is_refused(tmp_path):
    proc = run_cli(
        ["-m", "phi4_pron.train", "experiment=smoke", "logger=none", "resume=true", f"output_root={tmp_path}"],
        check=False,
    )
    assert proc.returncode != 0 and "has no complete checkpoint-epoch-N folder to resume from" in proc.stderr


@pytest.mark.slow
def test_a_finished_job_releases_its_model(tmp_path):
    """Nothing of a job's model survives it in the process, so the next sweep job starts clean."""
    code = f"""
import gc, sys
from hydra.core.hydra_config import HydraConfig
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
import phi4_pron.config
from phi4_pron.jobs.train import run_training
from peft import PeftModel
with initialize_config_dir(config_dir="{REPO / "conf"}", version_base="1.3"):
    cfg = compose("train", overrides=["experiment=smoke", "optim.max_steps=2", "eval.every_epoch=false",
                                      "logger=none", "hydra.run.dir={tmp_path}"], return_hydra_config=True)
with open_dict(cfg):
    cfg.hydra.runtime.output_dir = "{tmp_path}"
HydraConfig.instance().set_config(cfg)
with open_dict(cfg):
    del cfg["hydra"]
run_training(cfg)
gc.collect()
alive = [o for o in gc.get_objects() if isinstance(o, PeftModel)]
print("ALIVE", len(alive))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "ALIVE 0" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def _browser() -> str | None:
    import shutil

    return next(filter(None, map(shutil.which, ("chromium-headless-shell", "chromium", "google-chrome"))), None)


@pytest.mark.slow
def test_report_gives_intervals_paired_tests_and_a_page_a_browser_renders(sweep_dir):
    proc = run_cli(["-m", "phi4_pron.report", str(sweep_dir), "--compare", "--html", "--resamples", "200"])
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| paper_r64 | checkpoint-epoch-2")]
    assert len(rows) == 1 and rows[0].count(" [") >= 3  # WER, PER, MDD at least: values with their intervals
    assert "Intervals: 95%, bootstrap over the recordings" in proc.stdout
    assert proc.stdout.count("B - A on 4 recordings (paired bootstrap") == 6 * 3  # 4 runs: 6 pairs, 3 checkpoints
    page = sweep_dir / "report.html"
    assert "<table>" in page.read_text() and "http" not in page.read_text().replace("http-equiv", "")
    browser = _browser()
    if browser is None:
        pytest.skip("no headless Chromium here (apt-get install chromium-headless-shell); .ci/run installs it")
    dom = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    decoded = re.search(r'data-images-decoded="(\d+)/(\d+)"', dom)
    assert decoded and decoded[1] == decoded[2] and int(decoded[2]) == 1 + 4 * 4  # epoch plots + 4 grids per run
    assert dom.count("<tr") > 20 and "Table 3" in dom


@pytest.mark.slow
def test_a_seed_sweep_is_pooled_and_each_evaluation_is_a_wandb_table(tmp_path):
    out = tmp_path / "s"
    tiny = ["experiment=smoke", "lora=r64", "optim.max_steps=2", "data.max_train_samples=4", "eval.limit=3"]
    run_cli(["-m", "phi4_pron.train", "-m", *tiny, "seed=1,2", "logger.wandb.log_audio=true", f"hydra.sweep.dir={out}"])
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["paper_r64,seed=1", "paper_r64,seed=2"]
    table = (out / "table3.md").read_text()
    assert "Runs that differ only in their seed" in table
    pooled = [line for line in table.splitlines() if line.startswith("| paper_r64 | checkpoint-epoch-")]
    assert pooled and all(" | 2 | " in line and " ± " in line for line in pooled)
    report = run_cli(["-m", "phi4_pron.report", str(out), "--resamples", "100"]).stdout
    assert "Paired tests, each pair of runs at its newest common checkpoint" in report
    assert "| paper_r64,seed=1 | paper_r64,seed=2 | checkpoint-epoch-1 | 3 |" in report
    files = sorted((out / "paper_r64,seed=1").glob("wandb/offline-run-*/files/media/table/eval/answers_*.table.json"))
    assert len(files) == len(list((out / "paper_r64,seed=1" / "eval").iterdir()))  # one table per evaluation
    answers = json.loads(files[-1].read_text())
    columns = answers["columns"]
    assert {"id", "prompt text", "human total", "predicted total", "mispronounced (human)", "status", "audio"} <= set(
        columns
    )
    assert len(answers["data"]) == 3
    row = dict(zip(columns, answers["data"][0], strict=True))
    assert row["status"] in ("answered", "unparseable") and 0 <= row["human total"] <= 10 and row["audio"]
