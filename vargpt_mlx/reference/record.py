"""``vargpt-mlx reference record``: reference outputs of the original VARGPT-v1.1 code.

Loads a checkpoint with the upstream classes and runs, through upstream's own code paths:
image preprocessing, the vision tower, 3-D rope positions, LLM logits (M-RoPE and plain
positions), greedy decoding (upstream's patched ``_sample``), next-scale image generation
(every per-scale tensor recorded by hooks on upstream's modules, so that the port can be
teacher-forced), the VAE (encode, multi-scale BSQ / bitwise self-correction, decode) and the two
training losses. Writes ``refs.safetensors`` + ``refs.json`` in the public fixture's format
(``vargpt-mlx verify`` reads them).

Deterministic settings (upstream hard-codes random ones), all recorded in ``refs.json``:
* image generation: bits by argmax (``top_k=1, top_p=0, g_seed=0`` passed to upstream's
  ``autoregressive_infer_cfg`` instead of 900 / 0.97 / wall clock); ``<|image_gen_start|>``
  forced as the first new token by a logits processor (a random model never picks it);
  ``--aspect`` replaces the hard-coded square schedule by upstream's table entry for that ratio;
* text decoding: ``<|image_gen_start|>`` is suppressed, so that text stays text;
* training forward: ``model.eval()`` + ``forward(dpo_training=True)`` (the 1.1 training branch
  without DropPath), bitwise self-correction strength 0, condition dropout 0.

Rounding distance (``info.rounding``): the same recording is repeated on a copy of the model in
a higher precision (float64 for a float32 reference, float32 for a bfloat16 one), with the same
inputs and the reference's own tokens and bits forced, and ``max |ref - rerun|`` is stored per
tensor: the reference's own rounding error, from which ``verify`` derives its bounds. In the
float64 rerun upstream's bf16 rounding of the Infinity cross-attention (taken in float32 mode
only) is kept: its inputs and output are rounded to bf16 as in float32 mode.

This file is run as a top-level module inside the recorder process (no package imports).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

import inputs as inputs_mod
import sizes as sizes_mod
import upstream_env

GEN_SETTINGS = {"cfg": 3, "tau": 0.5, "cfg_insertion_layer": [0]}
N_GREEDY = 16


def log(msg: str) -> None:
    print(f"[reference] {msg}", file=sys.stderr, flush=True)


def _np(t, kind: str | None = None) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if kind == "bits":
        return t.to(torch.uint8).numpy()
    if t.is_floating_point():
        return t.float().numpy()
    return t.to(torch.int64).numpy()


@contextlib.contextmanager
def locals_on_return(*functions):
    """Capture the local variables of ``functions`` when they return (``sys.setprofile``)."""
    codes = {f.__code__: f.__name__ for f in functions}
    got: dict[str, dict] = {}
    previous = sys.getprofile()

    def prof(frame, event, arg):
        if event == "return" and frame.f_code in codes:
            got[codes[frame.f_code]] = dict(frame.f_locals)

    sys.setprofile(prof)
    try:
        yield got
    finally:
        sys.setprofile(previous)


class Recording:
    """One recording pass of the upstream model (the reference, or its higher-precision rerun)."""

    def __init__(self, model, modeling, device, tokens: dict, sizes, aspect: float, forced: dict | None = None,
                 image_path: str | None = None):
        self.model, self.modeling, self.device, self.ids, self.sizes = model, modeling, device, tokens, sizes
        self.aspect = aspect
        self.image_path = image_path  # where upstream's cv2.imwrite puts the image (None: a temporary file)
        self.forced = forced  # the reference's tokens / bits (rerun only)
        self.out: dict[str, np.ndarray] = {}
        self.meta: dict[str, dict] = {}
        self.info: dict = {}
        self.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype

    def put(self, name: str, value, kind: str | None = None, **meta) -> None:
        self.out[name] = value if isinstance(value, np.ndarray) else _np(value, kind)
        if meta:
            self.meta[name] = meta

    # ------------------------------------------------------------------ understanding
    def preprocess(self, u8: np.ndarray):
        import torch
        from PIL import Image

        proc = self.modeling_ip().VARGPTQwen2VLImageProcessor()  # class defaults, as the fixtures
        out = proc(images=[Image.fromarray(u8)], return_tensors="pt")
        return out["pixel_values"].to(torch.float32), out["image_grid_thw"]

    def modeling_ip(self):
        return __import__("vargpt_qwen_v1_1.image_processing_qwen2_vl", fromlist=["x"])

    def understanding(self, inp: dict) -> None:
        import torch

        m, dev = self.model, self.device
        for fam in ("und", "pre"):
            pv, grid = self.preprocess(inp[f"{fam}.image_u8"])
            self.put(f"{fam}.pixel_values", pv)
            self.put(f"{fam}.image_grid_thw", grid)
        pv = torch.from_numpy(self.out["und.pixel_values"]).to(dev, self.dtype)
        grid = torch.from_numpy(self.out["und.image_grid_thw"]).to(dev)
        ids = torch.from_numpy(inp["und.input_ids"]).to(dev)
        mask = torch.ones_like(ids)
        self.put("und.attention_mask", mask)
        with torch.no_grad():
            self.put("und.vision_embeds", m.visual(pv, grid_thw=grid))
            pos, deltas = m.get_rope_index(ids, grid, None, mask)
            self.put("und.position_ids", pos)
            self.put("und.rope_deltas", deltas)
            self.put("und.logits_mrope", m(input_ids=ids, pixel_values=pv, image_grid_thw=grid,
                                           position_ids=pos, return_dict=True).logits)
            self.put("und.logits_plainpos", m(input_ids=ids, pixel_values=pv, image_grid_thw=grid,
                                              return_dict=True).logits)
            tids = torch.from_numpy(inp["txt.input_ids"]).to(dev)
            pos_t, deltas_t = m.get_rope_index(tids, None, None, torch.ones_like(tids))
            self.put("txt.position_ids", pos_t)
            self.put("txt.rope_deltas", deltas_t)
            self.put("txt.logits", m(input_ids=tids, return_dict=True).logits)
        eos, bos = self.ids["eos_token_id"], self.ids["bos_token_id"]
        self.greedy("und.gen_sequences", "und.gen_step_logits", ids, (eos,), 1.0, pixel_values=pv, image_grid_thw=grid)
        self.greedy("txt.gen_sequences", "txt.gen_step_logits", tids, (eos,), 1.0)
        self.greedy("und.gen_sequences_reppen", "und.gen_step_logits_reppen", ids, (eos, bos), 1.05,
                    pixel_values=pv, image_grid_thw=grid)

    def greedy(self, seq_name, logits_name, ids, eos, rep, **extra) -> None:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        start_id = self.ids["image_gen_start_token_id"]
        if self.forced is not None and seq_name not in self.forced:
            return  # a rerun for a reference without this sequence: nothing to compare
        forced = None if self.forced is None else self.forced[seq_name][0, ids.shape[1]:].tolist()

        class Text(LogitsProcessor):
            def __call__(self, input_ids, scores):
                scores = scores.clone()
                scores[:, start_id] = -float("inf")  # text decoding stays text
                if forced is not None:  # the reference's tokens (rerun)
                    step = input_ids.shape[1] - ids.shape[1]
                    keep = scores[:, forced[step]].clone() if step < len(forced) else None
                    scores[:] = -float("inf")
                    if keep is not None:
                        scores[:, forced[step]] = 0.0
                return scores

        n_new = N_GREEDY if forced is None else len(forced)
        with torch.no_grad():
            g = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                    min_new_tokens=0, do_sample=False, eos_token_id=list(eos), pad_token_id=self.ids["pad_token_id"],
                                    repetition_penalty=rep, logits_processor=LogitsProcessorList([Text()]),
                                    output_logits=True, return_dict_in_generate=True, **extra)
        raw = torch.stack([lg[0] for lg in g.logits]).float()
        top2 = torch.topk(raw, 2, dim=-1).values
        self.put(seq_name, g.sequences, min_top2_margin=float((top2[:, 0] - top2[:, 1]).min()))
        if logits_name:
            self.put(logits_name, raw)

    # ------------------------------------------------------------------ image generation
    def generation(self, inp: dict) -> None:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        m, dev, modeling = self.model, self.device, self.modeling
        dr = __import__("vargpt_qwen_v1_1.var_model.infinity.utils.dynamic_resolution", fromlist=["x"])
        ev: dict[str, list] = {k: [] for k in ("llm", "pos", "proj", "proj_out", "raw", "cfg", "bits",
                                              "next_in", "decode", "cond_BD", "gss")}
        state = {"on": False, "schedule": None, "img": None, "kwargs": None}
        forced_bits = None if self.forced is None else [self.forced[f"gen.s{k}.bits"] for k in range(64)
                                                        if f"gen.s{k}.bits" in self.forced]

        def when_on(fn):
            def hook(*a, **k):
                if state["on"]:
                    return fn(*a, **k)
            return hook

        handles = [
            m.model.register_forward_hook(when_on(lambda mod, args, kwargs, out: ev["llm"].append(
                (kwargs.get("past_key_values") is not None, kwargs["inputs_embeds"].detach().clone(),
                 out[0].detach().clone()))), with_kwargs=True),
            m.model.rotary_emb.register_forward_hook(when_on(lambda mod, args, out: ev["pos"].append(args[1].clone()))),
            m.image_gen_projector.register_forward_hook(when_on(lambda mod, args, out: ev["proj"].append(
                (args[0].detach().clone(), out.detach().clone())))),
            m.image_gen_projector_out.register_forward_hook(when_on(lambda mod, args, out: ev["proj_out"].append(
                (args[0].detach().clone(), out.detach().clone())))),
            m.vargpt_gen.word_embed.register_forward_pre_hook(when_on(lambda mod, args: ev["next_in"].append(
                args[0].detach().clone()))),
            m.vargpt_gen.text_proj_for_sos.register_forward_hook(when_on(lambda mod, args, out: ev["cond_BD"].append(
                out.detach().clone()))),
            m.vargpt_gen.shared_ada_lin.register_forward_hook(when_on(lambda mod, args, out: ev["gss"].append(
                out.detach().clone()))),
        ]
        orig_logits, orig_decode = m.vargpt_gen.get_logits, m.vae_local.decode
        orig_infer = m.autoregressive_infer_cfg
        orig_sampler = modeling.sample_with_top_k_top_p_also_inplace_modifying_logits_

        def get_logits(h, cond_BD):
            out = orig_logits(h, cond_BD)
            if state["on"]:
                ev["raw"].append(out.detach().clone())
            return out

        def decode(z):
            out = orig_decode(z)
            if state["on"]:
                ev["decode"].append((z.detach().clone(), out.detach().clone()))
            return out

        def sampler(logits_BlV, rng=None, top_k=0, top_p=0.0, num_samples=1):
            k = len(ev["cfg"])
            ev["cfg"].append(logits_BlV.detach().clone())
            idx = orig_sampler(logits_BlV, rng=rng, top_k=top_k, top_p=top_p, num_samples=num_samples)
            if forced_bits is not None:  # the reference's bits (rerun)
                idx = torch.from_numpy(forced_bits[k].reshape(1, -1, 1).astype(np.int64)).to(idx.device)
            ev["bits"].append(idx.detach().clone())
            return idx

        def infer(*args, **kwargs):
            kwargs.update(top_k=1, top_p=0.0, g_seed=0)
            if self.aspect != 1.0:
                tmpl = dr.h_div_w_templates[np.argmin(np.abs(dr.h_div_w_templates - self.aspect))]
                sched = dr.dynamic_resolution_h_w[tmpl][m.vargpt_gen_args.pn]["scales"]
                kwargs["scale_schedule"] = [(1, h, w) for (_, h, w) in sched]
                n = len(kwargs["scale_schedule"])
                kwargs["cfg_list"], kwargs["tau_list"] = [kwargs["cfg_list"][0]] * n, [kwargs["tau_list"][0]] * n
            state["schedule"] = [tuple(int(v) for v in t) for t in kwargs["scale_schedule"]]
            state["kwargs"] = {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool, list, tuple,
                                                                                  type(None)))}
            state["on"] = True
            try:
                ret = orig_infer(*args, **kwargs)
            finally:
                state["on"] = False
            state["img"] = ret[2]
            return ret

        m.vargpt_gen.get_logits, m.vae_local.decode, m.autoregressive_infer_cfg = get_logits, decode, infer
        modeling.sample_with_top_k_top_p_also_inplace_modifying_logits_ = sampler
        import tempfile

        tmp_png = None
        if self.image_path is None:  # upstream writes the image to model._IMAGE_GEN_PATH (default ./output.png)
            fd, tmp_png = tempfile.mkstemp(suffix=".png")
            os.close(fd)
        m._IMAGE_GEN_PATH = self.image_path or tmp_png
        prompt = torch.from_numpy(inp["gen.prompt_ids"]).to(dev)
        start_id = self.ids["image_gen_start_token_id"]

        next_logits = []

        class ForceStart(LogitsProcessor):
            def __call__(self, input_ids, scores):
                if input_ids.shape[1] == prompt.shape[1]:
                    scores = torch.full_like(scores, -float("inf"))
                    scores[:, start_id] = 0.0
                elif input_ids.shape[1] == prompt.shape[1] + 1:  # the logits t2 is chosen from
                    next_logits.append(scores.detach().clone())
                return scores

        try:
            with torch.no_grad():
                seq = m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                 do_sample=False, logits_processor=LogitsProcessorList([ForceStart()]),
                                 pad_token_id=self.ids["pad_token_id"], eos_token_id=self.ids["eos_token_id"])
        finally:
            for h in handles:
                h.remove()
            del m.vargpt_gen.get_logits, m.vae_local.decode, m.autoregressive_infer_cfg
            modeling.sample_with_top_k_top_p_also_inplace_modifying_logits_ = orig_sampler
            if tmp_png is not None:
                Path(tmp_png).unlink(missing_ok=True)
        sched = state["schedule"]
        if sched is None:
            raise RuntimeError("upstream did not start image generation after <|image_gen_start|>")
        self.put("gen.sequences", seq)
        if next_logits:
            self.put("gen.next_token_logits", next_logits[0])
        llm, pos = ev["llm"], ev["pos"]
        if len(llm) != 2 * len(sched) or len(ev["raw"]) != len(sched):
            raise RuntimeError(f"unexpected upstream call pattern: {len(llm)} LLM calls, {len(ev['raw'])} "
                               f"Infinity heads for {len(sched)} scales")
        ca_src, ca_kv = ev["proj_out"][0]
        self.put("gen.ca_src_hidden", ca_src)
        self.put("gen.ca_kv_cond", ca_kv)
        self.put("gen.cond_BD", ev["cond_BD"][0])
        self.put("gen.cond_BD_or_gss", ev["gss"][0])
        self.put("gen.sos_stage", ev["proj"][0][0])
        margins = []
        for k, (_, h, w) in enumerate(sched):
            p = f"gen.s{k}."
            (is_c, x_c, out_c), (is_u, x_u, out_u) = llm[2 * k], llm[2 * k + 1]
            assert is_c and not is_u, "cond call (with cache) expected before the uncond call"
            self.put(p + "llm_in_cond", x_c, past_len=int(pos[2 * k][0, 0, 0]), scale_thw=[1, h, w])
            self.put(p + "llm_in_uncond", x_u)
            self.put(p + "llm_pos_cond", pos[2 * k])
            self.put(p + "llm_pos_uncond", pos[2 * k + 1])
            self.put(p + "llm_out_cond", out_c)
            self.put(p + "llm_out_uncond", out_u)
            self.put(p + "inf_in", ev["proj_out"][k + 1][1].view(2, h * w, -1))
            self.put(p + "bit_logits_raw", ev["raw"][k])
            cfg = ev["cfg"][k].reshape(1, h * w, -1)
            self.put(p + "bit_logits_cfg", cfg)
            self.put(p + "bits", ev["bits"][k].reshape(1, h, w, -1), "bits")
            c = cfg.float().reshape(-1, 2)
            margins.append(float((c[:, 1] - c[:, 0]).abs().min()))
            if k > 0:
                self.put(p + "next_in_codes", ev["next_in"][k - 1])
                self.put(p + "proj_in_out", ev["proj"][k][1])
        self.meta.setdefault("gen.s0.bits", {})["min_abs_bit_logit_margin_per_scale"] = margins
        z, decoded = ev["decode"][0]
        self.put("gen.summed_codes", z)
        self.put("gen.decoded", decoded)
        img = state["img"]  # upstream's uint8 BGR image (what it writes with cv2.imwrite)
        self.put("gen.image_rgb_u8", img[0].flip(-1).cpu().numpy().astype(np.uint8))
        self.info["generation"] = {
            "prompt_len": int(prompt.shape[1]), "scale_schedule": [list(t) for t in sched],
            "infer_kwargs_used": state["kwargs"], **GEN_SETTINGS, "aspect_h_div_w": self.aspect,
            "bit_choice": "argmax of (logit_bit0, logit_bit1) after CFG and /tau: upstream's sampler called with "
                          "top_k=1, top_p=0 (instead of its hard-coded 900 / 0.97 and wall-clock seed)",
            "forced_first_token": "<|image_gen_start|> (logits processor at the first new token)",
        }

    # ------------------------------------------------------------------ VAE
    def vae_input(self, u8: np.ndarray):
        import torch

        t = torch.from_numpy(np.ascontiguousarray(u8)).permute(2, 0, 1).float().div(255)  # to_tensor
        return ((t + t) + (-1))[None].to(self.device, self.dtype)

    def vae_schedule(self, hw) -> list[tuple[int, int, int]]:
        dr = __import__("vargpt_qwen_v1_1.var_model.infinity.utils.dynamic_resolution", fromlist=["x"])
        h_div_w = hw[0] / hw[1]
        tmpl = dr.h_div_w_templates[np.argmin(np.abs(h_div_w - dr.h_div_w_templates))]
        return [(1, h, w) for (_, h, w) in dr.dynamic_resolution_h_w[tmpl][self.model.vargpt_gen_args.pn]["scales"]]

    @contextlib.contextmanager
    def bsc_quantizer(self, vae, sched):
        """Hook upstream's BSQ quantizer during ``flip_requant``: record each scale's residual (the
        quantity whose sign is the bit) and, in a rerun, return the reference's bits instead of
        its own (so that a near-tie decided differently cannot change the later scales)."""
        import torch

        forced = None
        if self.forced is not None and "vae.bsc_gt_BL" in self.forced:
            flat, forced, off = self.forced["vae.bsc_gt_BL"], [], 0
            for _, h, w in sched:
                forced.append(flat[:, off:off + h * w])
                off += h * w
        residuals, calls = [], [0]

        def hook(mod, args, out):
            i = calls[0]
            calls[0] += 1
            r = args[0].detach()
            residuals.append(r.reshape(r.shape[0], r.shape[1], -1).transpose(1, 2).clone())  # (B, h*w, d)
            if forced is not None:
                q, x2, bits, loss = out
                fb = torch.from_numpy(forced[i].astype(np.int64)).to(bits.device, bits.dtype).reshape(bits.shape)
                return (q, x2, fb, loss)
            return None

        handle = vae.quantizer.lfq.register_forward_hook(hook)
        try:
            yield residuals
        finally:
            handle.remove()

    def vae(self, inp: dict) -> None:
        import torch

        m, dev = self.model, self.device
        bsc_mod = __import__("vargpt_qwen_v1_1.var_model.infinity.models.bitwise_self_correction", fromlist=["x"])
        vae = m.vae_local
        with torch.no_grad():
            self.put("vae.decode_out", vae.decode(torch.from_numpy(inp["vae.decode_in"]).to(dev, self.dtype)))
            x = self.vae_input(inp["vae.enc_image_u8"])
            sched = self.vae_schedule(inp["vae.enc_image_u8"].shape[:2])
            raw, _, _ = vae.encode_for_raw_features(x, scale_schedule=sched)
            self.put("vae.raw_features", raw)
            bsc = bsc_mod.BitwiseSelfCorrection(vae)
            bsc.noise_apply_strength = 0
            with self.bsc_quantizer(vae, sched) as residuals:
                x_wo, gt = bsc.flip_requant(sched, x, raw, dev)
            self.put("vae.bsc_residual", torch.cat(residuals, 1))
            self.put("vae.bsc_x_BLC_wo_prefix", x_wo)
            self.put("vae.bsc_gt_BL", torch.cat(gt, 1), "bits")
            per = [g.reshape(1, 1, h, w, -1) for g, (_, h, w) in zip(gt, sched)]
            # upstream's decode_from_indices feeds its float32 codes to the decoder uncast, which a
            # bf16 model rejects; its generation loop casts them to the model dtype first: so do we
            cast = vae.decoder.register_forward_pre_hook(lambda mod, args: (args[0].to(self.dtype),))
            try:
                summed, recon = vae.decode_from_indices(per, sched, "bit_label")
            finally:
                cast.remove()
            self.put("vae.bsc_summed_codes", summed)
            self.put("vae.bsc_recon", recon)
            if self.forced is None:  # a rerun cannot force this path's bits (NOT_RERUN)
                _, z, _, bit_idx, _, _ = vae.encode(x, sched)
                self.put("vae.msbsq_z", z.squeeze(2) if z.dim() == 5 else z)
                self.put("vae.msbsq_bits", torch.cat([b.reshape(1, -1, b.shape[-1]) for b in bit_idx], 1), "bits")
        self.info["vae"] = {"scale_schedule": [list(t) for t in sched]}

    # ------------------------------------------------------------------ training losses
    def sft(self, inp: dict) -> None:
        import torch

        m, dev = self.model, self.device
        bsc_mod = __import__("vargpt_qwen_v1_1.var_model.infinity.models.bitwise_self_correction", fromlist=["x"])
        m.vargpt_gen.cond_drop_rate = 0.0
        m.bitwise_self_correction = bsc_mod.BitwiseSelfCorrection(m.vae_local)
        m.bitwise_self_correction.noise_apply_strength = 0
        ids = torch.from_numpy(inp["sft_t2i.input_ids"]).to(dev)
        labels = torch.from_numpy(inp["sft_t2i.labels"]).to(dev)
        x = self.vae_input(inp["vae.enc_image_u8"])
        ces = []
        ce_hook = torch.nn.CrossEntropyLoss.forward

        def ce_forward(self_, input, target):
            out = ce_hook(self_, input, target)
            ces.append(out.detach().clone())
            return out

        # projector outputs are cloned when made: upstream later adds the level embedding in place
        proj_out, proj_in = [], []
        handles = [m.image_gen_projector_out.register_forward_hook(
                       lambda mod, args, out: proj_out.append(out.detach().clone())),
                   m.image_gen_projector.register_forward_hook(
                       lambda mod, args, out: proj_in.append((args[0].detach().clone(), out.detach().clone())))]
        torch.nn.CrossEntropyLoss.forward = ce_forward
        try:
            sched_in = self.vae_schedule(inp["vae.enc_image_u8"].shape[:2])
            with torch.no_grad(), self.bsc_quantizer(m.vae_local, sched_in), \
                    locals_on_return(type(m).forward, type(m).get_gen_loss_1_1, type(m).get_vae_gt_xin_v1_1) as loc:
                out = m(pixel_gen_values=x, input_ids=ids, labels=labels, dpo_training=True, return_dict=True)
        finally:
            torch.nn.CrossEntropyLoss.forward = ce_hook
            for h in handles:
                h.remove()
        fwd, loss_l, gt_l = loc["forward"], loc["get_gen_loss_1_1"], loc["get_vae_gt_xin_v1_1"]
        self.put("sft_t2i.loss_total", out.loss)
        self.put("sft_t2i.loss_text_ce", loss_l["other_loss"])
        self.put("sft_t2i.loss_bits_mean", ces[1])
        self.put("sft_t2i.loss_bits_weighted", loss_l["image_gen_loss"])
        self.put("sft_t2i.lw", loss_l["lw"])
        self.put("sft_t2i.image_gen_logits", out.gen_logits)
        self.put("sft_t2i.gt_BL", out.image_gen_labels, "bits")
        pad = self.ids["image_gen_pad_token_id"]
        keep = (ids[0] != pad)
        self.put("sft_t2i.text_logits_nonpad", out.logits[0][keep])
        self.put("sft_t2i.x_BLC", proj_in[0][0])
        self.put("sft_t2i.x_SH", proj_in[0][1])
        self.put("sft_t2i.inf_in", proj_out[0].reshape(-1, proj_out[0].shape[-1]))
        start = int((ids[0] == self.ids["image_gen_start_token_id"]).nonzero()[0, 0])
        self.put("sft_t2i.ca_src_hidden", fwd["hidden_states"][0, :start])
        self.put("sft_t2i.ca_kv", proj_out[1])
        self.put("sft_t2i.cond_BD", fwd["cond_BD"])
        sched = [tuple(int(v) for v in t) for t in gt_l["scale_schedule"]]
        n_tok = int(sum(t * h * w for t, h, w in sched))
        self.info["sft_t2i"] = {
            "scale_schedule": [list(t) for t in sched], "n_pad": int((ids == pad).sum()), "n_scale_tokens": n_tok,
            "prompt_len": int((labels[0] == -100).sum()),
            "pixel_gen_values": "same tensor as the VAE encode input (see vae_enc_in_formula)",
            "determinism": "model.eval() + forward(dpo_training=True) (the 1.1 training branch without DropPath), "
                           "BitwiseSelfCorrection.noise_apply_strength=0, vargpt_gen.cond_drop_rate=0"}
        # understanding sample
        uids = torch.from_numpy(inp["sft_und.input_ids"]).to(dev)
        ulabels = torch.from_numpy(inp["sft_und.labels"]).to(dev)
        pv = torch.from_numpy(self.out["und.pixel_values"]).to(dev, self.dtype)
        grid = torch.from_numpy(self.out["und.image_grid_thw"]).to(dev)
        with torch.no_grad():
            self.put("sft_und.loss_plainpos", m(input_ids=uids, labels=ulabels, pixel_values=pv, image_grid_thw=grid,
                                                return_dict=True).loss)
            pos, _ = m.get_rope_index(uids, grid, None, torch.ones_like(uids))
            self.put("sft_und.loss_mrope", m(input_ids=uids, labels=ulabels, pixel_values=pv, image_grid_thw=grid,
                                             position_ids=pos, return_dict=True).loss)

    def run(self, inp: dict, parts=("und", "gen", "vae", "sft")) -> None:
        steps = {"und": self.understanding, "gen": self.generation, "vae": self.vae, "sft": self.sft}
        for p in parts:
            t = time.time()
            steps[p](inp)
            log(f"  {p}: {time.time() - t:.1f} s")


# ---------------------------------------------------------------------- loading
def resolve_checkpoint(model: str) -> Path:
    p = Path(model).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{model} is not a checkpoint directory (no config.json)")
        return p
    if "/" not in model or model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path {model} does not exist")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model))


def load_upstream(modeling, ckpt: Path, dtype: str, device: str):
    import torch

    cfg = json.loads((ckpt / "config.json").read_text())
    arch = sizes_mod.read_arch_sidecar(ckpt)
    s = sizes_mod.sizes_from_arch(cfg, arch)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    with upstream_env.sized(s):
        model = modeling.VARGPTQwen2VLForConditionalGeneration.from_pretrained(
            str(ckpt), torch_dtype=torch_dtype, low_cpu_mem_usage=True)
    upstream_env.set_pn(model, s.pn)
    model = model.to(device).eval()
    patching = __import__("patching_utils.patching", fromlist=["patching"])
    patching.patching(model)
    weights_dtype = "bfloat16" if cfg.get("torch_dtype") == "bfloat16" else "float32"
    if arch and arch.get("weights_dtype"):
        weights_dtype = arch["weights_dtype"]
    return model, cfg, arch, s, weights_dtype


def token_ids(cfg: dict) -> dict[str, int]:
    st = cfg["special_tokens"]
    return {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
            "pad_token_id": cfg.get("pad_token_id", cfg["bos_token_id"]),
            "vision_start_token_id": cfg["vision_start_token_id"], "vision_end_token_id": cfg["vision_end_token_id"],
            "vision_token_id": cfg["vision_token_id"], "image_token_id": cfg["image_token_id"],
            "video_token_id": cfg["video_token_id"], "image_gen_start_token_id": st["image_gen_start_token_id"],
            "image_gen_end_token_id": st["image_gen_end_token_id"], "image_gen_pad_token_id": st["image_gen_pad_token_id"]}


@contextlib.contextmanager
def float64_rerun(model):
    """What a float64 rerun of upstream's float32 code needs:

    * upstream's float32-mode bf16 rounding of the cross-attention (``CrossAttention.forward``
      takes it only when its inputs are float32) is kept: inputs and output rounded to bf16;
    * upstream's explicit ``.float()`` casts (e.g. ``shared_ada_lin(cond_BD.float())``) would feed
      float32 tensors to float64 layers: layer inputs are cast to the layer's dtype (the value
      keeps that float32 rounding, an error of about one float32 ulp in the rerun).
    """
    import torch

    basic = __import__("vargpt_qwen_v1_1.var_model.infinity.models.basic", fromlist=["x"])
    orig = basic.flash_attn_varlen_kvpacked_func

    def to_layer_dtype(mod, args):
        w = getattr(mod, "weight", None)
        if w is None or not w.is_floating_point():
            return None
        return tuple(a.to(w.dtype) if torch.is_tensor(a) and a.is_floating_point() and a.dtype != w.dtype else a
                     for a in args)

    layers = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.LayerNorm, torch.nn.GroupNorm)
    handles = [mod.register_forward_pre_hook(to_layer_dtype) for mod in model.modules() if isinstance(mod, layers)]

    def rounded(q, kv, *args, **kwargs):
        if q.dtype == torch.float64:
            out = orig(q.to(torch.bfloat16).double(), kv.to(torch.bfloat16).double(), *args, **kwargs)
            return out.to(torch.bfloat16).double()
        return orig(q, kv, *args, **kwargs)

    basic.flash_attn_varlen_kvpacked_func = rounded
    try:
        yield
    finally:
        basic.flash_attn_varlen_kvpacked_func = orig
        for h in handles:
            h.remove()


ROUNDING_QUANTILES = (50, 90, 99, 99.9)
# Tensors a rerun cannot measure: MultiScaleBSQ.forward keeps straight-through values (its bits
# cannot be forced); and, in a float64 rerun, values upstream computes in float32 whatever the
# model dtype (image preprocessing in numpy; the losses, from ``.float()`` logits; codes and
# teacher inputs, from bits).
NOT_RERUN = ("vae.msbsq_z",)
NOT_RERUN_FLOAT64 = (".pixel_values", ".loss_", "sft_t2i.lw", "next_in_codes", "summed_codes", "bsc_x_BLC_wo_prefix")


def rounding_distance(ref: dict, rerun: dict, rerun_dtype: str = "float64") -> dict:
    """Per float tensor: max and quantiles of |ref - rerun|, and the reference's scale max|ref|."""
    out = {}
    for name, a in ref.items():
        b = rerun.get(name)
        is_image = name.endswith("image_rgb_u8")
        blind = name in NOT_RERUN or (rerun_dtype == "float64" and any(t in name for t in NOT_RERUN_FLOAT64))
        if b is None or (a.dtype.kind != "f" and not is_image) or a.shape != b.shape or blind or not a.size:
            continue
        d = np.abs(a.astype(np.float64) - b.astype(np.float64)).ravel()
        st = {"max_abs": float(d.max()), "scale": float(np.abs(a).max())}
        for q, v in zip(ROUNDING_QUANTILES, np.percentile(d, ROUNDING_QUANTILES)):
            st[f"q{q:g}".replace(".", "_")] = float(v)
        out[name] = st
    return out


