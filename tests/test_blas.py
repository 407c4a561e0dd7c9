"""The command line's fast-BLAS re-execution on Linux (``cli/blas.py``)."""

from __future__ import annotations

import sys

import pytest

from vargpt_mlx.cli import blas


@pytest.fixture
def calls(monkeypatch):
    seen = []
    monkeypatch.setattr(blas.os, "execve", lambda exe, argv, env: seen.append((exe, argv, env)))
    monkeypatch.setattr(blas.sys, "platform", "linux")
    monkeypatch.delitem(blas.sys.modules, "mlx.core", raising=False)
    for k in ("LD_PRELOAD", "VARGPT_MLX_NO_OPENBLAS", blas.GUARD):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(blas, "_cuda_backend", lambda: False)
    return seen


def test_reexecs_once_with_openblas_preloaded(calls, monkeypatch):
    monkeypatch.setattr(blas.ctypes.util, "find_library", lambda name: "libopenblas.so.0")
    monkeypatch.setattr(blas.sys, "orig_argv", ["python3", "-m", "vargpt_mlx.cli.main", "generate", "x"], raising=False)
    blas.ensure_fast_blas()
    assert len(calls) == 1
    exe, argv, env = calls[0]
    assert exe == sys.executable and argv == [sys.executable, "-m", "vargpt_mlx.cli.main", "generate", "x"]
    assert env["LD_PRELOAD"] == "libopenblas.so.0" and env[blas.GUARD] == "1"
    blas.ensure_fast_blas()  # the guard: never twice
    assert len(calls) == 1


@pytest.mark.parametrize("case", ["opt-out", "preloaded", "mlx-loaded", "macos", "cuda"])
def test_leaves_alone(calls, monkeypatch, case):
    monkeypatch.setattr(blas.ctypes.util, "find_library", lambda name: "libopenblas.so.0")
    if case == "opt-out":
        monkeypatch.setenv("VARGPT_MLX_NO_OPENBLAS", "1")
    elif case == "preloaded":
        monkeypatch.setenv("LD_PRELOAD", "/x/libfoo.so")
    elif case == "mlx-loaded":
        monkeypatch.setitem(blas.sys.modules, "mlx.core", object())
    elif case == "macos":
        monkeypatch.setattr(blas.sys, "platform", "darwin")
    else:
        monkeypatch.setattr(blas, "_cuda_backend", lambda: True)
    blas.ensure_fast_blas()
    assert calls == []


def test_hint_without_openblas(calls, monkeypatch, capsys):
    monkeypatch.setattr(blas.ctypes.util, "find_library", lambda name: None)
    blas.ensure_fast_blas()
    err = capsys.readouterr().err
    assert calls == [] and err.count("\n") == 1 and "apt-get install libopenblas0-pthread" in err
