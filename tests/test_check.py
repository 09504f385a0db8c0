"""``python -m phi4_pron.check``: the pre-flight passes on the tiny checkpoint, through the real entrypoint."""

from __future__ import annotations

import pytest
from conftest import run_cli


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize("lora", ["r64", "r320"])
def test_check_passes_on_the_tiny_checkpoint(lora):
    compiled = ["hardware.compile=true", "hardware.compile_cpp_wrapper=true"] if lora == "r320" else []
    proc = run_cli(["-m", "phi4_pron.check", "experiment=smoke", f"lora={lora}", *compiled])
    assert proc.stdout.count("[ ok ]") == 7 and "all checks passed" in proc.stdout
    assert ("builds the compiled layers' kernel launchers" in proc.stdout) == (lora == "r320")
    assert ("16 tensors loaded from speech-lora/" in proc.stdout) == (lora == "r320")


@pytest.mark.slow  # a subprocess
def test_check_checks_the_data_it_is_given(tmp_path):
    proc = run_cli(["-m", "phi4_pron.check", "experiment=smoke", f"data.path={tmp_path}/nosuch"], check=False)
    assert "[FAIL] data: DataError: data.path=" in proc.stdout and "nosuch" in proc.stdout
    assert "all checks passed" not in proc.stdout and proc.returncode != 0
    assert "[skip] tokenizer, feature extractor, model" in proc.stdout  # nothing loads
