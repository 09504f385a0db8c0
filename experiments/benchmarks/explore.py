"""Where the H100 training step and decoding time go: the exploration behind the h100 preset's choices.

    OUT=experiments/benchmarks python experiments/benchmarks/explore.py train gen   # appends to explore.jsonl

GPU only, full-size random-weight model (``phi4_pron.bench``), one pre-collated batch of 32 utterances of 4.1 s.
Train: the audio encoder's forward; the Trainer's training step (bf16 autocast as ``Trainer.train`` sets it up)
for r64 / r320 / r64 without dropout, with a kernel table from torch.profiler; LoRA GEMM shapes; Liger's RMSNorm +
SwiGLU kernels; decoder layers compiled (first step, new lengths, steady state, batch 32 at 15 s, 48, 64).
Gen: dynamic-cache ``generate`` at batch 256 / 512 (1 and 64 new tokens), a profile, and a static cache with
compiled decoding. ``explore.jsonl`` holds the figures of 2026-11-22 (the prompt then: 196 tokens per sample;
Liger needs its wheel, liger-kernel 0.8.5). The run that wrote it also timed the compiled steady state once
before the two new lengths; the script is otherwise as run, tidied.
"""

import json
import os
import statistics
import sys
import tempfile
import time

import torch

from phi4_pron import bench

OUT = os.environ.get("OUT", ".")
WHAT = sys.argv[1:] or ["train", "gen"]


def log(**kw):
    print(json.dumps(kw), flush=True)
    with open(f"{OUT}/explore.jsonl", "a") as f:
        f.write(json.dumps(kw) + "\n")


def sync():
    torch.cuda.synchronize()


def timeit(fn, steps=5, warm=2):
    for _ in range(warm):
        fn()
    sync()
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def kernel_table(prof, steps, top=22):
    """GPU time per step (ops and their kernels both count) and the top entries."""
    rows: dict[str, float] = {}
    for e in prof.key_averages():
        if e.self_device_time_total > 0:
            rows[e.key] = rows.get(e.key, 0) + e.self_device_time_total
    out = sorted(rows.items(), key=lambda kv: -kv[1])[:top]
    return sum(rows.values()) / steps / 1e3, [(k[:60], round(v / steps / 1e3, 2)) for k, v in out]


def profile_steps(fn, steps=2):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        sync()
    return kernel_table(prof, steps)


from transformers import Phi4MultimodalFeatureExtractor  # noqa: E402

tok = bench.bench_tokenizer(False)
fe = Phi4MultimodalFeatureExtractor()


def make_batch(n, seconds, with_answer=True, padding_side="right"):
    from phi4_pron.collator import PronunciationCollator

    rows = bench.synthetic_rows(n, seed=3, seconds=seconds)
    c = PronunciationCollator(tok, fe, with_answer=with_answer, padding_side=padding_side)
    return {k: v.cuda() for k, v in c(rows).items()}


def lora(model, r, dropout):
    from omegaconf import OmegaConf

    from phi4_pron.modeling import attach_speech_lora

    cfg = OmegaConf.create(
        {"init": "fresh", "r": r, "alpha": 2 * r, "dropout": dropout, "target_modules": bench.LORA_TARGETS}
    )
    return attach_speech_lora(model, cfg, path="")


def trainer_for(model):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from phi4_pron.collator import PronunciationCollator

    args = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        bf16=True,
        report_to=[],
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        per_device_train_batch_size=32,
    )
    tr = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(bench.synthetic_rows(2, seed=1)),
        data_collator=PronunciationCollator(tok, fe),
        processing_class=tok,
    )
    tr.create_optimizer_and_scheduler(num_training_steps=100)
    tr.current_gradient_accumulation_steps = 1
    tr.prepared = tr.accelerator.prepare(tr.model)  # as Trainer.train does: the forward under bf16 autocast
    return tr


def release(tr, model):
    tr.model = tr.model_wrapped = tr.optimizer = tr.prepared = None
    tr.accelerator.free_memory()
    base = model.unload()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return base


