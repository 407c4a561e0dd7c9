"""Where the tests find the reference path: the upstream code and an interpreter with the
``[reference]`` extra (torch, transformers 4.46.x). Not a test module.

* upstream: ``$VARGPT_UPSTREAM``, else ``../shared/upstream`` beside the repository;
* interpreter: ``$VARGPT_REFERENCE_PYTHON``, else ``.venv-reference/bin/python`` in the repository
  (what ``.ci/run`` makes), else the interpreter running the tests; the first one whose recorder
  self-test passes.

Without them the reference tests skip with the reason, unless ``VARGPT_REQUIRE_LIVE=1`` (CI sets
it), which turns the skip into a failure.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "vargpt_mlx" / "reference" / "worker.py"


def upstream_dir() -> Path | None:
    p = Path(os.environ.get("VARGPT_UPSTREAM") or REPO.parent / "shared" / "upstream")
    return p if (p / "vargpt_qwen_v1_1" / "modeling_vargpt_qwen2_vl.py").is_file() else None


@functools.lru_cache(maxsize=None)
def _probe() -> tuple[str | None, str]:
    candidates = [os.environ.get("VARGPT_REFERENCE_PYTHON"), str(REPO / ".venv-reference" / "bin" / "python"),
                  sys.executable]
    reason = "no reference interpreter"
    for py in [c for c in candidates if c]:
        if not Path(py).is_file():
            continue
        r = subprocess.run([py, str(WORKER), "selftest"], capture_output=True, text=True, timeout=600)
        if r.returncode == 0:
            return py, ""
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
        reason = f"{py}: {errors[-1] if errors else r.stderr.strip()[-200:]}"
    return None, reason


def _unavailable(reason: str):
    if os.environ.get("VARGPT_REQUIRE_LIVE") == "1":
        pytest.fail(f"reference path required (VARGPT_REQUIRE_LIVE=1) but unavailable: {reason}")
    pytest.skip(f"reference path unavailable: {reason}")


def require() -> tuple[str, Path]:
    """(reference interpreter, upstream dir), or skip / fail with the reason."""
    up = upstream_dir()
    if up is None:
        _unavailable("no upstream code (set VARGPT_UPSTREAM or put it in ../shared/upstream)")
    py, reason = _probe()
    if py is None:
        _unavailable(f"no interpreter with the [reference] extra ({reason}); set VARGPT_REFERENCE_PYTHON")
    return py, up


def openblas_env() -> dict:
    """Environment for an MLX subprocess: OpenBLAS preloaded when the system has it (the MLX CPU
    wheel's own BLAS is ~7x slower for the VAE's float32 convolutions, README)."""
    env = dict(os.environ)
    lib = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")
    if lib.is_file() and "LD_PRELOAD" not in env:
        env["LD_PRELOAD"] = str(lib)
    return env


def run_cli(args: list[str], env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """``vargpt-mlx ARGS`` in a subprocess of the test interpreter."""
    return subprocess.run([sys.executable, "-m", "vargpt_mlx.cli.main", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)


def last_json(text: str) -> dict:
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}
