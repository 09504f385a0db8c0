"""How far each answer token's logit leads the runner-up, teacher-forced, for a run of tests/test_learning.py: its four
training recordings batched question by question as ``evaluate`` batches them (a recording's audio embeddings depend
on its batch's padding). Prints the smallest lead of each prompt; a negative one is a token greedy decoding gets wrong.

    python scripts/overfit_margins.py RUN_DIR      # the run folder (with final_model/) an overfit run leaves

pytest keeps the overfit runs of its last three sessions: ``/tmp/pytest-of-$USER/pytest-*/overfit*/run`` (after
``pytest tests/test_learning.py``; their order is RUNS' order).
"""

import sys

import torch

from phi4_pron.collator import IGNORE_INDEX, PronunciationCollator
from phi4_pron.config import REPO_ROOT
from phi4_pron.data import load_split
from phi4_pron.inference import load_adapter_for_inference

model, tokenizer, features, questions = load_adapter_for_inference(f"{sys.argv[1]}/final_model")
recordings = load_split(str(REPO_ROOT / "data" / "speechocean762-mini"), "train", limit=4)
collator = PronunciationCollator(tokenizer, features, questions)
leads = []
with torch.inference_mode():
    for question in questions:
        rows = [{**recordings[i], "question": question} for i in range(len(recordings))]
        batch = collator(rows)
        labels = batch.pop("labels")[:, 1:]
        logits = model(**batch).logits[:, :-1].float()
        for i in range(len(rows)):
            answer = labels[i] != IGNORE_INDEX
            scores, gold = logits[i][answer], labels[i][answer]
            top2 = scores.topk(2, dim=-1)
            other = torch.where(top2.indices[:, 0] == gold, top2.values[:, 1], top2.values[:, 0])
            leads.append((question, round((scores.gather(1, gold[:, None])[:, 0] - other).min().item(), 2)))
print(leads)