def tensor_descriptions() -> dict[str, str]:
    return json.loads((Path(__file__).with_name("descriptions.json")).read_text())


RERUN_METHOD = ("max and quantiles of |ref - rerun| per float tensor; the rerun repeats the recording on a copy "
                "of the model in a higher precision (float64 for a float32 reference, float32 for a bfloat16 "
                "one) with the same inputs and the reference's tokens and bits forced")


def rerun_distances(m, modeling, device: str, dtype: str, ids: dict, s, aspect: float, inp: dict, ref: dict,
                    parts) -> dict:
    """The reference's own rounding distance (see the module docstring)."""
    import torch

    hi = torch.float64 if dtype == "float32" else torch.float32
    log(f"rerun in {str(hi).replace('torch.', '')} (the reference's own rounding distance)")
    m_hi = copy.deepcopy(m).to("cpu" if hi == torch.float64 and device != "cpu" else device).to(hi)
    patching = __import__("patching_utils.patching", fromlist=["patching"])
    patching.patching(m_hi)
    dev_hi = next(m_hi.parameters()).device.type
    shadow = Recording(m_hi, modeling, dev_hi, ids, s, aspect, forced=ref)
    with float64_rerun(m_hi) if hi == torch.float64 else contextlib.nullcontext():
        shadow.run(inp, parts)
    del m_hi
    hi_name = str(hi).replace("torch.", "")
    return {"rerun_dtype": hi_name, "method": RERUN_METHOD, "tensors": rounding_distance(ref, shadow.out, hi_name)}


