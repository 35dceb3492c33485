"""Run Triton's real compiler (for an NVIDIA target, no GPU needed) in a child process.

The test processes set TRITON_INTERPRET=1 before importing the kernels, and under the interpreter
triton.jit returns nothing compilable; the child runs without it. Its stdout is returned.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_compiler_script(script: str) -> str:
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton has no bundled NVIDIA ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def parse_usage(stdout: str) -> list[tuple[int, int]]:
    """The (registers, spill bytes) pairs a script printed, one pair per line."""
    return [tuple(map(int, line.split())) for line in stdout.split("\n") if line.strip()]
