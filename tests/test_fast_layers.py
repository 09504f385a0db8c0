"""phi4_pron.fast.layers: training's compiled and recomputed layers against the plain eager ones (loss, gradients,
recompilations), on the tiny model (CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import compose, cpu_trainer, joint_batch, loss_and_grads, run_cli, tiny_lora_model
from omegaconf import OmegaConf


@pytest.mark.parametrize("cpp_wrapper", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_compiled_layers_give_the_reference_loss_and_gradients(
    tiny_model_dir, tiny_processing, mini_train, tmp_path, cpp_wrapper
):
    """The fast training path (compiled layers + TRL's fused answer-only LM head) against the plain eager one, with
    Inductor's Python wrapper and with its C++ one (``hardware.compile_cpp_wrapper``, scoped as training scopes it)."""
    import torch._inductor.config as inductor_config

    from phi4_pron.fast.layers import compile_layers, compile_settings

    model = tiny_lora_model(tiny_model_dir).train()
    for name, p in model.named_parameters():  # B = 0 would hide a wrong LoRA path
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    batch = joint_batch(tiny_processing, mini_train)

    ref_loss, ref_grads = loss_and_grads(model, lambda: model(**batch).loss)
    trainer = cpu_trainer(model, tiny_processing, mini_train, tmp_path)
    assert compile_layers(model) == 4  # the tiny model's 2 decoder and 2 audio conformer layers
    hardware = OmegaConf.create({"compile": True, "compile_cpp_wrapper": cpp_wrapper})
    with compile_settings(hardware):  # the layers compile at their first call, the backward's at the first backward
        assert inductor_config.cpp_wrapper is cpp_wrapper
        fast_loss, fast_grads = loss_and_grads(model, lambda: trainer.compute_loss(trainer.model, dict(batch)))
    assert inductor_config.cpp_wrapper is False  # scoped: later compiles (evaluation's) keep Inductor's default
    assert fast_loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(fast_grads) == set(ref_grads) and len(ref_grads) == 16
    for name, g in ref_grads.items():
        assert (fast_grads[name] - g).norm() <= 1e-4 * g.norm() + 1e-8, name


def test_compiled_decoder_layers_have_only_the_batch_and_its_length_as_symbols(
    tiny_model_dir, tiny_processing, mini_train
):
    """compile_layers' dynamic-shape decoder graphs see the rotary embedding's width (cos and sin's last size) as the
    constant it is (a symbolic width puts the rotary slices at offsets the kernels cannot prove aligned) and the batch
    and its length as symbols (so a new length compiles nothing)."""
    from torch.fx.experimental.symbolic_shapes import free_symbols

    from phi4_pron.fast.layers import compile_layers

    model = tiny_lora_model(tiny_model_dir).train()
    compile_layers(model, audio=False)
    graphs = []

    def record(gm, example_inputs):  # Dynamo's graph, as Inductor would get it
        graphs.append({n.name: n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"})
        return gm.forward

    config = model.config
    for layer in model.get_base_model().model.layers:
        layer.compile(dynamic=True, backend=record)  # compile_layers' own setting, seen through the recorder
    model(**joint_batch(tiny_processing, mini_train), use_cache=False)

    assert graphs
    cos_sin = [v for g in graphs for k, v in g.items() if "position_embeddings" in k]
    hidden = [v for g in graphs for k, v in g.items() if k.endswith("args_0_")]
    assert len(cos_sin) == 2 * len(graphs) and len(hidden) == len(graphs)
    width = int(config.hidden_size // config.num_attention_heads * config.rope_parameters["partial_rotary_factor"])
    for t in cos_sin:
        assert not free_symbols(t.shape[-1]) and t.shape[-1] == width  # in this order: == would specialize a symbol
    for t in hidden:
        assert all(free_symbols(n) for n in t.shape[:2])  # batch and length


def test_compiled_audio_layers_take_any_audio_length_and_batch_with_the_reference_gradients(tiny_model_dir):
    """Unfreeze's audio conformer layers, compiled and recomputed in the backward as training runs them (the first
    recomputed, the last kept): the first batch compiles them, and later audio lengths and batch sizes compile
    nothing, nor does a backward in a thread of another intra-op thread count (as autograd's GPU device thread), and
    the encoder's output and every gradient are the eager encoder's. Each was a recompilation once: a new length
    (Inductor's lowering of the convolution's backward fixed it, until the convolution ran token-major), a new batch
    after a first one as large as the attention's head count (duck sizing gave both one symbol, and the attention
    fixed it), and the thread count (when the backward called the compiled forward again to recompute it). The
    compiled backward recomputes the layer itself: the backward enters no compiled region."""
    import threading

    import numpy as np
    from transformers import AutoModelForCausalLM

    from phi4_pron.fast.layers import TokenMajorConvModule, checkpoint_audio_layers, compile_layers
    from phi4_pron.modeling import audio_encoder

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
    encoder = audio_encoder(model).requires_grad_(True)
    for p in encoder.parameters():  # the published zero-initialised biases would hide a wrong bias path
        torch.nn.init.normal_(p, std=0.05)
    size, heads = model.config.audio_config.input_size, model.config.audio_config.num_attention_heads

    def backward_in_a_thread_of_one(loss):
        errors = []

        def run_backward():
            torch.set_num_threads(1)
            try:
                loss.backward()
            except Exception as e:  # noqa: BLE001 - re-raised in the test's thread
                errors.append(e)

        thread = threading.Thread(target=run_backward)
        thread.start()
        thread.join()
        if errors:
            raise errors[0]

    def run_inputs(frames: int, batch: int):
        features = torch.randn(batch, frames, size, generator=torch.Generator().manual_seed(frames))
        mask = torch.ones(batch, frames, dtype=torch.bool)
        mask[-1, frames // 2 :] = False  # a shorter recording in the batch
        np.random.seed(0)  # the encoder draws its streaming-mask layout in training mode
        return features, mask

    def run(frames: int, batch: int, in_thread: bool = False):
        encoder.zero_grad()
        out = encoder(*run_inputs(frames, batch))
        loss = out.pow(2).mean()
        backward_in_a_thread_of_one(loss) if in_thread else loss.backward()
        return out.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters()}

    # 10, 17, 26, 7 frames after the encoder's 8x time reduction; the first batch is as large as the head count
    calls = [(80, heads), (136, 2), (208, 3, True), (56, 2)]
    ref = [run(*c) for c in calls]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # unlike the backward thread's 1, on any machine
    try:
        compile_layers(model)
        assert checkpoint_audio_layers(model, kept=1) == 1
        assert all(type(layer.conv) is TokenMajorConvModule for layer in encoder.encoders)
        fast = [run(*calls[0])]
        with torch.compiler.set_stance("fail_on_recompile"):  # raises at a recompilation
            fast += [run(*c) for c in calls[1:]]
            loss = encoder(*run_inputs(*calls[1][:2])).pow(2).mean()
            with torch.profiler.profile() as backward:
                loss.backward()
    finally:
        torch.set_num_threads(threads)
    assert not [e.name for e in backward.events() if e.name.startswith("Torch-Compiled Region")]
    for (ref_out, ref_grads), (out, grads) in zip(ref, fast, strict=True):
        assert (out - ref_out).abs().max() <= 1e-4 * ref_out.abs().max()
        assert set(grads) == set(ref_grads)
        for name, g in ref_grads.items():
            assert (grads[name] - g).norm() <= 1e-4 * g.norm() + 1e-8, name


def test_checkpointed_audio_encoder_gives_the_same_gradients(tiny_model_dir, tiny_processing, mini_train):
    """hardware.checkpoint_audio_encoder (Unfreeze at a larger batch): each audio layer runs again in the backward
    but the last hardware.audio_layers_kept, and the loss and every trained gradient are those of the kept
    activations."""
    import numpy as np

    from phi4_pron.fast.layers import checkpoint_audio_layers
    from phi4_pron.jobs.train import load_model
    from phi4_pron.modeling import audio_encoder

    cfg = compose(["model=tiny", "train_audio_encoder=true", "lora=r64", "lora.dropout=0.0"])
    model = load_model(cfg)[0].train()
    batch = joint_batch(tiny_processing, mini_train)
    layers = audio_encoder(model).encoders
    calls = []
    layers[0].feed_forward_in.register_forward_hook(lambda *_: calls.append("first"))
    layers[-1].feed_forward_in.register_forward_hook(lambda *_: calls.append("last"))

    def loss_and_gradients():
        calls.clear()
        model.zero_grad()
        np.random.seed(0)  # the encoder's streaming mask is random in training
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.item(), grads, sorted(calls)

    loss, grads, runs = loss_and_gradients()
    assert checkpoint_audio_layers(model, kept=1) == len(layers) - 1
    loss_ckpt, grads_ckpt, runs_ckpt = loss_and_gradients()
    assert runs == ["first", "last"]
    assert runs_ckpt == ["first", "first", "last"]  # the first recomputed in the backward, the last kept
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert any(".modules_to_save." in n and g.abs().sum() > 0 for n, g in grads.items())
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_prepare_recomputes_unfreezes_compiled_audio_layers(tiny_model_dir):
    """The a100/h100 presets' Unfreeze: prepare() compiles the decoder and audio layers, and recomputes each audio
    layer but the last ``hardware.audio_layers_kept`` in the backward (a checkpoint inside its compiled region). The
    preset keeps 8 of Phi-4's 24; the tiny model has 2, so here it keeps 1."""

    from phi4_pron.fast.layers import RecomputedConformerLayer
    from phi4_pron.jobs.train import prepare
    from phi4_pron.modeling import audio_encoder

    assert compose(["hardware=h100"]).hardware.audio_layers_kept == 8
    overrides = ["model=tiny", "data=mini", "train_audio_encoder=true", "hardware=h100", "hardware.num_gpus=0"]
    cfg = compose(
        [*overrides, "hardware.audio_layers_kept=1", "data.max_train_samples=2", "hardware.dataloader_num_workers=0"]
    )
    assert cfg.hardware.checkpoint_audio_encoder and cfg.hardware.compile
    model = prepare(cfg).model
    first, last = audio_encoder(model).encoders
    assert type(first) is RecomputedConformerLayer and type(last) is not RecomputedConformerLayer
    assert first._compiled_call_impl is not None and last._compiled_call_impl is not None
    assert all(layer._compiled_call_impl for layer in model.get_base_model().model.layers)


def test_a_missing_cpp_compiler_is_named_before_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-c++")  # what Inductor looks for (torch._inductor.config.cpp.cxx)
    args = ["experiment=smoke", "hardware.compile=true", "hardware.compile_cpp_wrapper=true", f"output_root={tmp_path}"]
    proc = run_cli(["-m", "phi4_pron.train", *args], check=False, timeout=120)
    assert proc.returncode != 0 and "hardware.compile_cpp_wrapper=false" in proc.stderr
    assert "no-such-c++" in proc.stderr and "Loading weights" not in proc.stderr
    proc = run_cli(["-m", "phi4_pron.check", *args], check=False, timeout=300)
    assert proc.returncode == 1 and "[FAIL] C++ compiler" in proc.stdout and "[ ok ] generation" in proc.stdout


def test_the_compilers_caches_go_to_the_cache_folder_unless_the_user_names_one(tmp_path, monkeypatch):
    """A second run (or sweep job) reuses what the first compiled: Inductor's caches in <cache_dir>/torch_compile,
    even though torch writes its own default folder into the environment when it is first imported."""
    import os
    from types import SimpleNamespace

    import torch
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from phi4_pron.fast.layers import compiler_caches

    torch._dynamo.reset()
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with compiler_caches(SimpleNamespace(compile=True), tmp_path):
        torch.compile(lambda x: x.sin() * 3 + 1)(torch.randn(8))
    assert any((tmp_path / "torch_compile").rglob("*.py")) and os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before
    assert before in (None, default_cache_dir())
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    with compiler_caches(SimpleNamespace(compile=True), tmp_path / "other"):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
