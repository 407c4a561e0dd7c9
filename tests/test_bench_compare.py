"""Smoke test of ``benchmarks/compare_upstream.py --quick``: the original and the port run on one
freshly built random checkpoint and the side-by-side table comes out with every figure.

Needs the reference path (upstream code + an interpreter with the ``[reference]`` extra, see
``tests/reference_env.py``) and skips cleanly without it. One thread, one BLAS column (OpenBLAS
where installed), so it stays well under a minute.
"""

from __future__ import annotations

import ctypes.util
import json
import subprocess
import sys

from tests import reference_env as env
from vargpt_mlx import schedules

SCRIPT = env.REPO / "benchmarks" / "compare_upstream.py"


def test_compare_upstream_quick(tmp_path):
    py, up = env.require()
    blas = "openblas" if ctypes.util.find_library("openblas") else "default"
    out = tmp_path / "figures.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--blas", blas,
                        "--work", str(tmp_path / "work"), "--reference-python", py, "--upstream", str(up),
                        "--json", str(out)], capture_output=True, text=True, cwd=env.REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| s per image (256x256) |" in r.stdout and "ratio" in r.stdout
    assert "memory bandwidth" in r.stdout and "VAE decode" in r.stdout
    res = json.loads(out.read_text())
    col = "port_openblas" if blas == "openblas" else "port_default"
    assert set(res["results"]) == {"original", col}
    assert res["bandwidth_gbs"] > 0
    for side in res["results"].values():
        assert side["prefill_s"] > 0 and side["decode_s"] > 0 and side["vae_alone_s"] > 0
        assert side["gemm_gflops"] > 0 and side["rss_peak_gib"] > 0
        img = side["image"]
        assert img["scales"] == 7  # pn 0.06M, 1:1
        assert img["total_s"] >= img["vae_s"] > 0 and img["llm_s"] > 0 and img["infinity_s"] > 0
        assert img["sampling_s"] > 0
    work = res["results"][col]["work"]
    assert work["vae_flops"] > 0
    assert work["image_tokens"] == sum(h * w for h, w in schedules.get_schedule("0.06M"))
