"""bench/gpu.py, the script prepared for a GPU machine, runs end to end on CPU at a tiny
shape: every row that can run without a GPU gives a number, the others say "no GPU"."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU run of the GPU script")
def test_gpu_script_smoke_run_on_cpu():
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--smoke", "--steps", "1"],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("device: no GPU")
    dense, moe = lines[1], lines[2]
    for line in (dense, moe):
        assert re.search(r"[\d,]+ tokens/s, MFU: no GPU, peak memory: no GPU "
                         r"\(raymoe plan on cpu: \d+\.\d+ GiB\)", line), line
    # one read per step (token ids are checked where the data is read); the MoE layer with
    # dropping adds none
    assert dense.startswith("gpt-350m: 2 layers") and dense.endswith("host syncs per step 1")
    assert moe.startswith("gpt-350m-moe128: 2 layers") and moe.endswith("host syncs per step 1")
    assert float(lines[3].rsplit(": ", 1)[1]) > 0
    agree = re.search(r"grouped_mm / batched product: no GPU \(outputs agree to (\S+) on cpu\)", lines[4])
    assert agree and float(agree.group(1)) < 1e-5, lines[4]
