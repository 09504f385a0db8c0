"""``python -m phi4_pron.evaluate`` end to end on the tiny model and the bundled corpus."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import MINI, run_cli


@pytest.fixture(scope="module")
def run_dir(smoke_runs):
    return smoke_runs("r64")


@pytest.mark.slow
def test_evaluate_writes_every_file_and_the_table(run_dir):
    run_cli(["-m", "phi4_pron.evaluate", f"run_dir={run_dir}", "eval.limit=5", "eval.max_new_tokens=12"])
    out = run_dir / "eval" / "final_model"
    metrics = json.loads((out / "metrics.json").read_text())  # strict JSON: NaN written as null
    assert metrics["n_utterances"] == 5 and metrics["checkpoint"] == "final_model"
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 5 and {"id", "raw", "parsed", "reference", "error"} <= set(records[0])
    for aspect in ("accuracy", "fluency", "prosodic", "total"):
        assert (out / f"grid_{aspect}.png").read_bytes()[:4] == b"\x89PNG"
    assert set(records[0]["raw"]) == {"apa", "mdd"} and metrics["task"] == "paper"  # both questions, one record
    table = (run_dir / "table3.md").read_text()
    assert "| final_model | paper | LoRA |" in table and "checkpoint-epoch-3" in table
    assert "| paper (Ahn & Nam) | | paper | LoRA | 3 | 2500 | | 0.656 | 0.727 | 0.711 | 0.675 | 0.140 |" in table
    assert (run_dir / "table3.csv").read_text().startswith("run,checkpoint,task,comparable,setting,epoch")


@pytest.mark.slow  # a subprocess
def test_rescoring_saved_predictions_needs_no_model(tmp_path):
    ref = {
        "accuracy": 8,
        "fluency": 8,
        "prosodic": 8,
        "total": 8,
        "text": "WE CALL",
        "phones": "W IY K AO L",
        "canonical": ["W", "IY1", "K", "AO1", "L"],
        "mispronounced": [False] * 5,
    }
    answers = [
        {
            "apa": '{"accuracy": 8, "fluency": 7,}',
            "mdd": "{'word_transcript': 'WE CALL', 'phoneme_transcript': 'W IY'}",
        },
        {"apa": "garbage", "mdd": "garbage"},
    ]
    lines = [json.dumps({"id": str(i), "raw": a, "parsed": None, "reference": ref}) for i, a in enumerate(answers)]
    (tmp_path / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "metrics.json").write_text('{"untouched": true}')
    proc = run_cli(["-m", "phi4_pron.evaluate", f"predictions={tmp_path / 'predictions.jsonl'}"], check=False)
    assert proc.returncode != 0 and "task=paper or task=joint" in proc.stderr  # which questions were they?
    run_cli(["-m", "phi4_pron.evaluate", f"predictions={tmp_path / 'predictions.jsonl'}", "task=paper"])
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"untouched": True}  # written beside, not over
    metrics = json.loads((tmp_path / "rescored" / "metrics.json").read_text())
    assert metrics["n_unparseable"] == 1 and metrics["n_accuracy"] == 1 and metrics["pcc_accuracy"] is None
    assert metrics["wer"] == pytest.approx(2 / 4)  # the garbage answer: both words deleted
    assert metrics["per"] == pytest.approx((3 + 5) / 10)  # W IY for W IY K AO L, then all 5 deleted


@pytest.mark.slow
def test_a_broken_recording_is_counted_not_fatal(run_dir, tmp_path):
    """Also through DataLoader workers (the GPU presets' way): the failed batch is retried row by row."""
    from phi4_pron.data import load_split

    corpus = tmp_path / "corpus"
    shutil.copytree(MINI, corpus)
    utt, rel = (corpus / "test" / "wav.scp").read_text().splitlines()[1].split()
    (corpus / rel).write_bytes(b"RIFF garbage")
    run_cli(
        [
            "-m",
            "phi4_pron.evaluate",
            f"run_dir={run_dir}",
            f"data.path={corpus}",  # on top of the run's own data settings
            "eval.limit=4",
            "eval.max_new_tokens=8",
            "checkpoint=checkpoint-epoch-1",
            "hardware=cpu",
            "hardware.dataloader_num_workers=2",
            f"out_dir={tmp_path / 'ev'}",  # leave the run's own per-epoch results alone
        ]
    )
    out = tmp_path / "ev"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_utterances"] == 4 and metrics["n_failed"] == 1
    records = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == load_split(str(corpus), "test")["id"][:4]  # the split's order, kept
    failed = [r for r in records if r["error"]]
    assert len(failed) == 1 and failed[0]["id"] == utt and "cannot decode" in failed[0]["error"]


def test_evaluate_takes_the_runs_settings_with_the_command_lines_keys_on_top():
    """data, hardware and logger: the run's own (training_config.json), or the option picked (hardware=cpu) over the
    schema's defaults; keys set on the command line on top either way, checked against the schema."""
    from conftest import compose
    from omegaconf import OmegaConf

    from phi4_pron.config import HardwareConfig, LoggerConfig
    from phi4_pron.jobs.evaluate import settings

    trained = OmegaConf.create(
        {
            "hardware": {"name": "h100", "num_gpus": 1, "per_device_eval_batch_size": 256, "compile": True},
            "logger": {"name": "wandb", "tensorboard": True, "wandb": {"enabled": True, "mode": "online"}},
        }
    )
    cfg = compose(["hardware.per_device_eval_batch_size=16", "logger.wandb.mode=offline"], "evaluate")
    hardware = settings(cfg.hardware, trained.hardware, HardwareConfig)
    assert (hardware.name, hardware.per_device_eval_batch_size, hardware.compile) == ("h100", 16, True)
    logger = settings(cfg.logger, trained.logger, LoggerConfig)
    assert (logger.wandb.enabled, logger.wandb.mode, logger.tensorboard) == (True, "offline", True)
    picked = settings(compose(["hardware=cpu", "hardware.per_device_eval_batch_size=2"], "evaluate").hardware,
                      trained.hardware, HardwareConfig)  # fmt: skip
    assert (picked.name, picked.num_gpus, picked.per_device_eval_batch_size, picked.compile) == ("cpu", 0, 2, False)
    with pytest.raises(Exception, match="pth"):
        compose(["data.pth=/corpora/speechocean762"], "evaluate")


@pytest.mark.slow
def test_evaluate_names_a_missing_checkpoint(run_dir):
    proc = run_cli(["-m", "phi4_pron.evaluate", f"run_dir={run_dir}", "checkpoint=checkpoint-epoch-9"], check=False)
    assert proc.returncode != 0 and "checkpoint-epoch-9 holds no adapter" in proc.stderr
