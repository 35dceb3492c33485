"""The CUDA HTA-KL kernel's shared-memory layout arithmetic, checked on the host: per-step values
padded to whole step groups (so that a group's vector read of step_lse never reaches
step_g_sums), their bytes, and the largest T the launcher accepts. tests/cuda/hta_kl_layout_check.cu
includes the kernel header and runs the launcher's own functions; it needs nvcc, not a GPU.
"""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_layout_arithmetic(tmp_path):
    flags = runpy.run_path(os.path.join(REPO, "scripts", "gpu_flags.py"))
    binary = str(tmp_path / "hta_kl_layout_check")
    subprocess.run(
        ["nvcc", "-std=c++17", *flags["TORCH_NVCC_DEFINES"], f"-I{os.path.join(REPO, 'csrc')}",
         os.path.join(REPO, "tests", "cuda", "hta_kl_layout_check.cu"), "-o", binary],
        check=True, capture_output=True)
    result = subprocess.run([binary], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
