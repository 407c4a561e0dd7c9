"""Model sizes for ``vargpt-mlx reference random --sizes SPEC`` (pure Python, no torch).

``SPEC`` is a preset name, optionally followed by ``key=value`` overrides, comma-separated::

    tiny                                   the public fixture's sizes (256x256, 7 scales)
    025m                                   the hidden-bundle shape: 512x512 (pn 0.25M, 10 scales),
                                           real VAE channel multipliers [1,2,4,4,4], 32-group norms
    real                                   the released model (7B LLM + Infinity-2B + VAE base 128)
    tiny,llm_dim=96,llm_heads=3,mrope=4:6:6,llm_kv_heads=1

Keys: ``llm_dim llm_ffn llm_layers llm_heads llm_kv_heads mrope`` (Qwen2 decoder, M-RoPE sections
``t:h:w``), ``vis_dim vis_depth vis_heads`` (vision tower), ``inf_dim inf_depth inf_heads
inf_chunks`` (Infinity), ``vae_ch vae_mult vae_res`` (VAE base channels, multipliers ``1:2:4:4:4``,
res blocks per level), ``pn`` (0.06M / 0.25M / 0.60M / 1M), ``vocab``.

Token ids: with ``vocab >= 152064`` the real Qwen2-VL ids (151643 ...), otherwise the fixtures'
scheme ``real - 151643 + 1000`` (so ``vocab`` must exceed 1016).

This file is also run as a top-level module inside the recorder process (no package imports).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

PNS = ("0.06M", "0.25M", "0.60M", "1M")
REAL_BOS = 151643
# offsets of the special tokens from <|endoftext|> in the Qwen2-VL vocabulary plus VARGPT's three
TOKEN_OFFSETS = {
    "bos_token_id": 0, "pad_token_id": 0, "im_start": 1, "eos_token_id": 2, "vision_start_token_id": 9,
    "vision_end_token_id": 10, "vision_token_id": 11, "image_token_id": 12, "video_token_id": 13,
    "image_gen_start_token_id": 14, "image_gen_end_token_id": 15, "image_gen_pad_token_id": 16,
}


class SizeError(ValueError):
    """A size spec that is malformed or that the upstream classes cannot build."""


@dataclass(frozen=True)
class Sizes:
    llm_dim: int = 64
    llm_ffn: int = 128
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    mrope: tuple[int, int, int] = (2, 3, 3)
    vis_dim: int = 32
    vis_depth: int = 2
    vis_heads: int = 2
    inf_dim: int = 128
    inf_depth: int = 2
    inf_heads: int = 2
    inf_chunks: int = 2
    vae_ch: int = 24
    vae_mult: tuple[int, ...] = (1, 2, 2, 2, 2)
    vae_res: int = 2
    pn: str = "0.06M"
    vocab: int = 1024

    # ------------------------------------------------------------------ derived
    @property
    def bos(self) -> int:
        return REAL_BOS if self.vocab >= 152064 else 1000

    def token_ids(self) -> dict[str, int]:
        return {k: self.bos + off for k, off in TOKEN_OFFSETS.items()}

    def validate(self) -> "Sizes":
        def need(cond: bool, msg: str):
            if not cond:
                raise SizeError(msg)

        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int):
                need(v > 0, f"{f.name} must be positive, got {v}")
        need(self.llm_dim % self.llm_heads == 0, "llm_dim must split into llm_heads heads")
        hd = self.llm_dim // self.llm_heads
        need(hd % 2 == 0, f"LLM head dim {hd} must be even")
        need(len(self.mrope) == 3 and 2 * sum(self.mrope) == hd,
             f"mrope sections {list(self.mrope)} must sum to half the LLM head dim ({hd // 2})")
        need(self.llm_heads % self.llm_kv_heads == 0, "llm_heads must be a multiple of llm_kv_heads")
        need(self.vis_dim % self.vis_heads == 0 and (self.vis_dim // self.vis_heads) % 4 == 0,
             "vis_dim / vis_heads must be a multiple of 4 (2-D rotary halves)")
        need(self.inf_dim % 128 == 0, "inf_dim must be a multiple of 128 (upstream's attentive pool has "
             "inf_dim/128 heads)")
        need(self.inf_dim % self.inf_heads == 0 and (self.inf_dim // self.inf_heads) % 4 == 0,
             "inf_dim / inf_heads must be a multiple of 4 (2-D rope pairs)")
        need(self.inf_chunks >= 2 and self.inf_depth % self.inf_chunks == 0,
             "inf_depth must split into inf_chunks >= 2 equal chunks (upstream iterates block_chunks)")
        need(len(self.vae_mult) == 5, "vae_mult needs 5 levels (stride 16)")
        for m in (1, *self.vae_mult):
            c = self.vae_ch * m
            need(c % 32 == 0 or c % 24 == 0, f"VAE width {c} is neither a multiple of 32 nor of 24 "
                 "(upstream's GroupNorm takes 32 or 24 groups)")
        need(self.pn in PNS, f"pn must be one of {', '.join(PNS)}")
        need(self.vocab > 1016 and (self.vocab < REAL_BOS or self.vocab >= 152064),
             "vocab must exceed 1016 (fixture token scheme) or be >= 152064 (real ids)")
        return self

    def as_dict(self) -> dict:
        d = asdict(self)
        d["mrope"] = list(self.mrope)
        d["vae_mult"] = list(self.vae_mult)
        return d


PRESETS: dict[str, Sizes] = {
    "tiny": Sizes(),
    "025m": Sizes(llm_dim=128, llm_ffn=256, llm_layers=3, llm_heads=4, llm_kv_heads=1, mrope=(4, 6, 6),
                  vis_dim=48, vis_depth=3, vis_heads=3, inf_dim=256, inf_depth=4, inf_heads=4, inf_chunks=2,
                  vae_ch=32, vae_mult=(1, 2, 4, 4, 4), pn="0.25M"),
    "real": Sizes(llm_dim=3584, llm_ffn=18944, llm_layers=28, llm_heads=28, llm_kv_heads=4, mrope=(16, 24, 24),
                  vis_dim=1280, vis_depth=32, vis_heads=16, inf_dim=2048, inf_depth=32, inf_heads=16,
                  inf_chunks=8, vae_ch=128, vae_mult=(1, 2, 4, 4, 4), pn="0.25M", vocab=152064),
}


def parse_sizes(spec: str) -> Sizes:
    """``preset[,key=value...]`` (see the module docstring)."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise SizeError("empty --sizes spec")
    base = PRESETS["tiny"]
    if "=" not in parts[0]:
        name = parts.pop(0)
        if name not in PRESETS:
            raise SizeError(f"unknown size preset {name!r} (one of {', '.join(PRESETS)})")
        base = PRESETS[name]
    kinds = {f.name: f.type for f in fields(Sizes)}
    over = {}
    for p in parts:
        key, sep, val = p.partition("=")
        key = key.strip()
        if not sep or key not in kinds:
            raise SizeError(f"bad size item {p!r} (keys: {', '.join(kinds)})")
        val = val.strip()
        try:
            if key in ("mrope", "vae_mult"):
                over[key] = tuple(int(x) for x in val.replace("-", ":").split(":"))
            elif key == "pn":
                over[key] = val
            else:
                over[key] = int(val)
        except ValueError:
            raise SizeError(f"bad value in size item {p!r}") from None
    return replace(base, **over).validate()


