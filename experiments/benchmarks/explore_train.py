"""Where the h100 preset's training step goes, through the framework's trainer (``bench.run_training_setting``).

    OUT=experiments/benchmarks python experiments/benchmarks/explore_train.py [i ...]   # appends explore_train.jsonl

GPU only. Variants of the h100 preset (r64 unless named) in one process, so that only the first compiles cold;
profiled ones write ``profile-explore-<i>.txt`` (torch.profiler kernel table of two optimizer steps).

``explore_train.jsonl`` holds two runs of 2026-11-22 (``sdpa_cudnn``: whether SDPA could pick cuDNN's attention).
Both compiled the decoder layers only (the audio layers came after), and had two switches since removed:
``compile_audio`` (the audio layers too: adopted) and ``input_cast: false`` (PEFT's cast of each LoRA input to
fp32 turned off: no gain, not adopted). The first run's profile is ``profile-explore-cudnn-0.txt``.
"""

import json
import os
import sys
from pathlib import Path

from transformers import Phi4MultimodalFeatureExtractor

from phi4_pron import bench

OUT = Path(os.environ.get("OUT", "."))
BASE = bench._preset_train("h100", "r64")
VARIANTS = [  # name, changes to the preset, profiled
    ("h100 preset", {}, True),
    ("h100 preset", bench._preset_train("h100", "r320"), False),
    ("length key: duration (before)", {"group_by": "duration"}, False),
    ("LoRA dropout 0 (pricing only)", {"dropout": 0.0}, False),
    ("h100 preset, second run in the process", {}, False),
]

tok = bench.bench_tokenizer(False)
fe = Phi4MultimodalFeatureExtractor()
for i in [int(a) for a in sys.argv[1:]] or range(len(VARIANTS)):
    name, change, profile = VARIANTS[i]
    setting = {**BASE, **change, "setting": name}
    prof = OUT / f"profile-explore-{i}.txt" if profile else None
    try:
        r = bench.run_training_setting(setting, tok, fe, tiny=False, steps=20, warmup=3, profile=prof)
    except Exception as e:  # one failed variant must not cost the others
        r = {**setting, "error": repr(e)[-1500:]}
    r.update(bench.versions(), command=f"python experiments/benchmarks/explore_train.py {i}")
    print(json.dumps(r), flush=True)
    with open(OUT / "explore_train.jsonl", "a") as f:
        f.write(json.dumps(r) + "\n")
