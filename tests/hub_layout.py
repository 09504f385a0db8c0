"""The bundled corpus as a user gets the hub dataset: ``hf download mispeech/speechocean762 --repo-type dataset``.

The published layout (the hub's ``main``, checked against its dataset card): ``README.md`` whose YAML front matter
names the splits' files (``data/train-*``, ``data/test-*``) and their features, and one parquet file a split with the
columns in the card's order: integer utterance scores (``completeness`` a float), ``words`` as a list of structs with
``phones`` a list and ``mispronunciations`` a list of structs, ``speaker``, ``gender``, ``age``, and ``audio`` with
the WAV's bytes embedded and its file name (``000030012.wav``); no ``id`` column.
"""

from __future__ import annotations

import json
from pathlib import Path

CARD = """---
language:
- en
license: apache-2.0
size_categories:
- 1K<n<10K
task_categories:
- automatic-speech-recognition
pretty_name: speechocean762
tags:
- pronunciation-scoring
- arxiv:2104.01378
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
dataset_info:
  features:
  - name: accuracy
    dtype: int64
  - name: completeness
    dtype: float64
  - name: fluency
    dtype: int64
  - name: prosodic
    dtype: int64
  - name: text
    dtype: string
  - name: total
    dtype: int64
  - name: words
    list:
    - name: accuracy
      dtype: int64
    - name: phones
      sequence: string
    - name: phones-accuracy
      sequence: float64
    - name: stress
      dtype: int64
    - name: text
      dtype: string
    - name: total
      dtype: int64
    - name: mispronunciations
      list:
      - name: canonical-phone
        dtype: string
      - name: index
        dtype: int64
      - name: pronounced-phone
        dtype: string
  - name: speaker
    dtype: string
  - name: gender
    dtype: string
  - name: age
    dtype: int64
  - name: audio
    dtype: audio
---
# speechocean762 (a stand-in of the hub dataset's layout, made from data/speechocean762-mini)
"""


def _table(file: Path) -> dict[str, str]:
    return dict(line.split(maxsplit=1) for line in file.read_text().splitlines() if line.strip())


def _word(w: dict) -> dict:
    return {
        "accuracy": int(w["accuracy"]),
        "phones": w["phones"].split(),
        "phones-accuracy": [float(x) for x in w["phones-accuracy"]],
        "stress": int(w["stress"]),
        "text": w["text"],
        "total": int(w["total"]),
        "mispronunciations": [{**m, "index": int(m["index"])} for m in w["mispronunciations"]],
    }


def write_hub_snapshot(corpus: Path, out: Path) -> Path:
    """Write ``corpus`` (the release layout) to ``out`` in the hub dataset's layout; returns ``out``."""
    import yaml
    from datasets import Dataset, Features

    features = Features._from_yaml_list(yaml.safe_load(CARD.split("---")[1])["dataset_info"]["features"])
    scores = json.loads((corpus / "resource" / "scores.json").read_text())
    (out / "data").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        wavs, speakers = _table(corpus / split / "wav.scp"), _table(corpus / split / "utt2spk")
        genders, ages = _table(corpus / split / "spk2gender"), _table(corpus / split / "spk2age")
        rows = []
        for utt, rel in wavs.items():
            s, spk = scores[utt], speakers[utt]
            rows.append(
                {
                    "accuracy": int(s["accuracy"]),
                    "completeness": float(s["completeness"]),
                    "fluency": int(s["fluency"]),
                    "prosodic": int(s["prosodic"]),
                    "text": s["text"],
                    "total": int(s["total"]),
                    "words": [_word(w) for w in s["words"]],
                    "speaker": spk,
                    "gender": genders.get(spk, ""),
                    "age": int(ages.get(spk, ages.get(spk.lstrip("0"), "0"))),
                    "audio": {"bytes": (corpus / rel).read_bytes(), "path": f"{utt}.wav"},
                }
            )
        Dataset.from_list(rows, features=features).to_parquet(str(out / "data" / f"{split}-00000-of-00001.parquet"))
    (out / "README.md").write_text(CARD)
    return out
