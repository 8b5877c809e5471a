"""SIGINT / SIGTERM during training: exit 130 / 143 (never 0 or 1), one line saying what was kept, nothing half-written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml


def _config(tmp_path: Path, cellbench5_path: Path) -> Path:
    config = {
        "dataset": {"name": "cb", "path": str(cellbench5_path), "batch_key": "batch", "label_key": "cell_line", "filter": {"demuxlet_cls": ["SNG"]}},
        "split": {"kind": "kfold", "n_splits": 3},
        "training": {"max_epochs": 100000, "batch_size": 16, "patience": 0},  # trains until stopped
        "models": [{"type": "ae", "hidden": [64], "latent_dim": 8}],
        "evaluation": {"figures": False},
        "output": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_training_exits_with_its_code_and_one_line(tmp_path, cellbench5_path, signum, code):
    config = _config(tmp_path, cellbench5_path)
    proc = subprocess.Popen([sys.executable, "-m", "scatlas", "run", str(config), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # wait until the first split is training
        if "split 1/3" in line or time.monotonic() > deadline:
            break
    time.sleep(3)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"interrupted by {signal.Signals(signum).name}") and f"scatlas run {config} --resume" in lines[-1]
    assert not list((tmp_path / "out").rglob("*.partial"))
