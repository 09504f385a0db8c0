"""phi4_pron.fast.generation: the fast path answers as plain ``generate`` does, and leaves transformers and torch as
it found them (importing any module of the package changes nothing either)."""

from __future__ import annotations

import pytest
from conftest import MINI, task_questions


@pytest.fixture(scope="module")
def run_dir(smoke_runs):
    return smoke_runs("r64")


@pytest.mark.slow
def test_compiled_decoding_answers_as_the_dynamic_cache(run_dir):
    """``eval.compile``'s path (static cache, longest prompts first, last batch filled up): the same answers."""
    from phi4_pron.data import load_split
    from phi4_pron.fast.attention import DECODE_ATTENTION
    from phi4_pron.fast.generation import fast_generation
    from phi4_pron.inference import load_adapter_for_inference, saved_questions
    from phi4_pron.predictions import generate_records

    model, tokenizer, fe = load_adapter_for_inference(run_dir / "final_model")
    questions = saved_questions(run_dir / "final_model")
    assert list(questions) == ["apa", "mdd"]
    rows = load_split(str(MINI), "test", limit=5)
    with fast_generation(model):
        assert model.config._attn_implementation == DECODE_ATTENTION
        eager, compiled = (
            generate_records(
                model, tokenizer, fe, questions, rows, batch_size=3, max_new_tokens=12, progress=False, compiled=c
            )
            for c in (False, True)
        )
    assert model.config._attn_implementation == "sdpa"  # as loaded, once the fast path is left
    assert [r["id"] for r in compiled] == list(rows["id"])  # the padded last batch adds no record
    assert [r["raw"] for r in compiled] == [r["raw"] for r in eager]
    assert any(r["raw"]["apa"] for r in eager)


def test_the_compiled_decoding_step_has_no_graph_break_and_answers_as_eager(tiny_model_dir, tiny_processing):
    """generate_from_batch hands the audio to the prefill only (audio_read_at_prefill_only): its compiled decoding
    step (traced here by Dynamo on the CPU, as generate compiles it on a GPU) is one graph, where transformers'
    generate alone passes the audio to every step and the step breaks at Phi-4's audio check; the answers are the
    eager dynamic-cache ones."""
    import torch
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    from phi4_pron.data import load_split
    from phi4_pron.fast.attention import decode_attention
    from phi4_pron.fast.generation import fast_generation, static_cache_len
    from phi4_pron.inference import generate_from_batch, generation_collator, placeholder_ids
    from phi4_pron.modeling import load_base_model

    tokenizer, features = tiny_processing
    recordings = load_split(MINI, "test", limit=2)
    rows = [{**recordings[i], "question": "apa"} for i in range(len(recordings))]
    batch = generation_collator(tokenizer, features, task_questions("paper"))(rows)
    cache_len = static_cache_len(batch["input_ids"].shape[1] + 4)

    def compiled_model():
        model = load_base_model(str(tiny_model_dir), None, torch.float32, "sdpa").eval()
        model.generation_config.compile_config = CompileConfig(backend="eager", mode=None)
        model.generation_config.compile_config._compile_all_devices = True  # compile on the CPU too
        return model

    def graph_breaks() -> int:
        return sum(counters["graph_break"].values())

    torch._dynamo.reset()
    counters.clear()
    try:
        model = compiled_model()
        with torch.inference_mode(), decode_attention(model):  # the fast path's attention, generate's own hooks
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
        model = compiled_model()
        with fast_generation(model):
            answers = generate_from_batch(model, tokenizer, batch, [4, 4], cache_len)
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
    from phi4_pron.fast.generation import KEPT_CACHE, fast_generation, forget_static_cache_length, static_cache_len
    from phi4_pron.inference import generate_from_batch, generation_collator
    from phi4_pron.modeling import load_base_model

    tokenizer, features = tiny_processing
    collate = generation_collator(tokenizer, features, task_questions("paper"))
    recordings = load_split(MINI, "test", limit=3)
    apa = collate([{**recordings[i], "question": "apa"} for i in range(2)])
    mdd = collate([{**recordings[i + 1], "question": "mdd"} for i in range(2)])
    cache_len = static_cache_len(max(apa["input_ids"].shape[1], mdd["input_ids"].shape[1]) + 6)
    model = load_base_model(str(tiny_model_dir), None, torch.float32, "sdpa").eval()

    def answer(batch, fresh: bool = False):
        if fresh:
            forget_static_cache_length(model)
        return generate_from_batch(model, tokenizer, batch, [6] * len(batch["input_ids"]), cache_len)

    with fast_generation(model):
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
        answer(apa)
    assert not hasattr(model, KEPT_CACHE)  # freed on leaving the fast path


