"""phi4_pron.predictions: generating a split (each recording embedded once, each question capped), scoring records
(failures counted), reading prediction files."""

from __future__ import annotations

import pytest
from conftest import MINI, task_questions

from phi4_pron.predictions import score


@pytest.fixture(scope="module")
def run_dir(smoke_runs):
    return smoke_runs("r64")


def test_each_recording_is_embedded_once_for_all_its_questions(tiny_model_dir, monkeypatch):
    """generate_records runs the audio encoder once a recording (shared_audio_table), not once a question, and
    answers as prompts that read their own audio (batches of one: no padding, so the same embeddings); also through
    loader workers, and for an empty split."""
    import torch

    from phi4_pron import predictions
    from phi4_pron.data import load_split
    from phi4_pron.modeling import load_base_model, load_tokenizer_and_features

    model = load_base_model(str(tiny_model_dir), None, torch.float32, "sdpa").eval()
    tokenizer, fe = load_tokenizer_and_features(str(tiny_model_dir))
    encoder = model.model.embed_tokens_extend.audio_embed.encoder
    embedded = []  # the batch size of each audio encoder call
    encoder.register_forward_hook(lambda module, args, out: embedded.append(len(args[0])))
    rows = load_split(str(MINI), "test", limit=5)
    kwargs = dict(max_new_tokens=6, progress=False)

    def answers(batch_size, num_workers=0):
        embedded.clear()
        out = predictions.generate_records(
            model,
            tokenizer,
            fe,
            task_questions("paper"),
            rows,
            batch_size=batch_size,
            num_workers=num_workers,
            **kwargs,
        )
        return [r["raw"] for r in out], list(embedded)

    shared, calls = answers(1)
    assert calls == [1] * 5  # 5 recordings, 10 prompts
    paired, calls = answers(2)
    assert calls == [2, 2, 1] and answers(2, num_workers=2)[0] == paired
    monkeypatch.setattr(predictions, "shared_audio_table", lambda *args: None)
    own, calls = answers(1)
    assert calls == [1] * 10 and own == shared and any(r["apa"] for r in own)
    assert (
        predictions.generate_records(
            model, tokenizer, fe, task_questions("paper"), rows.select([]), batch_size=2, **kwargs
        )
        == []
    )


@pytest.mark.slow
def test_a_questions_cap_cuts_its_answers_only(run_dir):
    """APA capped at 2 tokens: its answers are those of a 2-token evaluation, MDD's those of the 12-token one; also
    where one batch asks both (``generate_answers``, as ``assess`` does)."""
    from dataclasses import replace

    from phi4_pron.data import expand_questions, load_split
    from phi4_pron.inference import generate_answers, load_adapter_for_inference, saved_questions
    from phi4_pron.predictions import generate_records

    model, tokenizer, fe = load_adapter_for_inference(run_dir / "final_model")
    questions = saved_questions(run_dir / "final_model")
    rows = load_split(str(MINI), "test", limit=5)
    capped = {**questions, "apa": replace(questions["apa"], max_new_tokens=2)}
    short, long, mixed = (
        generate_records(model, tokenizer, fe, q, rows, batch_size=3, max_new_tokens=m, progress=False)
        for q, m in ((questions, 2), (questions, 12), (capped, 12))
    )
    assert [r["raw"]["apa"] for r in mixed] == [r["raw"]["apa"] for r in short]
    assert [r["raw"]["mdd"] for r in mixed] == [r["raw"]["mdd"] for r in long]
    assert [r["raw"]["apa"] for r in long] != [r["raw"]["apa"] for r in short]  # the cap cut something
    both = [expand_questions(rows, ["apa", "mdd"])[j] for j in (0, 5)]  # recording 0's APA and MDD prompts
    short, long, mixed = (
        generate_answers(model, tokenizer, fe, q, both, m) for q, m in ((questions, 2), (questions, 12), (capped, 12))
    )
    assert mixed == [short[0], long[1]] and long[0] != short[0]


