"""The GPU tier: each fast path of phi4_pron.fast against the plain one, on a real GPU (skipped without CUDA).

The CPU tests emulate these kernels; here they run: flash attention for padded prompts and decoding steps against
SDPA under the padding mask, the compiled decoding step over a static cache against eager ``generate``, training's
compiled layers (with Inductor's C++ wrapper) against the eager forward and backward, the fused answer-only loss and
the cached audio embeddings against the plain step. ``make test-gpu`` runs these and every other test marked ``gpu``
(tests/test_callbacks.py: the per-epoch evaluation's fast path); on a lent machine ``bash scripts/device_test_gpu.sh``.

Tolerances: bf16 attention outputs are compared within 2e-2 of the output's scale (bf16 keeps 8 bits of mantissa,
and flash and SDPA's memory-efficient kernel sum in other orders); float32 paths within 1e-4 relative, as on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import MINI, cpu_trainer, joint_batch, loss_and_grads, task_questions, tiny_lora_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
KV_HEADS, HEADS, DIM = 8, 24, 128  # Phi-4-multimodal's attention


def _close(got: torch.Tensor, ref: torch.Tensor, scale: float = 2e-2) -> None:
    assert (got.float() - ref.float()).abs().max() <= scale * ref.float().abs().max(), "beyond bf16 rounding"


def _left_padded(lengths: list[int], width: int, device="cuda"):
    pos = torch.arange(width, device=device)
    real = pos[None] >= (width - torch.tensor(lengths, device=device))[:, None]
    return ((pos[:, None] >= pos[None, :]) & real[:, None, :])[:, None], real


def test_prompt_attention_equals_sdpa_under_the_padding_mask():
    from transformers.integrations.sdpa_attention import repeat_kv
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalAttention

    from phi4_pron.fast.attention import has_flash, sdpa_packed_decode

    assert has_flash(torch.device("cuda"))
    module = Phi4MultimodalAttention.__new__(Phi4MultimodalAttention)  # only its class and group count are read
    torch.nn.Module.__init__(module)
    module.num_key_value_groups = HEADS // KV_HEADS
    lengths, width = [300, 17, 256, 300], 304
    mask, real = _left_padded(lengths, width)
    g = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(len(lengths), HEADS, width, DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (
        torch.randn(len(lengths), KV_HEADS, width, DIM, device="cuda", dtype=torch.bfloat16, generator=g) for _ in "kv"
    )
    out, _ = sdpa_packed_decode(module, q, k, v, mask, scaling=DIM**-0.5)
    groups = HEADS // KV_HEADS
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask, scale=DIM**-0.5
    ).transpose(1, 2)
    _close(out[real], ref[real])
    assert torch.isfinite(out).all()


def test_decoding_attention_equals_sdpa_over_the_static_cache():
    from transformers.integrations.sdpa_attention import repeat_kv
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalAttention

    from phi4_pron.fast.attention import sdpa_packed_decode

    module = Phi4MultimodalAttention.__new__(Phi4MultimodalAttention)
    torch.nn.Module.__init__(module)
    module.num_key_value_groups = HEADS // KV_HEADS
    batch, length, current = 5, 448, 320  # a static cache of 448 positions, written up to 320
    first = torch.tensor([0, 40, 3, 100, 0], device="cuda")  # each row's left padding
    pos = torch.arange(length, device="cuda")
    mask = ((pos[None] >= first[:, None]) & (pos[None] <= current))[:, None, None]
    g = torch.Generator("cuda").manual_seed(1)
    q, k, v = (
        torch.randn(batch, heads, n, DIM, device="cuda", dtype=torch.bfloat16, generator=g)
        for heads, n in ((HEADS, 1), (KV_HEADS, length), (KV_HEADS, length))
    )
    out, _ = sdpa_packed_decode(module, q, k, v, mask, scaling=DIM**-0.5)
    groups = HEADS // KV_HEADS
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask, scale=DIM**-0.5
    ).transpose(1, 2)
    _close(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decoding_answers_as_eager_generate(tiny_model_dir, dtype):
    """evaluate's path on the GPU (static cache, transformers' compiled decoding step with CUDA graphs, flash
    attention in bf16, the prompts' compiled blocks): the same tokens as eager generate with a dynamic cache."""
    from phi4_pron.data import load_split
    from phi4_pron.fast.generation import fast_generation
    from phi4_pron.modeling import load_base_model, load_tokenizer_and_features
    from phi4_pron.predictions import generate_records

    model = load_base_model(str(tiny_model_dir), None, dtype, "sdpa").cuda().eval()
    tokenizer, fe = load_tokenizer_and_features(str(tiny_model_dir))
    rows = load_split(str(MINI), "test", limit=12)
    kwargs = dict(batch_size=5, max_new_tokens=16, progress=False)
    eager = generate_records(model, tokenizer, fe, task_questions("paper"), rows, compiled=False, **kwargs)
    with fast_generation(model, compile_prompts=True):
        fast = generate_records(model, tokenizer, fe, task_questions("paper"), rows, compiled=True, **kwargs)
    assert [r["raw"] for r in fast] == [r["raw"] for r in eager]
    assert all(r["error"] is None for r in fast)


def test_compiled_layers_with_the_cpp_wrapper_give_the_eager_loss_and_gradients(
    tiny_model_dir, tiny_processing, mini_train, tmp_path
):
    from omegaconf import OmegaConf

    from phi4_pron.fast.layers import compile_layers, compile_settings

    model = tiny_lora_model(tiny_model_dir).cuda().train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    batch = {k: v.cuda() for k, v in joint_batch(tiny_processing, mini_train).items()}

    ref_loss, ref_grads = loss_and_grads(model, lambda: model(**batch).loss)
    trainer = cpu_trainer(model, tiny_processing, mini_train, tmp_path, use_cpu=False)
    compile_layers(model)
    with compile_settings(OmegaConf.create({"compile": True, "compile_cpp_wrapper": True})):
        fast_loss, fast_grads = loss_and_grads(model, lambda: trainer.compute_loss(trainer.model, dict(batch)))
    assert fast_loss == pytest.approx(ref_loss, rel=1e-4)
    for name, g in ref_grads.items():
        assert (fast_grads[name] - g).norm() <= 1e-3 * g.norm() + 1e-7, name


def test_cached_audio_embeddings_give_the_step_of_the_encoder(tiny_model_dir, tiny_processing, mini_train, tmp_path):
    from phi4_pron.audio_cache import cache_audio_embeddings
    from phi4_pron.collator import PronunciationCollator

    model = tiny_lora_model(tiny_model_dir).cuda().train()
    rows = mini_train.select([3, 0, 2, 1])
    plain = PronunciationCollator(*tiny_processing, task_questions("joint"))
    batch = {k: v.cuda() for k, v in plain([rows[i] for i in range(4)]).items()}
    trainer = cpu_trainer(model, tiny_processing, mini_train, tmp_path, use_cpu=False)
    with torch.no_grad():
        ref = trainer.compute_loss(trainer.model, dict(batch))
        cached_rows, collator, table = cache_audio_embeddings(model, rows, plain, batch_size=4)
        trainer.audio_table = table
        cached = {k: v.cuda() for k, v in collator([cached_rows[i] for i in range(4)]).items()}
        fast = trainer.compute_loss(trainer.model, cached)
    assert fast.item() == pytest.approx(ref.item(), rel=1e-4)
