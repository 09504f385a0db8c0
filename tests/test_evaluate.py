"""``phi4_pron.evaluate`` and ``phi4_pron.assess`` end to end on the tiny model and the bundled corpus."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import MINI, run_cli, task_questions


@pytest.fixture(scope="module")
def run_dir(smoke_runs):
    return smoke_runs("r64")


def test_evaluate_writes_every_file_and_the_table(run_dir):
    run_cli(["-m", "phi4_pron.evaluate", f"run_dir={run_dir}", "eval.limit=5", "eval.max_new_tokens=12"])
    out = run_dir / "eval" / "final_model"
    metrics = json.loads((out / "metrics.json").read_text())  # strict JSON: NaN written as null
    assert metrics["n_utterances"] == 5 and metrics["checkpoint"] == "final_model"
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 5 and {"id", "raw", "parsed", "reference", "error"} <= set(records[0])
    for aspect in ("accuracy", "fluency", "prosodic", "total"):
        assert (out / f"scatter_{aspect}.png").read_bytes()[:4] == b"\x89PNG"
    assert set(records[0]["raw"]) == {"apa", "mdd"} and metrics["task"] == "paper"  # both questions, one record
    table = (run_dir / "table3.md").read_text()
    assert "| final_model | paper | LoRA |" in table and "checkpoint-epoch-3" in table
    assert "| paper (Ahn & Nam) | | paper | LoRA | 3 | 2500 | | 0.656 | 0.727 | 0.711 | 0.675 | 0.140 |" in table
    assert (run_dir / "table3.csv").read_text().startswith("run,checkpoint,task,comparable,setting,epoch")


def test_compiled_decoding_answers_as_the_dynamic_cache(run_dir):
    """``eval.compile``'s path (static cache, longest prompts first, last batch filled up): the same answers."""
    from phi4_pron.data import load_split
    from phi4_pron.inference import DECODE_ATTENTION, load_adapter_for_inference
    from phi4_pron.predictions import generate_records

    model, tokenizer, fe, questions = load_adapter_for_inference(run_dir / "final_model")
    assert model.config._attn_implementation == DECODE_ATTENTION and list(questions) == ["apa", "mdd"]
    rows = load_split(str(MINI), "test", limit=5)
    eager, compiled = (
        generate_records(
            model, tokenizer, fe, questions, rows, batch_size=3, max_new_tokens=12, progress=False, compiled=c
        )
        for c in (False, True)
    )
    assert [r["id"] for r in compiled] == list(rows["id"])  # the padded last batch adds no record
    assert [r["raw"] for r in compiled] == [r["raw"] for r in eager]
    assert any(r["raw"]["apa"] for r in eager)


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


def test_a_questions_cap_cuts_its_answers_only(run_dir):
    """APA capped at 2 tokens: its answers are those of a 2-token evaluation, MDD's those of the 12-token one; also
    where one batch asks both (``generate_answers``, as ``assess`` does)."""
    from dataclasses import replace

    from phi4_pron.data import expand_questions, load_split
    from phi4_pron.inference import generate_answers, load_adapter_for_inference
    from phi4_pron.predictions import generate_records

    model, tokenizer, fe, questions = load_adapter_for_inference(run_dir / "final_model")
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