def _record(raw_parsed, ref_scores, text="WE CALL IT", phones="W IY K AO L IH T", flags=None, error=None):
    canonical = ["W", "IY1", "K", "AO1", "L", "IH1", "T"]
    return {
        "id": "x",
        "raw": "",
        "parsed": raw_parsed,
        "error": error,
        "reference": {
            "accuracy": ref_scores[0],
            "fluency": ref_scores[1],
            "prosodic": ref_scores[2],
            "total": ref_scores[3],
            "text": text,
            "phones": phones,
            "canonical": canonical,
            "mispronounced": flags or [False] * 7,
        },
    }


def test_score_perfect_predictions():
    refs = [(8, 9, 7, 8), (5, 6, 4, 5), (9, 9, 9, 9)]
    flags = [False, False, False, True, False, False, False]
    records = [
        _record(
            {
                "accuracy": a,
                "fluency": f,
                "prosodic": p,
                "total": t,
                "transcript": "WE CALL IT",
                "phones": "W IY K AA L IH T",
            },
            (a, f, p, t),
            phones="W IY K AA L IH T",
            flags=flags,
        )
        for a, f, p, t in refs
    ]
    m = score(records)
    assert all(m[f"pcc_{k}"] == pytest.approx(1.0) for k in ("accuracy", "fluency", "prosodic", "total"))
    assert (m["wer"], m["per"], m["mdd_f1"]) == (0.0, 0.0, 1.0)
    assert (m["n_failed"], m["n_unparseable"]) == (0, 0)


def test_score_counts_failures_and_unparseable_answers():
    good = _record(
        {
            "accuracy": 8,
            "fluency": 8,
            "prosodic": 8,
            "total": 8,
            "transcript": "WE CALL IT",
            "phones": "W IY K AO L IH T",
        },
        (8, 8, 8, 8),
    )
    good2 = _record(
        {
            "accuracy": 3,
            "fluency": 3,
            "prosodic": 3,
            "total": 3,
            "transcript": "WE CALL IT",
            "phones": "W IY K AO L IH T",
        },
        (4, 4, 4, 4),
    )
    unparseable = _record(None, (5, 5, 5, 5))
    failed = _record(None, (5, 5, 5, 5), error="DataError: cannot decode")
    m = score([good, good2, unparseable, failed])
    assert (m["n_utterances"], m["n_failed"], m["n_unparseable"]) == (4, 1, 1)
    assert m["n_accuracy"] == 2 and m["pcc_accuracy"] == pytest.approx(1.0)  # left out of PCC
    assert m["wer"] == pytest.approx(3 / 9)  # the unparseable answer's 3 words are deletions
    assert m["per"] == pytest.approx(7 / 21)
    assert m["mdd_fp"] == 7  # its every canonical phone counts as detected


def test_an_empty_predictions_file_is_refused(tmp_path):
    from phi4_pron.predictions import read_predictions

    (tmp_path / "predictions.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no predictions"):
        read_predictions(tmp_path / "predictions.jsonl")


def test_rescoring_names_duplicated_utterances_and_bad_references(tmp_path):
    import json

    from phi4_pron.predictions import read_predictions, write_results

    records = [{**_record(None, (5, 5, 5, 5)), "id": u} for u in ("a", "b", "a")]
    records[1]["reference"]["total"] = float("nan")
    file = tmp_path / "predictions.jsonl"
    write_results(tmp_path, records, {})
    for line in file.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))  # NaN written as null
    with pytest.raises(ValueError) as e:
        read_predictions(file)
    assert "utterance a is on lines [1, 3]" in str(e.value)
    assert "line 2 (utterance b): reference total=None is not a score" in str(e.value)
    file.write_text(file.read_text().replace("null", "NaN"))  # as files written before were
    with pytest.raises(ValueError, match="reference total=nan is not a score"):
        read_predictions(file)