def record(upstream: str, model: str, out: str | None, device: str = "cpu", dtype: str = "float32",
           image: str | None = None, prompt: str | None = None, tokenizer: str | None = None, seed: int = 0,
           aspect: float = 1.0, inputs_from: str | None = None, rerun: str = "auto", parts=None,
           annotate: str | None = None) -> dict:
    """Record a reference bundle into ``out``; or, with ``annotate=REFS_FILE``, add the rounding
    distance of an existing bundle's reference (its tensors unchanged) to the ``refs.json`` beside it."""
    import torch

    t0 = time.time()
    notes = upstream_env.prepare(upstream)
    modeling = upstream_env.modeling()
    ckpt = resolve_checkpoint(model)
    if device == "cuda" and not torch.cuda.is_available():
        raise EnvError("--device cuda: this torch has no CUDA device")
    if annotate is not None:
        annotate_path = Path(annotate)
        if not annotate_path.is_file() or not (annotate_path.parent / "refs.json").is_file():
            raise FileNotFoundError(f"{annotate} is not a refs file with a refs.json beside it")
        inputs_from = inputs_from or str(annotate_path.parent / "refs.safetensors")
    torch.manual_seed(int(seed))
    log(f"loading {ckpt} ({dtype}, {device})")
    m, cfg, arch, s, weights_dtype = load_upstream(modeling, ckpt, dtype, device)
    ids = token_ids(cfg)
    parts = tuple(parts or ("und", "gen", "vae", "sft"))
    if annotate is not None:
        from safetensors.numpy import load_file

        ref = load_file(str(annotate_path))
        inp = _inputs_from(inputs_from)
        meta = json.loads((annotate_path.parent / "refs.json").read_text())
        sched = meta["info"].get("generation", {}).get("scale_schedule")
        aspect = sched[-1][1] / sched[-1][2] if sched else aspect
        block = rerun_distances(m, modeling, device, dtype, ids, s, aspect, inp, ref, parts)
        block["reference_dtype"] = dtype
        block["weights_dtype"] = weights_dtype
        meta["info"].setdefault("rounding", {})[annotate_path.name] = block
        (annotate_path.parent / "refs.json").write_text(json.dumps(meta, indent=1, default=_json) + "\n")
        log(f"added the rounding distance of {len(block['tensors'])} tensors to {annotate_path.parent / 'refs.json'}")
        return {"annotated": str(annotate_path), "tensors": len(block["tensors"]), "seconds": round(time.time() - t0, 1)}
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    gen_px = _pixel_size(s.pn, aspect)
    tok = None
    if prompt is not None:
        from transformers import AutoTokenizer

        tok_dir = tokenizer or str(ckpt)
        try:
            tok = AutoTokenizer.from_pretrained(tok_dir)
        except Exception as e:
            raise ValueError(f"--prompt needs tokenizer files: none usable in {tok_dir} ({type(e).__name__})") from None
    img = None
    if image is not None:
        from PIL import Image, ImageOps

        if not Path(image).is_file():
            raise FileNotFoundError(f"image {image} does not exist")
        try:
            img = np.asarray(ImageOps.exif_transpose(Image.open(image)).convert("RGB"))
        except OSError as e:
            raise ValueError(f"cannot read image {image}: {e}") from None
    tmp = Recording(m, modeling, device, ids, s, aspect)
    if inputs_from:
        inp, inp_desc = _inputs_from(inputs_from), {"from": str(inputs_from)}
    else:
        inp, inp_desc = inputs_mod.make_inputs(
            seed=seed, ids=ids, vocab=s.vocab, gen_hw=gen_px, image=img, prompt=prompt, tokenizer=tok,
            processor=lambda u8: [x.numpy() for x in tmp.preprocess(u8)])
        # VAE decode input: random codes at the latent grid, as the fixtures
        g = torch.Generator().manual_seed(int(seed) + 7)
        inp["vae.decode_in"] = (torch.randn(1, 32, gen_px[0] // 16, gen_px[1] // 16, generator=g) * 0.18).numpy()
        sched = tmp.vae_schedule(gen_px)
        n_tok = sum(t * h * w for t, h, w in sched)
        inputs_mod.finish_t2i(inp, ids, (n_tok + 127) // 128 * 128)
    log("recording the reference")
    out_dir.mkdir(parents=True, exist_ok=True)
    rec = Recording(m, modeling, device, ids, s, aspect, image_path=str(out_dir / "gen_image.png"))
    rec.run(inp, parts)
    refs = {**{k: v for k, v in inp.items() if not k.startswith("_")}, **rec.out}
    info = {
        "versions": _versions(), "recorder": notes, "checkpoint": str(model), "seed": int(seed),
        "dtype": dtype, "weights_dtype": weights_dtype, "device": device,
        "sizes": s.as_dict(), "vocab_size": s.vocab, "pn": s.pn, "gen_res": list(gen_px), "token_ids": ids,
        "inputs": inp_desc, "text_decoding": {"suppressed_token_ids": [ids["image_gen_start_token_id"]],
                                              "max_new_tokens": N_GREEDY},
        "vae_enc_in_formula": "t = float32(vae.enc_image_u8 as CHW) / 255 (torchvision to_tensor), x = (t + t) + (-1), "
                              "shape (1,3,H,W), cast to the model dtype",
        **rec.info,
    }
    n_params = sum(p.numel() for p in m.parameters())
    if rerun == "on" or (rerun == "auto" and n_params < 2e9):
        block = rerun_distances(m, modeling, device, dtype, ids, s, aspect, inp, rec.out, parts)
        block["reference_dtype"] = dtype
        block["weights_dtype"] = weights_dtype
        info["rounding"] = {"refs.safetensors": block}
    descs = tensor_descriptions()
    tensors = {}
    for name, v in refs.items():
        d = {"shape": list(v.shape), "dtype": str(v.dtype)}
        base = name.split(".")
        key = ".".join([base[0], "s{k}"] + base[2:]) if len(base) > 2 and base[1].startswith("s") and base[1][1:].isdigit() else name
        if key in descs:
            d["desc"] = descs[key]
        d.update(rec.meta.get(name, {}))
        tensors[name] = d
    out_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    save_file({k: v if v.flags.c_contiguous else v.copy() for k, v in refs.items()}, str(out_dir / "refs.safetensors"))
    (out_dir / "refs.json").write_text(json.dumps({"info": info, "tensors": tensors}, indent=1, default=_json) + "\n")
    log(f"wrote {len(refs)} tensors to {out_dir} in {time.time() - t0:.1f} s")
    return {"out": str(out_dir), "tensors": len(refs), "seconds": round(time.time() - t0, 1)}


class EnvError(upstream_env.EnvError):
    pass


def _json(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _pixel_size(pn: str, aspect: float) -> tuple[int, int]:
    dr = __import__("vargpt_qwen_v1_1.var_model.infinity.utils.dynamic_resolution", fromlist=["x"])
    tmpl = dr.h_div_w_templates[np.argmin(np.abs(dr.h_div_w_templates - aspect))]
    _, h, w = dr.dynamic_resolution_h_w[tmpl][pn]["scales"][-1]
    return h * 16, w * 16


def _inputs_from(path: str) -> dict:
    from safetensors.numpy import load_file

    p = Path(path)
    f = p / "refs.safetensors" if p.is_dir() else p
    r = load_file(str(f))
    keys = ["und.image_u8", "pre.image_u8", "vae.enc_image_u8", "vae.decode_in", "und.input_ids", "txt.input_ids",
            "gen.prompt_ids", "sft_t2i.input_ids", "sft_t2i.labels", "sft_und.input_ids", "sft_und.labels"]
    missing = [k for k in keys if k not in r]
    if missing:
        raise ValueError(f"{f} lacks the inputs {', '.join(missing)}")
    return {k: r[k] for k in keys}


def _versions() -> dict:
    import PIL
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__}
