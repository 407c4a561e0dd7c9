"""Parity check of a checkpoint against upstream reference outputs (``vargpt-mlx verify``).

A reference bundle is a ``refs*.safetensors`` file with a ``refs.json`` beside it (inputs and
settings in its ``info`` block). Inputs missing from the given refs file (e.g. the bf16 refs only
hold outputs) are read from ``refs.safetensors`` in the same folder. Only reference tensors
present in the given file are compared, each under the tolerance ``tolerances.py`` states.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np
from safetensors.numpy import load_file

from .image_processor import ImageProcessor
from .loading import load_model
from .models import bsq
from .models.rope_index import get_rope_index, plain_position_ids
from .models.vargpt import VARGPT, embed_multimodal
from .pipelines.image_generation import GenerationSettings, generate_image
from .text_generation import stream_generate
from .tolerances import Check, bits_agree_where_confident, compare
from .training.losses import t2i_sft_loss, und_sft_loss


class Bundle:
    def __init__(self, refs_path: str | Path):
        refs_path = Path(refs_path)
        self.path = refs_path
        self.outputs = load_file(str(refs_path))
        base = refs_path.parent / "refs.safetensors"
        self.inputs = dict(load_file(str(base))) if base.is_file() and base != refs_path else {}
        self.inputs.update(self.outputs)
        info_file = refs_path.parent / "refs.json"
        self.info = json.loads(info_file.read_text())["info"] if info_file.is_file() else {}

    def has(self, *names: str) -> bool:
        return all(n in self.outputs for n in names)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.inputs[name]


def _np(x) -> np.ndarray:
    return np.array(x.astype(mx.float32) if isinstance(x, mx.array) and x.dtype == mx.bfloat16 else x)


def _schedule(info_block: dict) -> list[tuple[int, int]]:
    return [(int(t[-2]), int(t[-1])) for t in info_block["scale_schedule"]]


class Verifier:
    def __init__(self, model: VARGPT, bundle: Bundle, tol: str = "fp32"):
        self.model, self.b, self.tol = model, bundle, tol
        self.tok = model.config.tokens

    def cmp(self, name: str, got, tol: str | None = None, ref=None) -> Check:
        ref = self.b[name] if ref is None else ref
        if tol is None:
            tol = "exact" if np.issubdtype(ref.dtype, np.integer) else self.tol
        return compare(name, _np(got), ref, tol)

    def rope(self, ids, grid=None):
        return get_rope_index(ids, grid, None, image_token_id=self.tok.image_token_id,
                              video_token_id=self.tok.video_token_id,
                              vision_start_token_id=self.tok.vision_start_token_id,
                              spatial_merge_size=self.model.config.vision.spatial_merge_size)

    # ------------------------------------------------------------------ families
    def preprocess(self) -> Iterator[Check]:
        proc = ImageProcessor()
        for fam in ("und", "pre"):
            if self.b.has(f"{fam}.pixel_values"):
                pv, grid = proc([self.b[f"{fam}.image_u8"]])
                yield self.cmp(f"{fam}.pixel_values", pv, "preprocess")
                yield self.cmp(f"{fam}.image_grid_thw", grid, "exact")

    def vision(self) -> Iterator[Check]:
        if self.b.has("und.vision_embeds"):
            feats = self.model.visual(mx.array(self.b["und.pixel_values"]).astype(self._dtype()),
                                      self.b["und.image_grid_thw"])
            yield self.cmp("und.vision_embeds", feats)

    def positions(self) -> Iterator[Check]:
        for fam, grid in (("und", "und.image_grid_thw"), ("txt", None)):
            if self.b.has(f"{fam}.position_ids"):
                pos, deltas = self.rope(self.b[f"{fam}.input_ids"], self.b[grid] if grid else None)
                yield self.cmp(f"{fam}.position_ids", pos, "exact")
                yield self.cmp(f"{fam}.rope_deltas", deltas, "exact")

    def _dtype(self):
        return self.model.lm_head.weight.dtype if self.model.lm_head.weight.dtype != mx.uint32 else mx.float32

    def _und_embeds(self):
        ids = mx.array(self.b["und.input_ids"])
        pv = mx.array(self.b["und.pixel_values"]).astype(self._dtype())
        return embed_multimodal(self.model, ids, pv, self.b["und.image_grid_thw"])

    def logits(self) -> Iterator[Check]:
        m = self.model
        if self.b.has("und.logits_mrope") or self.b.has("und.logits_plainpos"):
            emb = self._und_embeds()
            ids = self.b["und.input_ids"]
            if self.b.has("und.logits_mrope"):
                pos, _ = self.rope(ids, self.b["und.image_grid_thw"])
                yield self.cmp("und.logits_mrope", m.lm_head(m.model(emb, mx.array(pos))))
            if self.b.has("und.logits_plainpos"):
                pos = plain_position_ids(1, ids.shape[1])
                yield self.cmp("und.logits_plainpos", m.lm_head(m.model(emb, mx.array(pos))))
        if self.b.has("txt.logits"):
            ids = self.b["txt.input_ids"]
            emb = m.model.embed_tokens(mx.array(ids))
            yield self.cmp("txt.logits", m.lm_head(m.model(emb, mx.array(plain_position_ids(1, ids.shape[1])))))

    def greedy(self) -> Iterator[Check]:
        m, tok = self.model, self.tok
        cases = [("und", "und.gen_sequences", "und.gen_step_logits", (tok.eos_token_id,), 1.0),
                 ("txt", "txt.gen_sequences", "txt.gen_step_logits", (tok.eos_token_id,), 1.0),
                 ("und", "und.gen_sequences_reppen", None, (tok.eos_token_id, tok.bos_token_id), 1.05)]
        for fam, seq_name, logit_name, eos, rep in cases:
            if not self.b.has(seq_name):
                continue
            ids = self.b[f"{fam}.input_ids"]
            grid = self.b["und.image_grid_thw"] if fam == "und" else None
            emb = self._und_embeds() if fam == "und" else m.model.embed_tokens(mx.array(ids))
            pos, deltas = self.rope(ids, grid)
            ref = self.b[seq_name]
            n_new = ref.shape[1] - ids.shape[1]
            toks, logits = [], []
            for t, lg in stream_generate(m.model, m.lm_head, emb, mx.array(pos), int(deltas[0, 0]),
                                         max_tokens=n_new, eos_token_ids=eos, prompt_ids=ids[0].tolist(),
                                         repetition_penalty=rep if rep != 1.0 else None):
                toks.append(t)
                logits.append(_np(lg))
            got = np.concatenate([ids, np.array([toks], dtype=ids.dtype)], axis=1)
            yield self.cmp(seq_name, got, "exact")
            if logit_name and self.b.has(logit_name) and len(logits) == n_new:
                yield self.cmp(logit_name, np.stack(logits))

    def generation(self) -> Iterator[Check]:
        if not self.b.has("gen.s0.bit_logits_cfg"):
            return
        gi = self.b.info.get("generation", {})
        schedule = _schedule(gi) if gi else None
        n = len(schedule) if schedule else sum(1 for k in self.b.outputs if k.endswith(".bits"))
        teacher = [mx.array(self.b[f"gen.s{k}.bits"]) for k in range(n)]
        settings = GenerationSettings(cfg=float(gi.get("cfg", 3.0)), tau=float(gi.get("tau", 0.5)), argmax=True)
        res = generate_image(self.model, self.b["gen.prompt_ids"], settings, teacher_bits=teacher,
                             schedule=schedule, trace=True)
        tr = res.trace
        for name in sorted(self.b.outputs):
            if not name.startswith("gen.") or name in ("gen.sequences", "gen.prompt_ids", "gen.image_rgb_u8"):
                continue
            if name.endswith(".bits"):
                k = int(name.split(".")[1][1:])
                yield bits_agree_where_confident(name, _np(tr[f"gen.s{k}.bit_logits_cfg"]),
                                                 self.b[f"gen.s{k}.bit_logits_cfg"], self.b[name],
                                                 "fp32" if self.tol == "fp32" else "bf16")
            elif name == "gen.summed_codes":
                yield self.cmp(name, tr[name].transpose(0, 3, 1, 2))
            elif name == "gen.decoded":
                yield self.cmp(name, tr[name].transpose(0, 3, 1, 2))
            elif name in tr:
                got = _np(tr[name])
                ref = self.b[name]
                tol = "bit_logits" if ".bit_logits" in name and self.tol == "fp32" else None
                yield self.cmp(name, got.reshape(ref.shape) if got.size == ref.size else got, tol)
            elif name == "gen.cond_BD_or_gss":
                yield self.cmp(name, self.model.vargpt_gen.ada_condition(tr["gen.cond_BD"]))
            elif name == "gen.sos_stage":
                yield self.cmp(name, self.model.vargpt_gen.sos_tokens(tr["gen.cond_BD"]))
            elif name.endswith(".proj_in_out"):
                k = int(name.split(".")[1][1:])
                x = self.model.image_gen_projector(self.model.vargpt_gen.word_embed(tr[f"gen.s{k}.next_in_codes"]))
                yield self.cmp(name, x.reshape(self.b[name].shape))
        if self.b.has("gen.image_rgb_u8"):
            # the image decoded from the reference bits' codes
            yield self.cmp("gen.image_rgb_u8", res.image, "image_u8" if self.tol == "fp32" else "bf16_image_u8")
        if self.b.has("gen.sequences"):
            # prompt + <|image_gen_start|> + t2, the token upstream picks after the start token
            # (kept in its output, never embedded)
            seq = [*self.b["gen.prompt_ids"][0].tolist(), self.tok.image_gen_start_token_id,
                   int(tr["gen.next_token"].item())]
            yield self.cmp("gen.sequences", np.array([seq]), "exact")

    def vae(self) -> Iterator[Check]:
        m, b = self.model, self.b
        dt = self._dtype()
        if b.has("vae.decode_out"):
            out = m.vae_local.decode(mx.array(b["vae.decode_in"]).transpose(0, 2, 3, 1).astype(dt))
            yield self.cmp("vae.decode_out", out.transpose(0, 3, 1, 2))
        if not b.has("vae.raw_features"):
            return
        u8 = b["vae.enc_image_u8"]
        t = u8.astype(np.float32) / np.float32(255)
        x = mx.array((t + t) + np.float32(-1))[None].astype(dt)
        feats = m.vae_local.encode_features(x)
        yield self.cmp("vae.raw_features", feats.transpose(0, 3, 1, 2))
        schedule = _schedule(b.info["vae"])
        bits, x_wo, summed = bsq.encode_multiscale(feats.astype(mx.float32), schedule)
        gt = np.concatenate([_np(v).reshape(1, -1, v.shape[-1]) for v in bits], axis=1)
        yield self._bits_check("vae.bsc_gt_BL", gt)
        if b.has("vae.bsc_x_BLC_wo_prefix"):
            yield self.cmp("vae.bsc_x_BLC_wo_prefix", x_wo)
        if b.has("vae.bsc_summed_codes"):
            yield self.cmp("vae.bsc_summed_codes", summed.transpose(0, 3, 1, 2)[:, :, None])
        if b.has("vae.bsc_recon"):
            ref_bits = b["vae.bsc_gt_BL"]
            per, off = [], 0
            for h, w in schedule:
                per.append(mx.array(ref_bits[:, off:off + h * w]).reshape(1, h, w, -1))
                off += h * w
            rec = m.vae_local.decode(bsq.codes_from_bits(per, schedule).astype(dt))
            yield self.cmp("vae.bsc_recon", rec.transpose(0, 3, 1, 2))

    def _bits_check(self, name: str, got: np.ndarray) -> Check:
        ref = self.b[name]
        n_diff = int((got != ref).sum())
        c = compare(name, got, ref, "exact")
        c.note = f"{n_diff} of {ref.size} bits differ"
        return c

    def sft(self) -> Iterator[Check]:
        m, b = self.model, self.b
        dt = self._dtype()
        if b.has("sft_t2i.loss_total"):
            u8 = b["vae.enc_image_u8"]
            t = u8.astype(np.float32) / np.float32(255)
            x = mx.array((t + t) + np.float32(-1))[None].astype(dt)
            out = t2i_sft_loss(m, mx.array(b["sft_t2i.input_ids"]), x, _schedule(b.info["sft_t2i"]))
            names = {"sft_t2i.loss_total": out.loss, "sft_t2i.loss_text_ce": out.text_ce,
                     "sft_t2i.loss_bits_mean": out.bit_ce, "sft_t2i.loss_bits_weighted": out.bit_ce_weighted,
                     "sft_t2i.image_gen_logits": out.bit_logits}
            for name, got in names.items():
                if b.has(name):
                    tol = None if self.tol != "fp32" else "loss" if "loss" in name else "bit_logits"
                    yield self.cmp(name, got, tol)
            if b.has("sft_t2i.gt_BL"):
                yield self._bits_check("sft_t2i.gt_BL", _np(out.gt_bits).astype(np.uint8))
        if b.has("sft_und.loss_plainpos"):
            ids = mx.array(b["sft_und.input_ids"])
            labels = mx.array(b["sft_und.labels"])
            pv = mx.array(b["und.pixel_values"]).astype(dt)
            grid = b["und.image_grid_thw"]
            yield self.cmp("sft_und.loss_plainpos", und_sft_loss(m, ids, labels, pv, grid, mrope=False), "loss")
            if b.has("sft_und.loss_mrope"):
                yield self.cmp("sft_und.loss_mrope", und_sft_loss(m, ids, labels, pv, grid, mrope=True), "loss")

    FAMILIES: dict[str, str] = {
        "preprocess": "preprocessing",
        "vision": "vision tower",
        "positions": "rope positions",
        "logits": "LLM logits",
        "greedy": "greedy decoding",
        "generation": "image generation",
        "vae": "BSQ VAE",
        "sft": "training losses",
    }

    def run(self, on_family: Callable[[str], None] | None = None) -> list[tuple[str, Check]]:
        results = []
        for fam in self.FAMILIES:
            if on_family:
                on_family(fam)
            for c in getattr(self, fam)():
                results.append((fam, c))
        return results


def verify(model_dir: str | Path, refs_path: str | Path, on_family=None,
           dtype: mx.Dtype = mx.float32) -> list[tuple[str, Check]]:
    """Load ``model_dir`` (computing in ``dtype``) and compare it with every reference in ``refs_path``.

    A checkpoint stored in bfloat16 is held to the ``bf16`` tolerances (its weights carry bf16
    rounding whatever the compute dtype), a float32 one to the float32 tolerances.
    """
    bundle = Bundle(refs_path)
    model = load_model(model_dir, dtype=dtype)
    stored = {v.dtype for k, v in mx.load(str(next(Path(model_dir).glob("*.safetensors")))).items()}
    tol = "bf16" if (mx.bfloat16 in stored or dtype == mx.bfloat16) else "fp32"
    return Verifier(model, bundle, tol).run(on_family)
