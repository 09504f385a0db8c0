"""``python -m phi4_pron.assess model_path=... audio=... text=...`` (or ``audio_dir=... texts=...``): score
learners' recordings.

Composes the config, checks it, then runs :mod:`phi4_pron.jobs.assess`; heavy imports come only once the settings are
valid."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from phi4_pron.config import AssessConfig, check_settings  # importing registers the schema before Hydra composes


@hydra.main(version_base="1.3", config_path="../conf", config_name="assess")
def main(cfg: DictConfig) -> None:
    check_settings(cfg, AssessConfig)  # +key=value typos, values out of range: before any heavy import
    from phi4_pron.jobs.assess import run_assessment

    run_assessment(cfg)


if __name__ == "__main__":
    main()
