"""Reference path: record reference outputs of the original VARGPT-v1.1 PyTorch code.

``vargpt-mlx reference random`` builds a random-weight upstream checkpoint of any size and
``vargpt-mlx reference record`` runs the upstream code on a checkpoint and writes the
``refs.safetensors`` + ``refs.json`` bundle that ``vargpt-mlx verify`` reads. The upstream code is
imported from a directory the user names (``--upstream DIR``); nothing of it is copied here.

The recording runs in its own process (``worker.py``) started with the *reference interpreter*:
the one that has the ``[reference]`` extra (torch, transformers 4.46.x, ...). transformers 4.46
cannot share an environment with mlx-lm >= 0.30 (it needs transformers >= 5) or with the test
extra, so the reference interpreter is usually a separate virtual environment: ``--python PY``,
else ``$VARGPT_REFERENCE_PYTHON``, else the current interpreter. Everything the upstream code needs
on a machine without CUDA (the ``flash_attn`` stand-in, the torchvision guard, the size overrides)
lives in that process only: see ``upstream_env.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

WORKER = Path(__file__).resolve().with_name("worker.py")
ENV_PYTHON = "VARGPT_REFERENCE_PYTHON"


class ReferenceError(RuntimeError):
    """The recorder reported a user error (its one-line message) or failed."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def reference_python(explicit: str | None = None) -> str:
    """The interpreter that runs the recorder (see the module docstring)."""
    py = explicit or os.environ.get(ENV_PYTHON) or sys.executable
    if not Path(py).is_file():
        raise ReferenceError(f"reference interpreter {py} does not exist (--python or ${ENV_PYTHON})")
    return py


def check_upstream(upstream: str | Path) -> Path:
    up = Path(upstream).expanduser()
    if not up.is_dir():
        raise ReferenceError(f"upstream directory {upstream} does not exist")
    if not (up / "vargpt_qwen_v1_1" / "modeling_vargpt_qwen2_vl.py").is_file():
        raise ReferenceError(f"{upstream} does not hold the VARGPT-v1.1 code "
                             "(no vargpt_qwen_v1_1/modeling_vargpt_qwen2_vl.py)")
    return up.resolve()


def run_worker(args: list[str], python: str | None = None, on_line: Callable[[str], None] | None = None,
               debug: bool = False, timeout: float | None = None) -> dict:
    """Run ``worker.py ARGS`` with the reference interpreter; returns its JSON result.

    ``on_line`` receives the worker's progress lines (``[reference] ...``; every stderr line with
    ``debug``). A user error in the worker (exit 2) raises ``ReferenceError`` with its one line.
    """
    py = reference_python(python)
    env = dict(os.environ)
    env.setdefault("TORCHDYNAMO_DISABLE", "1")
    if debug:
        env["VARGPT_REFERENCE_DEBUG"] = "1"
    proc = subprocess.Popen([py, str(WORKER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    tail: list[str] = []
    assert proc.stderr is not None and proc.stdout is not None
    for line in proc.stderr:
        line = line.rstrip("\n")
        tail = (tail + [line])[-40:]
        if on_line and (debug or line.startswith("[reference]")):
            on_line(line)
    out = proc.stdout.read()
    rc = proc.wait(timeout=timeout)
    if rc != 0:
        errors = [t[len("error: "):] for t in tail if t.startswith("error: ")]
        if rc == 2 and errors:
            raise ReferenceError(errors[-1], 2)
        detail = errors[-1] if errors else (tail[-1] if tail else "no output")
        raise ReferenceError(f"the recorder failed (exit {rc}): {detail} (--debug shows its traceback)", 1)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}