def train_part():
    batch = make_batch(32, 4.1)
    ntok = int(batch["attention_mask"].sum())
    log(what="batch", tokens=ntok, shape=list(batch["input_ids"].shape), answer=int((batch["labels"] != -100).sum()))
    base = bench.build_model(tok, False, "sdpa")
    emb = base.model.embed_tokens_extend
    with torch.no_grad():
        ie = base.model.embed_tokens(batch["input_ids"])
        base.train()
        ms = 1e3 * timeit(
            lambda: emb(
                batch["input_ids"],
                ie,
                audio_input_features=batch["audio_input_features"],
                audio_embed_sizes=batch["audio_embed_sizes"],
                audio_attention_mask=batch["audio_attention_mask"],
            )
        )
        log(what="audio embedding forward (train mode, no grad)", ms=ms)
    n_lm = bench.lm_params(base)

    def tflops(s, n=ntok):
        return 4 * n_lm * n / s / 1e12

    for r, dp in ((64, 0.05), (320, 0.01), (64, 0.0)):
        model = lora(base, r, dp)
        tr = trainer_for(model)

        def step(tr=tr):
            tr.training_step(tr.prepared, dict(batch))

        s = timeit(step)
        log(
            what="training_step", r=r, dropout=dp, s=s, tflops=tflops(s), peak=torch.cuda.max_memory_allocated() / 2**30
        )
        if dp > 0:
            busy, table = profile_steps(step)
            log(what="profile", r=r, gpu_busy_ms=busy, wall_ms=s * 1e3, top=table)
        base = release(tr, model)

    import triton.testing as tt

    for k in (3072, 8192):
        for r in (64, 320):
            x = torch.randn(ntok, k, device="cuda", dtype=torch.bfloat16)
            g = torch.randn(ntok, r, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(r, k, device="cuda", dtype=torch.bfloat16)
            log(
                what="lora gemm",
                k=k,
                r=r,
                wgrad_ms=tt.do_bench(lambda g=g, x=x: g.t() @ x, return_mode="median"),
                fwd_ms=tt.do_bench(lambda x=x, w=w: x @ w.t(), return_mode="median"),
                dgrad_ms=tt.do_bench(lambda g=g, w=w: g @ w, return_mode="median"),
            )

    try:
        from liger_kernel.ops import LigerRMSNormFunction, LigerSiLUMulFunction
        from transformers.models.phi4_multimodal import modeling_phi4_multimodal as m

        orig = m.Phi4MultimodalRMSNorm.forward, m.Phi4MultimodalMLP.forward

        def norm_fwd(self, x):
            return LigerRMSNormFunction.apply(x, self.weight, self.variance_epsilon, 0.0, "llama", False, None)

        def mlp_fwd(self, x):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(LigerSiLUMulFunction.apply(gate, up))

        m.Phi4MultimodalRMSNorm.forward, m.Phi4MultimodalMLP.forward = norm_fwd, mlp_fwd
        model = lora(base, 64, 0.05)
        tr = trainer_for(model)
        s = timeit(lambda: tr.training_step(tr.prepared, dict(batch)))
        log(
            what="training_step liger norm+swiglu",
            r=64,
            s=s,
            tflops=tflops(s),
            peak=torch.cuda.max_memory_allocated() / 2**30,
        )
        m.Phi4MultimodalRMSNorm.forward, m.Phi4MultimodalMLP.forward = orig
        base = release(tr, model)
    except ImportError as e:
        log(what="liger not installed", error=repr(e))

    model = lora(base, 64, 0.05)
    tr = trainer_for(model)
    for layer in base.model.layers:
        layer.compile()
    for name, b in (
        ("compile first step", batch),
        ("first step at a new length", make_batch(32, 3.0)),
        ("first step at a third length", make_batch(32, 6.0)),
    ):
        t0 = time.perf_counter()
        tr.training_step(tr.prepared, dict(b))
        sync()
        log(what=f"compiled: {name}", s=time.perf_counter() - t0)
    s = timeit(lambda: tr.training_step(tr.prepared, dict(batch)))
    log(what="training_step compiled layers (dynamic)", r=64, s=s, tflops=tflops(s))
    busy, table = profile_steps(lambda: tr.training_step(tr.prepared, dict(batch)))
    log(what="profile compiled", r=64, gpu_busy_ms=busy, wall_ms=s * 1e3, top=table)
    for n, sec in ((32, 15.0), (48, 4.1), (64, 4.1)):
        try:
            torch.cuda.reset_peak_memory_stats()
            bb = make_batch(n, sec)
            nt = int(bb["attention_mask"].sum())
            s = timeit(lambda bb=bb: tr.training_step(tr.prepared, dict(bb)), steps=3, warm=1)
            log(
                what="compiled batch",
                n=n,
                seconds=sec,
                s=s,
                tflops=tflops(s, nt),
                epoch_s=2500 / n * s,
                peak_reserved=torch.cuda.max_memory_reserved() / 2**30,
            )
        except torch.cuda.OutOfMemoryError:
            log(what="compiled batch OOM", n=n, seconds=sec)
        torch.cuda.empty_cache()


def gen_part():
    from phi4_pron.answer import END

    base = bench.build_model(tok, False, "sdpa").eval()
    kw = dict(
        do_sample=False, eos_token_id=[tok.convert_tokens_to_ids(END), tok.eos_token_id], pad_token_id=tok.pad_token_id
    )
    for bs in (256, 512):
        batch = make_batch(bs, 4.1, with_answer=False, padding_side="left")
        with torch.inference_mode():
            for n in (1, 64):
                s = timeit(
                    lambda n=n, batch=batch: base.generate(**batch, max_new_tokens=n, min_new_tokens=n, **kw),
                    steps=2,
                    warm=1,
                )
                log(
                    what="generate dynamic", batch=bs, new_tokens=n, s=s, peak=torch.cuda.max_memory_allocated() / 2**30
                )
            if bs == 256:
                busy, table = profile_steps(
                    lambda batch=batch: base.generate(**batch, max_new_tokens=16, min_new_tokens=16, **kw), 1
                )
                log(what="profile generate 16 tokens", batch=bs, gpu_busy_ms=busy, top=table)
    batch = make_batch(256, 4.1, with_answer=False, padding_side="left")
    other = make_batch(256, 3.0, with_answer=False, padding_side="left")
    with torch.inference_mode():
        for name, b, n in (
            ("first (compile)", batch, 64),
            ("again", batch, 64),
            ("other length", other, 64),
            ("again 1 token", batch, 1),
        ):
            t0 = time.perf_counter()
            base.generate(**b, max_new_tokens=n, min_new_tokens=n, cache_implementation="static", **kw)
            sync()
            log(what=f"generate static {name}", new_tokens=n, s=time.perf_counter() - t0)


if __name__ == "__main__":
    if "train" in WHAT:
        train_part()
    if "gen" in WHAT:
        gen_part()
