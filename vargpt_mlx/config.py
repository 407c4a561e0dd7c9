"""Configuration dataclasses, one per model part, parsed from an upstream checkpoint directory.

Upstream ``config.json`` stores only the Qwen2-VL parts plus ``special_tokens``:

* ``vision_config`` is written as a *diff* against the class defaults, so missing fields fall back
  to the Qwen2-VL-7B defaults below.
* ``rope_scaling.mrope_section`` is the only rope field that matters.
* The Infinity and BSQ-VAE sizes are hard-coded upstream (Infinity-2B, VAE base 128); they
  default to the real values here and can be overridden by an ``infinity`` / ``vae`` block in
  ``config.json`` (written by ``vargpt-mlx convert``) or by a ``tiny_arch.json`` sidecar (the
  parity fixtures ship one).

Every token id comes from the config; nothing in the library hard-codes an id.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any
from .errors import InputError
from .reference.sizes import read_arch_sidecar


class ConfigError(InputError):
    """A checkpoint directory whose configuration is missing or malformed."""


def _pick(cls, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class LLMConfig:
    """Qwen2 decoder (the language model) with M-RoPE."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class VisionConfig:
    """Qwen2-VL vision tower. Defaults are the Qwen2-VL class defaults (upstream omits them)."""

    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 3584  # output width of the merger = LLM hidden size
    mlp_ratio: float = 4.0
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


@dataclass
class InfinityConfig:
    """Infinity visual decoder. Defaults are Infinity-2B as hard-coded upstream."""

    embed_dim: int = 2048
    depth: int = 32
    num_heads: int = 16
    block_chunks: int = 8
    mlp_ratio: float = 4.0
    text_channels: int = 2048
    norm_eps: float = 1e-6
    text_maxlen: int = 512
    codebook_dim: int = 32  # bits per token (BSQ)
    num_lvl: int = 15  # rows of lvl_embed
    cond_drop_rate: float = 0.1
    pad_to_multiplier: int = 128
    drop_path_rate: float = 0.1

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        return int(round(self.embed_dim * self.mlp_ratio / 256) * 256)


@dataclass
class VAEConfig:
    """BSQ VAE (flux-style 2D CNN, no attention) and its multi-scale bit quantizer."""

    base_ch: int = 128
    encoder_ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 32
    codebook_dim: int = 32
    in_channels: int = 3
    patch_size: int = 16


@dataclass
class SpecialTokens:
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    vision_token_id: int
    image_gen_start_token_id: int
    image_gen_end_token_id: int
    image_gen_pad_token_id: int


@dataclass
class VARGPTConfig:
    llm: LLMConfig
    vision: VisionConfig
    infinity: InfinityConfig
    vae: VAEConfig
    tokens: SpecialTokens
    pn: str = "0.25M"  # generation resolution upstream uses (512x512, 10 scales)
    model_type: str = "vargpt_qwen2_vl"
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, cfg: dict[str, Any], arch: dict[str, Any] | None = None) -> "VARGPTConfig":
        """Build from an upstream ``config.json`` dict plus optional architecture overrides.

        ``arch`` may hold ``infinity``, ``vae`` and ``pn`` blocks (the ``tiny_arch.json`` format);
        the same blocks inside ``cfg`` (a converted directory) take precedence.
        """
        arch = dict(arch or {})
        for k in ("infinity", "vae", "pn"):
            if k in cfg:
                arch[k] = cfg[k]
        try:
            rope = cfg.get("rope_scaling") or {}
            llm = LLMConfig(
                **_pick(LLMConfig, cfg),
            )
            if "mrope_section" in rope:
                llm.mrope_section = tuple(int(x) for x in rope["mrope_section"])
            if sum(llm.mrope_section) * 2 != llm.head_dim:
                raise ConfigError(
                    f"mrope_section {list(llm.mrope_section)} does not cover head_dim {llm.head_dim}"
                )
            vcfg = dict(cfg.get("vision_config") or {})
            if "in_chans" in vcfg and "in_channels" not in vcfg:
                vcfg["in_channels"] = vcfg["in_chans"]
            vision = VisionConfig(**_pick(VisionConfig, vcfg))
            inf_d = dict(arch.get("infinity") or {})
            infinity = InfinityConfig(**_pick(InfinityConfig, inf_d))
            vae_d = dict(arch.get("vae") or {})
            for k in ("encoder_ch_mult", "decoder_ch_mult"):
                if k in vae_d:
                    vae_d[k] = tuple(vae_d[k])
            vae = VAEConfig(**_pick(VAEConfig, vae_d))
            st = cfg.get("special_tokens") or {}
            tokens = SpecialTokens(
                bos_token_id=int(cfg["bos_token_id"]),
                eos_token_id=int(cfg["eos_token_id"]),
                pad_token_id=int(cfg.get("pad_token_id", cfg["bos_token_id"])),
                image_token_id=int(cfg["image_token_id"]),
                video_token_id=int(cfg["video_token_id"]),
                vision_start_token_id=int(cfg["vision_start_token_id"]),
                vision_end_token_id=int(cfg["vision_end_token_id"]),
                vision_token_id=int(cfg["vision_token_id"]),
                image_gen_start_token_id=int(st["image_gen_start_token_id"]),
                image_gen_end_token_id=int(st["image_gen_end_token_id"]),
                image_gen_pad_token_id=int(st["image_gen_pad_token_id"]),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None
        except TypeError as e:
            raise ConfigError(f"config.json has a malformed field: {e}") from None
        if infinity.embed_dim % 128 != 0:
            raise ConfigError("infinity.embed_dim must be a multiple of 128 (attentive-pool heads)")
        if infinity.depth % infinity.block_chunks != 0 or infinity.block_chunks < 2:
            raise ConfigError("infinity.depth must split into block_chunks >= 2 equal chunks")
        pn = str(arch.get("pn", "0.25M"))
        return cls(llm=llm, vision=vision, infinity=infinity, vae=vae, tokens=tokens, pn=pn,
                   model_type=cfg.get("model_type", "vargpt_qwen2_vl"))

    @classmethod
    def from_dir(cls, path: str | Path) -> "VARGPTConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"{path} is not a VARGPT checkpoint: no config.json")
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_file} is not valid JSON: {e}") from None
        if "special_tokens" not in cfg or "image_gen_start_token_id" not in (cfg.get("special_tokens") or {}):
            raise ConfigError(
                f"{path} is not a VARGPT-v1.1 checkpoint: config.json has no special_tokens "
                "with image_gen_start_token_id"
            )
        return cls.from_dict(cfg, read_arch_sidecar(path))

    def arch_dict(self) -> dict[str, Any]:
        """The architecture sizes upstream's config lacks (written into converted configs)."""
        inf = asdict(self.infinity)
        vae = asdict(self.vae)
        vae["encoder_ch_mult"] = list(vae["encoder_ch_mult"])
        vae["decoder_ch_mult"] = list(vae["decoder_ch_mult"])
        return {"infinity": inf, "vae": vae, "pn": self.pn}
