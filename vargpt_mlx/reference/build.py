"""``vargpt-mlx reference random``: a random-weight upstream checkpoint of any size.

Built with the upstream classes (``VARGPTQwen2VLForConditionalGeneration._from_config``, as upstream's
``prepare_vargpt_v1_1`` does) inside ``upstream_env.sized``; every float parameter is then redrawn
from one seeded generator, biases and norm weights included, so that no affine term can hide
behind a default of 0 or 1:

* linear / conv weights ``N(0, 1/fan_in)``, biases ``N(0, 0.05^2)``;
* norm weights ``1 + N(0, 0.1^2)``, norm biases ``N(0, 0.05^2)``;
* token / sos embeddings ``N(0, 1)``; Infinity's level embedding ``N(0, 0.3^2)``;
* ``cfg_uncond`` and ``pos_start`` ``N(0, 0.5^2)``; ``ada_gss`` ``N(0, 0.15^2)``;
  ``scale_mul_1H11`` ``ln 4 + N(0, 0.1^2)`` (upstream's init is ``ln 4``);
* the always-zero ``zero_k_bias`` buffers and the int64 ``lfq.mask`` buffer stay as built.

Saved with ``save_pretrained`` (float32, or bfloat16 with ``--dtype bfloat16`` as upstream's prepare
stores the released model), plus ``preprocessor_config.json`` (upstream image-processor defaults),
``generation_config.json`` with the special tokens, and the ``tiny_arch.json`` sidecar that records
the Infinity / VAE sizes and pn (upstream's config has no place for them).

This file is run as a top-level module inside the recorder process (no package imports).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import sizes as sizes_mod
import upstream_env

SCALARS = {"cfg_uncond": 0.5, "pos_start": 0.5, "ada_gss": 0.15}


def config_dict(s) -> dict:
    ids = s.token_ids()
    st = {"image_gen_start": "<|image_gen_start|>", "image_gen_start_token_id": ids["image_gen_start_token_id"],
          "image_gen_end": "<|image_gen_end|>", "image_gen_end_token_id": ids["image_gen_end_token_id"],
          "image_gen_pad": "<|image_gen_pad|>", "image_gen_pad_token_id": ids["image_gen_pad_token_id"]}
    return {
        "architectures": ["VARGPTQwen2VLForConditionalGeneration"], "attention_dropout": 0.0,
        "bos_token_id": ids["bos_token_id"], "eos_token_id": ids["eos_token_id"], "pad_token_id": ids["pad_token_id"],
        "vision_start_token_id": ids["vision_start_token_id"], "vision_end_token_id": ids["vision_end_token_id"],
        "vision_token_id": ids["vision_token_id"], "image_token_id": ids["image_token_id"],
        "video_token_id": ids["video_token_id"], "hidden_act": "silu", "hidden_size": s.llm_dim,
        "initializer_range": 0.02, "intermediate_size": s.llm_ffn, "max_position_embeddings": 32768,
        "max_window_layers": s.llm_layers, "model_type": "vargpt_qwen2_vl", "num_attention_heads": s.llm_heads,
        "num_hidden_layers": s.llm_layers, "num_key_value_heads": s.llm_kv_heads, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "use_cache": True,
        "use_sliding_window": False, "vocab_size": s.vocab, "padding_side": "right", "train_from_scratch": False,
        "vision_config": {"depth": s.vis_depth, "embed_dim": s.vis_dim, "mlp_ratio": 4, "num_heads": s.vis_heads,
                          "in_chans": 3, "hidden_size": s.llm_dim, "patch_size": 14, "spatial_merge_size": 2,
                          "spatial_patch_size": 14, "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": list(s.mrope)},
        "special_tokens": st,
    }


def arch_sidecar(s, dtype: str) -> dict:
    real = sizes_mod.PRESETS["real"]
    return {
        "NOTE": "Sidecar written by vargpt-mlx reference random (NOT by upstream): upstream hard-codes the "
                "Infinity/VAE sizes in VARGPTQwen2VLForConditionalGeneration.__init__; these are the sizes this "
                "checkpoint was built with. Readers without it assume upstream's real sizes and pn 0.25M.",
        "weights_dtype": dtype,
        "infinity": {"embed_dim": s.inf_dim, "depth": s.inf_depth, "num_heads": s.inf_heads,
                     "block_chunks": s.inf_chunks, "mlp_ratio": 4, "drop_path_rate": 0.1, "text_channels": s.inf_dim,
                     "shared_aln": True, "cos_attn": True, "norm_eps": 1e-6, "head_aln": True, "head_depth": 1,
                     "swiglu": False, "text_maxlen": 512, "cross_attn_layer_scale": -1.0, "nm0": False,
                     "use_bit_label": 1, "add_lvl_embeding_only_first_block": 1, "rope2d_each_sa_layer": 1,
                     "rope2d_normalized_by_hw": 2, "pad_to_multiplier": 128, "apply_spatial_patchify": 0},
        "vae": {"base_ch": s.vae_ch, "encoder_ch_mult": list(s.vae_mult), "decoder_ch_mult": list(s.vae_mult),
                "num_res_blocks": s.vae_res, "codebook_dim": 32, "patch_size": 16, "z_channels": 32,
                "norm_type": "group", "cnn_type": "2d", "cnn_attention": "no", "use_vae": False,
                "quantizer_type": "MultiScaleBSQ", "new_quant": True, "schedule_mode": "dynamic"},
        "real_values": {"infinity": {"embed_dim": real.inf_dim, "depth": real.inf_depth, "num_heads": real.inf_heads,
                                     "block_chunks": real.inf_chunks},
                        "vae": {"base_ch": real.vae_ch, "encoder_ch_mult": list(real.vae_mult),
                                "decoder_ch_mult": list(real.vae_mult), "num_res_blocks": real.vae_res}},
        "pn": s.pn,
        "sizes": s.as_dict(),
    }


def randomize(model, seed: int) -> dict[str, str]:
    """Redraw every float parameter (see the module docstring). Returns name -> rule used."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    kinds: dict[str, tuple[str, object]] = {}
    for mname, mod in model.named_modules():
        cls = type(mod).__name__
        own = dict(mod.named_parameters(recurse=False))
        for pname, p in own.items():
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                kinds[full] = ("fan_in", None) if pname == "weight" else ("normal", 0.05)
            elif isinstance(mod, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "Norm" in cls:
                kinds[full] = ("one", 0.1) if pname == "weight" else ("normal", 0.05)
            elif isinstance(mod, torch.nn.Embedding):
                kinds[full] = ("normal", 0.3 if mname.endswith("lvl_embed") else 1.0)
            elif pname == "scale_mul_1H11":
                kinds[full] = ("log4", 0.1)
            elif pname in SCALARS:
                kinds[full] = ("normal", SCALARS[pname])
            elif pname == "mat_q" or p.dim() >= 2:
                kinds[full] = ("fan_in", None)
            else:  # q_bias / v_bias and any other 1-D parameter
                kinds[full] = ("normal", 0.05)
    used = {}
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if not p.is_floating_point():
                continue
            kind, arg = kinds.get(name, ("normal", 0.05))
            z = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if kind == "fan_in":
                fan_in = max(1, p[0].numel()) if p.dim() >= 2 else p.numel()
                val = z / math.sqrt(fan_in)
            elif kind == "one":
                val = 1.0 + arg * z
            elif kind == "log4":
                val = math.log(4.0) + arg * z
            else:
                val = arg * z
            p.copy_(val.to(p.dtype))
            used[name] = kind if arg is None else f"{kind}({arg})"
    return used


def build_random(upstream: str, sizes_spec: str, seed: int, out: str, dtype: str = "float32") -> dict:
    import torch

    s = sizes_mod.parse_sizes(sizes_spec)
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output directory {out} exists and is not empty")
    notes = upstream_env.prepare(upstream)
    modeling = upstream_env.modeling()
    cfg_mod = __import__("vargpt_qwen_v1_1.configuration_vargpt_qwen2_vl", fromlist=["VARGPTQwen2VLConfig"])
    ip_mod = __import__("vargpt_qwen_v1_1.image_processing_qwen2_vl", fromlist=["VARGPTQwen2VLImageProcessor"])
    from transformers import GenerationConfig

    config = cfg_mod.VARGPTQwen2VLConfig(**config_dict(s))
    torch.manual_seed(int(seed))
    with upstream_env.sized(s):
        model = modeling.VARGPTQwen2VLForConditionalGeneration._from_config(config)
    upstream_env.set_pn(model, s.pn)
    rules = randomize(model, seed)
    model.eval()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if torch_dtype != torch.float32:
        model = model.to(torch_dtype)  # as upstream's prepare: floats to bf16, the int64 mask stays
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.torch_dtype = torch_dtype
    gen_cfg = GenerationConfig.from_model_config(model.config)
    gen_cfg.special_tokens = dict(config.special_tokens)
    gen_cfg.allowed_special_tokens = ["<|image_gen_start|>", "<|image_gen_end|>", "<|image_gen_pad|>"]
    model.generation_config = gen_cfg
    model.save_pretrained(str(out_dir), safe_serialization=True)
    ip_mod.VARGPTQwen2VLImageProcessor().save_pretrained(str(out_dir))
    (out_dir / sizes_mod.ARCH_SIDECAR).write_text(json.dumps(arch_sidecar(s, dtype), indent=1) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    return {"out": str(out_dir), "sizes": s.as_dict(), "seed": int(seed), "dtype": dtype, "parameters": n_params,
            "randomized": len(rules), "env": notes}