def test_the_decoding_fixes_are_no_ops_on_a_transformers_without_their_hooks(monkeypatch):
    """A transformers 5.x without DeferredStopCheck or the list of inputs to drop still generates (as it is)."""
    from transformers.generation import utils as generation_utils

    from phi4_pron.fast.generation import audio_read_at_prefill_only, static_cache_reused, stop_check_one_step_late

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

    from phi4_pron.fast.generation import stop_check_one_step_late

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


# What the fast path may change while it is on: transformers' and torch's functions and settings, by name.
def _library_state() -> dict:
    import torch
    from transformers import AttentionInterface, GenerationMixin
    from transformers.generation import utils as generation_utils
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.models.phi4_multimodal import modeling_phi4_multimodal as phi4_modeling

    deferred = getattr(generation_utils, "DeferredStopCheck", None)
    return {
        "apply_rotary_pos_emb": phi4_modeling.apply_rotary_pos_emb,
        "attention functions": dict(AttentionInterface._global_mapping),
        "attention masks": dict(AttentionMaskInterface._global_mapping),
        "_prepare_static_cache": GenerationMixin.__dict__.get("_prepare_static_cache"),
        "inputs dropped after the prefill": getattr(
            generation_utils, "MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL", None
        ),
        "DeferredStopCheck.is_supported": deferred.__dict__.get("is_supported") if deferred else None,
        "cudnn sdp": torch.backends.cuda.cudnn_sdp_enabled(),
        "inductor cpp_wrapper": torch._inductor.config.cpp_wrapper,
        "TORCHINDUCTOR_CACHE_DIR": __import__("os").environ.get("TORCHINDUCTOR_CACHE_DIR"),
    }


def test_importing_the_package_patches_nothing():
    """Every module of phi4_pron imported (in a fresh interpreter, after transformers' own): transformers' Phi-4
    functions, attention registry and generate hooks, and torch's settings are the originals."""
    from conftest import REPO, run_cli

    code = (
        "import importlib, pkgutil, torch._inductor.config\n"
        "from test_fast_generation import _library_state\n"
        "before = _library_state()\n"
        "import phi4_pron\n"
        "modules = [m.name for m in pkgutil.walk_packages(phi4_pron.__path__, 'phi4_pron.')]\n"
        "modules = [importlib.import_module(m) for m in modules if not m.endswith('__main__')]\n"
        "after = _library_state()\n"
        "assert len(modules) > 30, modules\n"
        "print([k for k in before if before[k] != after[k]])\n"
    )
    proc = run_cli(["-c", code], env={"PYTHONPATH": str(REPO / "tests")})
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_leaving_the_fast_path_restores_the_model_and_the_libraries(tiny_model_dir):
    """fast_generation (with the prompts' compiled blocks) and training's uncompiled layers: inside, the model attends
    through the packed decoding attention and generate's hooks are patched; outside, all is as before, also after an
    error inside."""
    import torch

    from phi4_pron.fast.attention import DECODE_ATTENTION
    from phi4_pron.fast.generation import fast_generation
    from phi4_pron.fast.layers import uncompiled
    from phi4_pron.modeling import load_base_model

    model = load_base_model(str(tiny_model_dir), None, torch.float32, "sdpa").eval()
    layer = model.model.layers[0]
    layer.compile(dynamic=True)
    compiled_call = layer._compiled_call_impl
    before = _library_state()
    with fast_generation(model, compile_prompts=True), uncompiled(model):
        assert model.config._attn_implementation == DECODE_ATTENTION and layer._compiled_call_impl is None
        inside = _library_state()
    assert {k for k in before if before[k] != inside[k]} >= {
        "apply_rotary_pos_emb",
        "attention functions",
        "_prepare_static_cache",
    }
    assert _library_state() == before and model.config._attn_implementation == "sdpa"
    assert layer._compiled_call_impl is compiled_call and not any("forward" in vars(m) for m in model.modules())
    with pytest.raises(RuntimeError, match="inside"), fast_generation(model, compile_prompts=True):
        raise RuntimeError("inside")
    assert _library_state() == before and model.config._attn_implementation == "sdpa"