# Upstream hard-codes the Infinity / VAE sizes (and pn), so its config.json lacks them: an
# upstream-format checkpoint of other sizes carries them in this sidecar (README: Models).
ARCH_SIDECAR = "tiny_arch.json"


def read_arch_sidecar(ckpt_dir: str | Path) -> dict | None:
    """The ``tiny_arch.json`` sidecar of a checkpoint directory (``infinity``, ``vae`` and ``pn``
    blocks), or ``None`` when it has none (upstream's real sizes)."""
    f = Path(ckpt_dir) / ARCH_SIDECAR
    return json.loads(f.read_text()) if f.is_file() else None


def sizes_from_arch(cfg: dict, arch: dict | None) -> Sizes:
    """The sizes of a saved checkpoint: upstream ``config.json`` plus the ``tiny_arch.json`` sidecar
    (absent: upstream's hard-coded real Infinity / VAE sizes and pn 0.25M)."""
    real = PRESETS["real"]
    arch = arch or {}
    inf = arch.get("infinity") or {}
    vae = arch.get("vae") or {}
    vis = cfg.get("vision_config") or {}
    rope = cfg.get("rope_scaling") or {}
    return Sizes(
        llm_dim=cfg["hidden_size"], llm_ffn=cfg["intermediate_size"], llm_layers=cfg["num_hidden_layers"],
        llm_heads=cfg["num_attention_heads"], llm_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        mrope=tuple(rope.get("mrope_section", real.mrope)),
        vis_dim=vis.get("embed_dim", real.vis_dim), vis_depth=vis.get("depth", real.vis_depth),
        vis_heads=vis.get("num_heads", real.vis_heads),
        inf_dim=inf.get("embed_dim", real.inf_dim), inf_depth=inf.get("depth", real.inf_depth),
        inf_heads=inf.get("num_heads", real.inf_heads), inf_chunks=inf.get("block_chunks", real.inf_chunks),
        vae_ch=vae.get("base_ch", real.vae_ch), vae_mult=tuple(vae.get("decoder_ch_mult", real.vae_mult)),
        vae_res=vae.get("num_res_blocks", real.vae_res), pn=str(arch.get("pn", real.pn)), vocab=cfg["vocab_size"],
    )
