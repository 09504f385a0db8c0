"""What each command runs: ``python -m phi4_pron.<command>`` (a thin Hydra entrypoint that checks the settings
before any heavy import) calls the job of the same name here."""
