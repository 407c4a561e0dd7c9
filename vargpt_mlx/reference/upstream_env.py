"""What the original VARGPT-v1.1 code needs to run inside the recorder process.

Runs only in the recorder's own process (``worker.py``), never in the MLX library:

* the upstream directory (the one the user names) goes first on ``sys.path``;
* ``flash_attn``: upstream imports ``flash_attn_varlen_kvpacked_func`` (Infinity) at import time.
  Where the real package cannot be imported (no CUDA), the exact stand-in in ``standins/`` is put
  on ``sys.path``; ``flash_attn.ops`` stays absent so upstream takes its PyTorch fallbacks;
* ``torchvision``: ``timm`` pulls it in, and a CUDA build of it next to a CPU torch has a
  ``_C`` extension that cannot load; upstream needs only its pure-Python parts
  (``transforms.functional.to_tensor``, ``ops.misc``). When ``import torchvision`` fails for that
  reason, its fake-kernel registrations (the only import-time use of ``_C``) are skipped;
* ``TORCHDYNAMO_DISABLE=1``: upstream decorates the fused adaLN with ``torch.compile``; it runs
  eagerly (same math);
* sizes: upstream hard-codes Infinity-2B and the VAE (base 128) in the model's ``__init__``
  (``run_infinity.load_var_model`` / ``load_visual_tokenizer`` / ``vae.vae_model``). ``sized()``
  replaces only their size arguments while the model is built; ``pn`` (hard-coded 0.25M) is set on
  the built model, as the fixtures' harness did.

This file is run as a top-level module inside the recorder process (no package imports).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

STANDINS = Path(__file__).resolve().parent / "standins"
MODELING = "vargpt_qwen_v1_1.modeling_vargpt_qwen2_vl"


class EnvError(RuntimeError):
    """The upstream code or a package it needs is missing (reported as one line, exit 2)."""


def check_upstream_dir(upstream: str | Path) -> Path:
    up = Path(upstream).expanduser().resolve()
    if not up.is_dir():
        raise EnvError(f"upstream directory {upstream} does not exist")
    if not (up / "vargpt_qwen_v1_1" / "modeling_vargpt_qwen2_vl.py").is_file():
        raise EnvError(f"{upstream} does not hold the VARGPT-v1.1 code "
                       "(no vargpt_qwen_v1_1/modeling_vargpt_qwen2_vl.py)")
    return up


def check_packages() -> None:
    missing = [m for m in ("torch", "transformers", "timm", "einops", "cv2", "pandas", "imageio", "yaml")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise EnvError(f"the reference recorder needs {', '.join(missing)} in {sys.executable}: install the "
                       "[reference] extra in its own environment and pass its python with --python or "
                       "$VARGPT_REFERENCE_PYTHON")
    import transformers

    if not transformers.__version__.startswith("4.46."):
        raise EnvError(f"the upstream code needs transformers 4.46.x, {sys.executable} has "
                       f"{transformers.__version__} (pip install -e \".[reference]\" in its own environment)")


def _flash_attn_importable() -> bool:
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        importlib.import_module("flash_attn")
        return True
    except Exception:  # a broken or CPU-less install
        sys.modules.pop("flash_attn", None)
        return False


def _guard_torchvision() -> str:
    """Import torchvision; if its C extension cannot load, import it without the fake-kernel
    registrations that need it. Returns how it was imported."""
    try:
        importlib.import_module("torchvision")
        return "torchvision"
    except (RuntimeError, OSError, ImportError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    try:
        importlib.import_module("torchvision")
    except Exception as e2:  # pragma: no cover - depends on the installed wheel
        raise EnvError(f"torchvision cannot be imported ({first}; without its C extension: {e2})") from None
    return f"torchvision without its C extension ({first})"


def prepare(upstream: str | Path) -> dict:
    """Make the upstream code importable in this process; returns what was done (for refs.json)."""
    up = check_upstream_dir(upstream)
    check_packages()
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if str(up) not in sys.path:
        sys.path.insert(0, str(up))
    notes = {"upstream": str(up)}
    if _flash_attn_importable():
        notes["flash_attn"] = "real"
    else:
        sys.path.insert(0, str(STANDINS))
        importlib.import_module("flash_attn")
        notes["flash_attn"] = "stand-in (exact varlen attention in float32, vargpt_mlx/reference/standins)"
    notes["torchvision"] = _guard_torchvision()
    return notes


def modeling():
    return importlib.import_module(MODELING)


@contextlib.contextmanager
def sized(sizes):
    """Build upstream models with ``sizes`` (a ``Sizes``) instead of the hard-coded Infinity-2B /
    VAE base 128. Only size arguments change; every constructor is upstream's own."""
    ri = importlib.import_module("vargpt_qwen_v1_1.var_model.tools.run_infinity")
    vae_mod = importlib.import_module("vargpt_qwen_v1_1.var_model.infinity.models.bsq_vae.vae")
    orig_train, orig_vae_model, orig_ae = ri.load_infinity_train, vae_mod.vae_model, vae_mod.AutoEncoder
    mult = list(sizes.vae_mult)

    def load_infinity_train(*args, **kwargs):
        kwargs["model_kwargs"] = dict(depth=sizes.inf_depth, embed_dim=sizes.inf_dim, num_heads=sizes.inf_heads,
                                      drop_path_rate=0.1, mlp_ratio=4, block_chunks=sizes.inf_chunks)
        kwargs["text_channels"] = sizes.inf_dim  # Ct5 must equal C (the sos embedding feeds text_norm)
        return orig_train(*args, **kwargs)

    def auto_encoder(args):
        args.base_ch = sizes.vae_ch
        args.num_res_blocks = sizes.vae_res
        return orig_ae(args)

    def vae_model(*args, **kwargs):
        kwargs["encoder_ch_mult"] = mult
        kwargs["decoder_ch_mult"] = mult
        return orig_vae_model(*args, **kwargs)

    ri.load_infinity_train, vae_mod.vae_model, vae_mod.AutoEncoder = load_infinity_train, vae_model, auto_encoder
    try:
        yield
    finally:
        ri.load_infinity_train, vae_mod.vae_model, vae_mod.AutoEncoder = orig_train, orig_vae_model, orig_ae


def set_pn(model, pn: str) -> None:
    """Upstream derives pn from ``training_gen_stage = 2`` ('0.25M'); other pn are set on the model."""
    model.vargpt_gen_args.pn = pn
