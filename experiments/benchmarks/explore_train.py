"""Where the h100 preset's training step goes, through the framework's trainer (``bench.run_training_setting``).

    OUT=experiments/benchmarks python experiments/benchmarks/explore_train.py [i ...]   # appends explore_train.jsonl

GPU only. Variants of the h100 preset (r64 unless named) in one process, so that only the first compiles cold;
profiled ones write ``profile-explore-<i>.txt`` (torch.profiler kernel tables of one optimizer step) and
``profile-explore-<i>.trace.json.gz`` (its Chrome trace; ``trace_gaps.py`` reads it).

``explore_train.jsonl`` holds three runs of 2026-11-23: the last (rows 27-30: variants 0 6 7 1) with the audio
embeddings cached (the preset since), profiled in ``profile-explore-0.txt``; before it (rows 12-26) two runs, the
first with variants since replaced (TRL's trainer against the PronunciationTrainer, then the NaN check off, fused
AdamW, audio features padded to 64 frames, tokens padded to 32: the last two not adopted and removed), the second
with variants 0-5 below; and two runs of 2026-11-22 (``sdpa_cudnn``: whether SDPA could pick cuDNN's attention).
Both compiled the decoder layers only (the audio layers came after), and had two switches since removed:
``compile_audio`` (the audio layers too: adopted) and ``input_cast: false`` (PEFT's cast of each LoRA input to
fp32 turned off: no gain, not adopted). The first run's profile is ``profile-explore-cudnn-0.txt``; the profile of
the preset before the cache is ``profile-explore-audio-every-step.txt``.
"""

import json
import os
import sys
from pathlib import Path

from transformers import Phi4MultimodalFeatureExtractor

from phi4_pron import bench, trainer

FRAMEWORK_TRAINER = trainer.PronunciationTrainer

OUT = Path(os.environ.get("OUT", "."))
BASE = bench._preset_train("h100", "r64")
BEFORE = {"trainer": "trl", "optimizer": "adamw_torch", "nan_filter": True}  # the h100 preset of 2026-11-22
VARIANTS = [  # name, changes to the preset, profiled
    ("h100 preset (first: compiles cold)", {}, True),
    ("h100 preset", {}, False),
    ("h100 preset, padding mask kept", {"padding_mask": True}, False),
    ("h100 preset", bench._preset_train("h100", "r320"), False),
    ("before: TRL's SFTTrainer, AdamW (foreach), NaN check", BEFORE, False),
    ("h100 preset, again", {}, False),
    ("h100 preset, audio embeddings cached in batches of 64", {"cache_batch": 64}, False),
    ("h100 preset, audio embeddings cached in batches of 32", {"cache_batch": 32}, False),
]
STEPS = int(os.environ.get("STEPS", 15))


class KeepPaddingMask(trainer.PronunciationTrainer):
    """The framework's trainer, giving the model its padding mask (so SDPA takes its masked kernel)."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        collator, self.data_collator = self.data_collator, None  # not known to be right-padded: mask kept
        try:
            return super().compute_loss(model, inputs, *args, **kwargs)
        finally:
            self.data_collator = collator


tok = bench.bench_tokenizer(False)
fe = Phi4MultimodalFeatureExtractor()
for i in [int(a) for a in sys.argv[1:]] or range(len(VARIANTS)):
    name, change, profile = VARIANTS[i]
    setting = {**BASE, **change, "setting": name}
    trainer.PronunciationTrainer = KeepPaddingMask if setting.get("padding_mask") else FRAMEWORK_TRAINER
    prof = OUT / f"profile-explore-{i}.txt" if profile else None
    try:
        r = bench.run_training_setting(setting, tok, fe, tiny=False, steps=STEPS, warmup=3, profile=prof)
    except Exception as e:  # one failed variant must not cost the others
        r = {**setting, "error": repr(e)[-1500:]}
    r.update(bench.versions(), command=f"python experiments/benchmarks/explore_train.py {i}")
    print(json.dumps(r), flush=True)
    with open(OUT / "explore_train.jsonl", "a") as f:
        f.write(json.dumps(r) + "\n")
