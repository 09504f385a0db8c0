"""How fast the Unfreeze training loader makes micro-batches of 8 (raw audio decoded and featurized in DataLoader
workers, as with train_audio_encoder=true), with no model: is data loading what an Unfreeze epoch waits for?

    python scripts/loader_rate.py [stand-in checkpoint] [corpus]   # defaults: the bench's stand-ins (output/bench/)
"""

import sys
import time

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from phi4_pron.answer import questions_from_config
from phi4_pron.collator import PronunciationCollator
from phi4_pron.config import REPO_ROOT
from phi4_pron.data import expand_questions, load_split, with_lengths
from phi4_pron.modeling import load_tokenizer_and_features

model = sys.argv[1] if len(sys.argv) > 1 else "output/bench/phi4mm-random"
corpus = sys.argv[2] if len(sys.argv) > 2 else "output/bench/corpus"
tokenizer, fe = load_tokenizer_and_features(model)
questions = questions_from_config(OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "conf" / "task" / "paper.yaml")))
collator = PronunciationCollator(tokenizer, fe, questions)
ds = with_lengths(expand_questions(load_split(corpus, "train"), list(questions)), collator.num_tokens)
for workers in (8, 16):
    batches = iter(DataLoader(ds, batch_size=8, shuffle=True, collate_fn=collator, num_workers=workers))
    next(batches)  # workers started
    start = time.perf_counter()
    for _ in range(200):
        next(batches)
    each = (time.perf_counter() - start) / 200
    print(
        f"{workers} workers: {1 / each:.1f} micro-batches/s; an epoch's {len(ds) // 8} take {len(ds) // 8 * each:.0f} s"
    )
torch.set_num_threads(1)
start = time.perf_counter()
for i in range(0, 80, 8):
    collator([ds[j] for j in range(i, i + 8)])
print(f"one process, one thread: {(time.perf_counter() - start) / 10 * 1000:.0f} ms a micro-batch")
