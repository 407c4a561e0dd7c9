"""Entry point of the recorder process: ``python worker.py {random,record,selftest} ...``.

``vargpt-mlx reference ...`` starts this file with the reference interpreter (the one that has the
``[reference]`` extra: torch, transformers 4.46.x, ...). It runs as a script, with only this folder
on ``sys.path`` (plus the upstream directory and, without a real ``flash_attn``, the stand-in), so
the recorder process never imports the MLX library and the MLX process never imports torch.

A user error (missing upstream directory, missing package, bad sizes, bad checkpoint) prints one
line ``error: ...`` on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vargpt-mlx reference")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("random")
    r.add_argument("--upstream", required=True)
    r.add_argument("--sizes", required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", required=True)
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    c = sub.add_parser("record")
    c.add_argument("--upstream", required=True)
    c.add_argument("--model", required=True)
    c.add_argument("--out")
    c.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    c.add_argument("--image")
    c.add_argument("--prompt")
    c.add_argument("--tokenizer")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--aspect", type=float, default=1.0)
    c.add_argument("--inputs-from")
    c.add_argument("--rerun", default="auto", choices=["auto", "on", "off"])
    c.add_argument("--parts", default="und,gen,vae,sft")
    c.add_argument("--annotate")
    s = sub.add_parser("selftest")
    s.add_argument("--upstream")
    return p


def selftest(upstream: str | None) -> dict:
    """Check the flash_attn stand-in against a float64 evaluation (varlen, GQA, causal) and, with
    ``upstream``, that the upstream code imports."""
    import importlib.util

    import torch

    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("flash_attn_standin",
                                                  os.path.join(here, "standins", "flash_attn", "__init__.py"))
    fa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fa)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for H, Hk, causal, lens_q, lens_k in [(4, 4, False, [3, 5], [7, 2]), (4, 2, True, [4, 6], [4, 9]),
                                          (6, 1, True, [5, 1], [3, 4]), (2, 2, False, [1, 1, 1], [5, 6, 7])]:
        d = 8
        q = torch.randn(sum(lens_q), H, d, generator=g)
        k = torch.randn(sum(lens_k), Hk, d, generator=g)
        v = torch.randn(sum(lens_k), Hk, d, generator=g)
        cq = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
        ck = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
        got = fa.flash_attn_varlen_func(q, k, v, cq, ck, max(lens_q), max(lens_k), softmax_scale=0.3, causal=causal)
        got_kv = fa.flash_attn_varlen_kvpacked_func(q, torch.stack([k, v], 1), cq, ck, max(lens_q), max(lens_k),
                                                    softmax_scale=0.3, causal=causal)
        assert torch.equal(got, got_kv)
        for s in range(len(lens_q)):
            qs, ks, vs = (t.double() for t in (q[cq[s]:cq[s + 1]], k[ck[s]:ck[s + 1]], v[ck[s]:ck[s + 1]]))
            ks, vs = ks.repeat_interleave(H // Hk, 1), vs.repeat_interleave(H // Hk, 1)
            sc = torch.einsum("qhd,khd->hqk", qs, ks) * 0.3
            if causal:
                Lq, Lk = qs.shape[0], ks.shape[0]
                allowed = torch.arange(Lk)[None] <= torch.arange(Lq)[:, None] + (Lk - Lq)
                sc = sc.masked_fill(~allowed, float("-inf"))
            p = torch.nan_to_num(torch.softmax(sc, -1), nan=0.0)
            ref = torch.einsum("hqk,khd->qhd", p, vs)
            worst = max(worst, float((got[cq[s]:cq[s + 1]].double() - ref).abs().max()))
    qb = torch.randn(3, 2, 8, generator=g).to(torch.bfloat16)
    kvb = torch.randn(4, 2, 2, 8, generator=g).to(torch.bfloat16)
    out_b = fa.flash_attn_varlen_kvpacked_func(qb, kvb, torch.tensor([0, 3], dtype=torch.int32),
                                               torch.tensor([0, 4], dtype=torch.int32), 3, 4)
    assert out_b.dtype == torch.bfloat16
    res = {"standin_max_abs_err_vs_float64": worst, "ok": worst < 1e-5}
    if upstream:
        import upstream_env

        res["env"] = upstream_env.prepare(upstream)
        upstream_env.modeling()
        res["upstream_import"] = "ok"
    return res


def main(argv=None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    args = _parser().parse_args(argv)
    debug = bool(os.environ.get("VARGPT_REFERENCE_DEBUG"))
    import contextlib
    import warnings

    warnings.simplefilter("ignore")  # upstream / timm / transformers deprecation chatter
    result_out = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):  # upstream prints freely; stdout carries the result
            res = _run(args)
    except Exception as e:  # one line, exit 2 (the recorder's user errors); a traceback with the debug flag
        import upstream_env
        import sizes

        user = (upstream_env.EnvError, sizes.SizeError, FileNotFoundError, FileExistsError, ValueError)
        if debug or not isinstance(e, user):
            traceback.print_exc()
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, user) else 1
    print(json.dumps(res, default=str), file=result_out, flush=True)
    return 0


def _run(args) -> dict:
    import upstream_env

    if args.cmd in ("random", "record"):
        upstream_env.check_upstream_dir(args.upstream)
        upstream_env.check_packages()
    if args.cmd == "random":
        import build

        return build.build_random(args.upstream, args.sizes, args.seed, args.out, args.dtype)
    if args.cmd == "record":
        import record

        if not args.out and not args.annotate:
            raise ValueError("record needs --out")
        return record.record(args.upstream, args.model, args.out, device=args.device, dtype=args.dtype,
                             image=args.image, prompt=args.prompt, tokenizer=args.tokenizer, seed=args.seed,
                             aspect=args.aspect, inputs_from=args.inputs_from, rerun=args.rerun,
                             parts=[p for p in args.parts.split(",") if p], annotate=args.annotate)
    try:
        import torch  # noqa: F401
    except ImportError:
        raise upstream_env.EnvError(f"torch is not installed in {sys.executable} "
                                    "(pip install -e \".[reference]\")") from None
    return selftest(args.upstream)


if __name__ == "__main__":
    sys.exit(main())