@pytest.mark.parametrize("compiled", [False, True])
def test_packed_decode_attention_equals_repeated_heads(compiled):
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    from phi4_pron.inference import sdpa_packed_decode

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups = 3  # 6 query heads on 2 key/value heads
    q, k, v = torch.randn(2, 6, 1, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.tensor([[False, False, True, True, True], [True] * 5]).view(2, 1, 1, 5)  # row 0 left-padded
    attend = torch.compile(sdpa_packed_decode, backend="eager", fullgraph=True) if compiled else sdpa_packed_decode
    out, _ = attend(module, q, k, v, mask, scaling=0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, repeat_kv(k, 3), repeat_kv(v, 3), attn_mask=mask, scale=0.5
    )
    torch.testing.assert_close(out, ref.transpose(1, 2))


def _left_padded(lengths: list[int], width: int):
    """A left-padded batch's boolean mask (batch, 1, width, width; True: attends) and its real positions."""
    import torch

    pos = torch.arange(width)
    real = pos[None] >= (width - torch.tensor(lengths))[:, None]
    return ((pos[:, None] >= pos[None, :]) & real[:, None, :])[:, None], real


def test_a_prompt_attends_to_its_own_positions_not_the_empty_cache():
    """Prefill into a static cache: the cache's empty tail (garbage here) is cut off, the result is the prompt's own
    causal, padded attention."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    from phi4_pron.inference import sdpa_packed_decode

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    mask, _ = _left_padded([4, 2], 4)
    q, k, v = torch.randn(2, 6, 4, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)  # cache of 7 positions
    full_mask = torch.cat([mask, torch.zeros(2, 1, 4, 3, dtype=torch.bool)], dim=-1)  # the tail is masked
    out, _ = sdpa_packed_decode(module, q, k, v, full_mask, scaling=0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, repeat_kv(k[:, :, :4], 3), repeat_kv(v[:, :, :4], 3), attn_mask=mask, scale=0.5
    )
    real = mask[:, 0].any(-1)  # a fully padded query row is undefined either way
    torch.testing.assert_close(out[real.nonzero(as_tuple=True)], ref.transpose(1, 2)[real.nonzero(as_tuple=True)])


def test_left_padded_segments_give_each_row_its_own_causal_attention():
    """flash_prompt_attention's segments, emulated on the CPU: causal attention within each segment of the batch read
    as one sequence equals SDPA under the padding mask on every real position, and padding stays finite."""
    import torch

    from phi4_pron.inference import left_padded_segments

    lengths, width = [4, 2, 3, 4], 4
    mask, real = _left_padded(lengths, width)
    segments = left_padded_segments(mask, len(lengths))
    assert segments.tolist() == [0, 0, 6, 9, 12, 16] and segments.dtype == torch.int32
    assert left_padded_segments(torch.ones(1, 1, 3, 3, dtype=torch.bool), 2).tolist() == [0, 0, 3, 6]
    torch.manual_seed(0)
    q, k, v = (torch.randn(len(lengths), width, 2, 8) for _ in range(3))  # (batch, width, heads, dim)
    flat = [t.reshape(-1, 2, 8).transpose(0, 1) for t in (q, k, v)]  # (heads, tokens, dim)
    out = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(*(t[:, a:b] for t in flat), is_causal=True)
            for a, b in zip(segments[:-1].tolist(), segments[1:].tolist(), strict=True)
            if b > a
        ],
        dim=1,
    )
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask)
    out = out.transpose(0, 1).reshape(len(lengths), width, 2, 8)
    torch.testing.assert_close(out[real], ref.transpose(1, 2)[real])
    assert torch.isfinite(out).all()


def test_a_decoding_step_reads_each_rows_own_positions_once_for_its_query_heads(monkeypatch):
    """flash_decode_attention over the head-major static cache, flash's variable-length kernel emulated on the CPU
    (segment i: query tokens query_offsets[i] to query_offsets[i + 1], key_counts[i] keys from key_offsets[i]): the
    packed SDPA's result under the padding mask, each row reading from its first prompt position to the current one."""
    import torch

    from phi4_pron import inference

    batch, heads, kv_heads, length, dim = 3, 6, 2, 7, 8
    first, current = torch.tensor([0, 2, 4]), 5  # the rows' left padding; positions after 5 are empty
    pos = torch.arange(length)
    mask = ((pos[None] >= first[:, None]) & (pos[None] <= current))[:, None, None]
    offsets, counts = inference.decode_segments(mask, kv_heads)
    assert offsets.tolist() == [0, 7, 16, 23, 32, 39, 42] and counts.tolist() == [6, 6, 4, 4, 2, 2]
    assert offsets.dtype == counts.dtype == torch.int32

    def flash_varlen(q, k, v, q_offsets, k_offsets, max_q, max_k, dropout, causal, debug, scale, seqused_k):
        assert max_q == heads // kv_heads and max_k == length and not causal
        out = torch.empty_like(q)
        for i in range(len(q_offsets) - 1):
            a, b, start, n = q_offsets[i], q_offsets[i + 1], k_offsets[i], seqused_k[i]
            keys, values = k[start : start + n], v[start : start + n]
            attend = torch.nn.functional.scaled_dot_product_attention
            out[a:b] = attend(*(t.transpose(0, 1) for t in (q[a:b], keys, values)), scale=scale).transpose(0, 1)
        return (out,)

    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", flash_varlen)
    torch.manual_seed(0)
    q = torch.randn(batch, heads, 1, dim)
    k, v = (torch.randn(batch, kv_heads, length, dim) for _ in range(2))
    out, _ = inference.flash_decode_attention(None, q, k, v, mask, scaling=0.3)
    packed = torch.nn.functional.scaled_dot_product_attention(
        q.view(batch, kv_heads, heads // kv_heads, dim), k, v, attn_mask=mask, scale=0.3
    )
    assert out.shape == (batch, 1, heads, dim)
    torch.testing.assert_close(out, packed.reshape(batch, heads, 1, dim).transpose(1, 2))


def test_prompt_blocks_compute_what_phi4s_modules_compute(tiny_model_dir, monkeypatch):
    """compile_prompt_blocks' RMSNorm and MLP are the modules' own functions; it leaves an unmerged LoRA model alone
    and CPU tensors (what it compiles runs on a GPU only) on the eager code."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers.models.phi4_multimodal import modeling_phi4_multimodal as phi4_modeling

    from phi4_pron import inference
    from phi4_pron.modeling import load_base_model

    monkeypatch.setattr(phi4_modeling, "apply_rotary_pos_emb", phi4_modeling.apply_rotary_pos_emb)
    model = load_base_model(str(tiny_model_dir), None, torch.float32, "sdpa").eval()
    layer = model.model.layers[0]
    torch.manual_seed(0)
    h = torch.randn(2, 5, model.config.hidden_size)
    torch.testing.assert_close(
        inference.rms_norm(h, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
        layer.input_layernorm(h),
    )
    torch.testing.assert_close(
        inference.gated_mlp(h, layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight), layer.mlp(h)
    )
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["gate_up_proj"]))
    assert inference.compile_prompt_blocks(lora) == 0
    model = lora.unload()
    n_layers = len(model.model.layers)
    with torch.inference_mode():
        before = layer.mlp(h)
        assert inference.compile_prompt_blocks(model) == 1 + 3 * n_layers  # final norm, 2 norms and the MLP a layer
        assert not inference.is_prompt(h) and torch.equal(layer.mlp(h), before)


def test_the_prompts_rotary_embedding_is_computed_token_major_and_handed_back_head_major(monkeypatch):
    """_prompt_rotary (prompts on a GPU, compiled) rotates the token-major tensors behind Phi-4's head-major views:
    the same values as transformers' function, in the same head-major shape, token-major in memory."""
    import torch

    from phi4_pron import inference

    monkeypatch.setattr(inference, "is_prompt", lambda hidden, seq_dim=1: True)
    monkeypatch.setattr(inference, "_compiled_rotary", inference._eager_rotary)  # transformers' function
    torch.manual_seed(0)
    batch, tokens, heads, kv_heads, dim, rotary = 2, 5, 4, 2, 8, 6
    qkv = torch.randn(batch, tokens, (heads + 2 * kv_heads) * dim)  # the attention's projection, token-major
    q = qkv[..., : heads * dim].view(batch, tokens, heads, dim).transpose(1, 2)
    k = qkv[..., heads * dim : (heads + kv_heads) * dim].view(batch, tokens, kv_heads, dim).transpose(1, 2)
    for rows in (batch, 1):  # position ids a row, or one row for all
        cos, sin = torch.randn(2, rows, tokens, rotary)
        expected = inference._eager_rotary(q, k, cos, sin)
        got = inference._prompt_rotary(q, k, cos, sin)
        for e, g in zip(expected, got, strict=True):
            assert g.shape == e.shape and torch.equal(g, e)
            assert g.transpose(1, 2).is_contiguous()


def test_the_compiled_decoding_step_has_no_graph_break_and_answers_as_eager(tiny_model_dir, tiny_processing):
    """generate_from_batch hands the audio to the prefill only (audio_read_at_prefill_only): its compiled decoding
    step (traced here by Dynamo on the CPU, as generate compiles it on a GPU) is one graph, where transformers'
    generate alone passes the audio to every step and the step breaks at Phi-4's audio check; the answers are the
    eager dynamic-cache ones."""
    import torch
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    from phi4_pron.data import load_split
    from phi4_pron.inference import (
        DECODE_ATTENTION,
        generate_from_batch,
        generation_collator,
        placeholder_ids,
        static_cache_len,
    )
    from phi4_pron.modeling import load_base_model

    tokenizer, features = tiny_processing
    recordings = load_split(MINI, "test", limit=2)
    rows = [{**recordings[i], "question": "apa"} for i in range(len(recordings))]
    batch = generation_collator(tokenizer, features, task_questions("paper"))(rows)
    cache_len = static_cache_len(batch["input_ids"].shape[1], 4)

    def compiled_model():
        model = load_base_model(str(tiny_model_dir), None, torch.float32, "sdpa").eval()
        model.set_attn_implementation(DECODE_ATTENTION)
        model.generation_config.compile_config = CompileConfig(backend="eager", mode=None)
        model.generation_config.compile_config._compile_all_devices = True  # compile on the CPU too
        return model

    def graph_breaks() -> int:
        return sum(counters["graph_break"].values())

    torch._dynamo.reset()
    counters.clear()
    try:
        model = compiled_model()
        with torch.inference_mode():
            model.generate(
                **batch,
                max_new_tokens=4,
                do_sample=False,
                cache_implementation="static",
                max_cache_len=cache_len,
                suppress_tokens=placeholder_ids(model.config),
            )
        assert graph_breaks() > 0  # transformers' generate alone: the audio reaches every step
        torch._dynamo.reset()
        counters.clear()
        answers = generate_from_batch(compiled_model(), tokenizer, batch, [4, 4], cache_len)
        assert graph_breaks() == 0 and counters["stats"]["unique_graphs"] >= 1
    finally:
        torch._dynamo.reset()
    eager = load_base_model(str(tiny_model_dir), None, torch.float32, "sdpa").eval()
    assert answers == generate_from_batch(eager, tokenizer, batch, [4, 4])
    silent = {**batch, "audio_input_features": torch.zeros_like(batch["audio_input_features"])}
    assert answers != generate_from_batch(eager, tokenizer, silent, [4, 4])  # the prefill did read the audio


def test_a_batch_reuses_the_last_static_cache_of_its_size(tiny_model_dir, tiny_processing):
    """generate_from_batch keeps its static cache on the model (static_cache_reused: fixed addresses for the compiled
    step's CUDA graph), reset for the next batch of the same size: the answers are a fresh cache's, whatever the
    batch before wrote; another size gets a new one; forget_static_cache_length frees it."""
    import torch

    from phi4_pron.data import load_split
    from phi4_pron.inference import (
        KEPT_CACHE,
        forget_static_cache_length,
        generate_from_batch,
        generation_collator,
        static_cache_len,
    )
    from phi4_pron.modeling import load_base_model

    tokenizer, features = tiny_processing
    collate = generation_collator(tokenizer, features, task_questions("paper"))
    recordings = load_split(MINI, "test", limit=3)
    apa = collate([{**recordings[i], "question": "apa"} for i in range(2)])
    mdd = collate([{**recordings[i + 1], "question": "mdd"} for i in range(2)])
    cache_len = static_cache_len(max(apa["input_ids"].shape[1], mdd["input_ids"].shape[1]), 6)
    model = load_base_model(str(tiny_model_dir), None, torch.float32, "sdpa").eval()

    def answer(batch, fresh: bool = False):
        if fresh:
            forget_static_cache_length(model)
        return generate_from_batch(model, tokenizer, batch, [6] * len(batch["input_ids"]), cache_len)

    first = answer(apa)
    cache = getattr(model, KEPT_CACHE)[1]
    after_apa, again = answer(mdd), answer(apa)
    assert getattr(model, KEPT_CACHE)[1] is cache and again == first
    assert after_apa == answer(mdd, fresh=True)  # reset: nothing left of the batch before
    one = {k: v[:1] for k, v in apa.items() if k != "audio_attention_mask"}
    one["audio_input_features"] = one["audio_input_features"][:, : int(apa["audio_attention_mask"][0].sum())]
    answer(one)
    assert getattr(model, KEPT_CACHE)[1] is not cache  # a batch of one: a cache of its own size
    forget_static_cache_length(model)
    assert not hasattr(model, KEPT_CACHE)


def test_the_decoding_fixes_are_no_ops_on_a_transformers_without_their_hooks(monkeypatch):
    """A transformers 5.x without DeferredStopCheck or the list of inputs to drop still generates (as it is)."""
    from transformers.generation import utils as generation_utils

    from phi4_pron.inference import audio_read_at_prefill_only, static_cache_reused, stop_check_one_step_late

    monkeypatch.delattr(generation_utils, "DeferredStopCheck")
    monkeypatch.delattr(generation_utils, "MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL")
    monkeypatch.delattr(generation_utils.GenerationMixin, "_prepare_static_cache")
    with stop_check_one_step_late(), audio_read_at_prefill_only(), static_cache_reused():
        assert not hasattr(generation_utils, "MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL")
        assert not hasattr(generation_utils.GenerationMixin, "_prepare_static_cache")


def test_the_stop_check_is_deferred_on_a_gpu_inside_the_context_only():
    """stop_check_one_step_late extends transformers' DeferredStopCheck (Apple MPS only) to CUDA under transformers'
    own conditions, and puts transformers' condition back afterwards, also after an error. (Generation under it needs
    a GPU: a CPU has no events; the answers' equality is measured there, experiments/benchmarks/eval.md.)"""
    from types import SimpleNamespace

    import torch
    from transformers.generation.utils import DeferredStopCheck

    from phi4_pron.inference import stop_check_one_step_late

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    returned_uncroppable = SimpleNamespace(is_croppable=False)
    assert not DeferredStopCheck.is_supported(cuda, None, False, False)
    with stop_check_one_step_late():
        assert DeferredStopCheck.is_supported(cuda, None, False, False)
        assert DeferredStopCheck.is_supported(cuda, returned_uncroppable, False, False)  # the cache is not returned
        assert not DeferredStopCheck.is_supported(cuda, returned_uncroppable, True, False)  # it could not be undone
        assert not DeferredStopCheck.is_supported(cuda, None, False, True)  # an assistant model
        assert not DeferredStopCheck.is_supported(cpu, None, False, False)
    assert not DeferredStopCheck.is_supported(cuda, None, False, False)
    with pytest.raises(RuntimeError, match="inside"), stop_check_one_step_late():
        raise RuntimeError("inside")
    assert not DeferredStopCheck.is_supported(cuda, None, False, False)


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
    from phi4_pron.evaluation import settings

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


def test_evaluate_names_a_missing_checkpoint(run_dir):
    proc = run_cli(["-m", "phi4_pron.evaluate", f"run_dir={run_dir}", "checkpoint=checkpoint-epoch-9"], check=False)
    assert proc.returncode != 0 and "checkpoint-epoch-9 holds no adapter" in proc.stderr


def test_assess_one_recording_and_a_folder(run_dir, tmp_path):
    wav = next((MINI / "WAVE").rglob("*.WAV"))
    proc = run_cli(
        [
            "-m",
            "phi4_pron.assess",
            f"model_path={run_dir / 'final_model'}",
            f"audio={wav}",
            "text=WE CALL IT BEAR",
            "max_new_tokens=8",
        ]
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["audio"] == str(wav) and "assessment" in result and set(result["raw"]) == {"apa", "mdd"}

    folder = tmp_path / "recordings"
    folder.mkdir()
    for name in ("a.wav", "b.wav"):
        shutil.copy(wav, folder / name)
    (tmp_path / "texts.tsv").write_text("a.wav\tWE CALL IT BEAR\nb.wav\tBOB LIVES IN CAIRO NOW\n")
    run_cli(
        [
            "-m",
            "phi4_pron.assess",
            f"model_path={run_dir / 'final_model'}",
            f"audio_dir={folder}",
            f"texts={tmp_path / 'texts.tsv'}",
            f"out={tmp_path / 'scores.jsonl'}",
            "max_new_tokens=8",
        ]
    )
    assert len((tmp_path / "scores.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["audio=/nowhere/x.wav", "text=HELLO"], "audio file /nowhere/x.wav does not exist"),
        (["audio={wav}", "text= "], "empty text for"),
        (["audio={bad}", "text=HELLO"], "cannot read the audio"),
    ],
)
def test_assess_errors_are_clear(run_dir, tmp_path, args, message):
    wav = next((MINI / "WAVE").rglob("*.WAV"))
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    args = [a.format(wav=wav, bad=bad) for a in args]
    proc = run_cli(["-m", "phi4_pron.assess", f"model_path={run_dir / 'final_model'}", *args], check=False)
    assert proc.returncode != 0 and message in proc.stderr


@pytest.mark.slow  # a subprocess
def test_assess_refuses_a_folder_without_adapter(tmp_path):
    wav = next((MINI / "WAVE").rglob("*.WAV"))
    proc = run_cli(["-m", "phi4_pron.assess", f"model_path={tmp_path}", f"audio={wav}", "text=HELLO"], check=False)
    assert proc.returncode != 0 and "has no adapter_config.json" in proc.stderr
