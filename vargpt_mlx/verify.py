"""Parity check of a checkpoint against upstream reference outputs (``vargpt-mlx verify``).

A reference bundle is a ``refs*.safetensors`` file with a ``refs.json`` beside it (inputs and
settings in its ``info`` block, and, for bundles made by ``vargpt-mlx reference record``, the
reference's own rounding distance per tensor in ``info.rounding``). Inputs missing from the given
refs file (e.g. the bf16 refs only hold outputs) are read from ``refs.safetensors`` in the same
folder. Only reference tensors present in the given file are compared, each under the rule
``tolerances.py`` states:

* every bit check is a near-tie rule with a counted maximum of near-ties (``bits_check``);
* multi-scale bits are compared given the reference's earlier bits, and everything downstream of
  bits (generation per scale, VAE teacher inputs and codes, decoded images, the text-to-image
  training logits and losses) is computed from the reference's bits;
* image generation is also run free (argmax, no teacher): its bits must equal the reference's
  until the first scale where a bit differs, and there only at reference near-ties;
* the generation condition's bfloat16 ties (``text_proj_for_sos``) are rounded as the reference's
  ``gen.cond_BD`` shows, at most ``MAX_POOL_FLIPS`` of them, and every check runs on those rows
  (``Verifier.pool_rounding``; the reasoning is in tolerances.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from safetensors.numpy import load_file

from .image_processor import ImageProcessor
from .loading import load_model
from .models import bsq
from .models.infinity import CrossMemory
from .models.rope_index import plain_position_ids
from .models.vargpt import VARGPT, embed_multimodal
from .pipelines.image_generation import (GenerationResult, GenerationSettings, draw_images, next_scale_embedding,
                                         prefill_prompt)
from .text_generation import stream_generate
from .tolerances import (FLIP_TENSORS, FLOOR_REL, MAX_POOL_FLIPS, MAX_TIE_FRAC, MAX_TIE_FRAC_BF16, TOLERANCES, Check,
                         bf16_rounding_ties, bits_agree_where_confident, bits_check, compare, measured,
                         measured_levels)
from .training.losses import BIT_LOSS_WEIGHT, gen_forward, masked_ce, scale_weights, und_sft_loss


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
        block = (self.info.get("rounding") or {}).get(refs_path.name) or {}
        self.stats: dict[str, dict] = block.get("tensors", {})
        self.ref_dtype = block.get("reference_dtype") or self.info.get("dtype")
        self.ref_weights = block.get("weights_dtype") or self.info.get("weights_dtype")

    def has(self, *names: str) -> bool:
        return all(n in self.outputs for n in names)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.inputs[name]


def _np(x) -> np.ndarray:
    return np.array(x.astype(mx.float32) if isinstance(x, mx.array) and x.dtype == mx.bfloat16 else x)


def _schedule(info_block: dict) -> list[tuple[int, int]]:
    return [(int(t[-2]), int(t[-1])) for t in info_block["scale_schedule"]]


def _split_scales(flat: np.ndarray, schedule) -> list[np.ndarray]:
    """(1, L, d) concatenated per-scale rows -> per scale (1, h, w, d)."""
    out, off = [], 0
    for h, w in schedule:
        out.append(flat[:, off:off + h * w].reshape(1, h, w, -1))
        off += h * w
    return out


def _cat_scales(per: list) -> np.ndarray:
    return np.concatenate([_np(v).reshape(1, -1, v.shape[-1]) for v in per], axis=1)


def bundle_tensors(res: GenerationResult) -> dict[str, mx.array]:
    """A traced draw's tensors under the reference bundle's names (``gen.*``, ``gen.s{k}.*``)."""
    tr = res.trace
    out = {"gen.ca_src_hidden": tr.ca_src_hidden, "gen.ca_kv_cond": tr.ca_kv_cond, "gen.cond_BD": tr.cond_BD,
           "gen.next_logits": tr.next_logits, "gen.summed_codes": res.summed_codes, "gen.decoded": tr.decoded}
    for k, rec in enumerate(tr.scales):
        for f in dataclasses.fields(rec):
            if f.name != "next_in_codes":
                out[f"gen.s{k}.{f.name}"] = getattr(rec, f.name)
            elif rec.next_in_codes is not None:
                out[f"gen.s{k + 1}.next_in_codes"] = rec.next_in_codes
    return out


@dataclasses.dataclass
class PoolRounding:
    rows_in: np.ndarray  # (R, C) the sos rows fed to ``Infinity.condition``
    rows_out: mx.array  # (R, C) their condition rows, ties rounded as the reference did
    ok: bool
    note: str


@contextlib.contextmanager
def _condition_rows(inf, pool: PoolRounding | None):
    """While verifying, ``inf.condition`` gives ``pool.rows_out[i]`` for an input row equal to
    ``pool.rows_in[i]`` (generation's cond and uncond rows, training's sos row) and its own result
    for any other row; the model itself is unchanged afterwards."""
    if pool is None:
        yield
        return
    real = inf.condition

    def condition(sos: mx.array) -> mx.array:
        out = real(sos)
        got = np.array(sos.astype(mx.float32))
        idx = [next((i for i, r in enumerate(pool.rows_in) if np.array_equal(g, r)), None) for g in got]
        if all(i is None for i in idx):
            return out
        return mx.stack([out[k] if i is None else pool.rows_out[i].astype(out.dtype) for k, i in enumerate(idx)])

    object.__setattr__(inf, "condition", condition)  # an instance attribute shadows the method
    try:
        yield
    finally:
        object.__delattr__(inf, "condition")


class Verifier:
    def __init__(self, model: VARGPT, bundle: Bundle, tol: str = "fp32", use_stats: bool = True):
        self.model, self.b, self.tol = model, bundle, tol
        self.tok = model.config.tokens
        self.stats = bundle.stats if use_stats else {}
        self.pool: PoolRounding | None = None  # set by ``run``

    # ------------------------------------------------------------------ comparison helpers
    def cmp(self, name: str, got, tol: str | None = None, ref=None, floor: float | None = None) -> Check:
        ref = self.b[name] if ref is None else ref
        got = _np(got)
        if tol is None:
            tol = "exact" if np.issubdtype(ref.dtype, np.integer) and not name.endswith("image_rgb_u8") else self.tol
        if tol != "exact" and self.measured(name):
            return measured(name, got, ref, self.stats[name], flips=any(t in name for t in FLIP_TENSORS), floor=floor)
        c = compare(name, got, ref, tol)
        if tol != "exact" and self.stats and tol != "preprocess":
            c.note = "not measured by the rerun (computed in float32 there too): float32 rule"
        return c

    def measured(self, name: str) -> bool:
        """Whether the bundle measured this tensor's rounding distance (a rerun that is not blind to it:
        upstream computes losses from ``.float()`` logits and codes from bits in float32 even in a
        float64 rerun, which then shows a distance of 0)."""
        st = self.stats.get(name)
        return st is not None and float(st.get("max_abs", 0.0)) > 0.0

    def tie_level(self, name: str) -> float:
        """How far a reference tensor's elements typically are from the port's: the reference's own
        99th-percentile rounding distance (floor: FLOOR_REL of the scale), or the legacy bound
        (float32: FP32_REL of the scale; bf16: BF16_REL). Bits within twice it (logit pairs) or
        within it (residuals) of a tie are counted as near-ties; a bit farther from a tie may still
        differ where the port's actual error on its quantity reaches the margin (``bits_check``)."""
        ref = self.b[name]
        scale = max(float(np.abs(ref.astype(np.float64)).max()), 1.0)
        if self.measured(name):
            st = self.stats[name]
            return max(float(st.get("q99", st["max_abs"])), FLOOR_REL * scale)
        return TOLERANCES["bf16" if self.tol == "bf16" else "fp32"][1] * scale

    @property
    def max_tie_frac(self) -> float:
        bf16 = self.tol == "bf16" or self.b.ref_dtype == "bfloat16"
        return MAX_TIE_FRAC_BF16 if bf16 else MAX_TIE_FRAC

    def rope(self, ids, grid=None):
        return self.model.rope_index(ids, grid)

    def _dtype(self):
        return self.model.lm_head.weight.dtype if self.model.lm_head.weight.dtype != mx.uint32 else mx.float32

    def _vae_input(self, dt):
        t = self.b["vae.enc_image_u8"].astype(np.float32) / np.float32(255)
        return mx.array((t + t) + np.float32(-1))[None].astype(dt)

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
        """Greedy decoding: the tokens must equal the reference's until the first step where they
        differ, and there the reference's choice must be a near-tie between the two tokens (its
        score margin within twice the step logits' tie level, or within the port's actual error on
        that margin); after that step the two runs decode different prefixes and are not compared.
        Step logits are compared for every step on a common prefix. Without reference step logits
        (legacy bundles) the sequences must be identical."""
        m, tok = self.model, self.tok
        suppressed = list((self.b.info.get("text_decoding") or {}).get("suppressed_token_ids", []))

        def suppress(history, logits):  # the recorder keeps text decoding text (refs.json text_decoding)
            mask = np.zeros(logits.shape[-1], dtype=bool)
            mask[suppressed] = True
            return mx.where(mx.array(mask), mx.array(-np.inf, dtype=logits.dtype), logits)

        cases = [("und", "und.gen_sequences", "und.gen_step_logits", (tok.eos_token_id,), 1.0),
                 ("txt", "txt.gen_sequences", "txt.gen_step_logits", (tok.eos_token_id,), 1.0),
                 ("und", "und.gen_sequences_reppen", "und.gen_step_logits_reppen",
                  (tok.eos_token_id, tok.bos_token_id), 1.05)]
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
                                         repetition_penalty=rep if rep != 1.0 else None,
                                         logits_processors=[suppress] if suppressed else None):
                toks.append(t)
                logits.append(_np(lg))
            got = np.concatenate([ids, np.array([toks], dtype=ids.dtype)], axis=1)
            ref_logits = self.b[logit_name] if self.b.has(logit_name) else None
            if ref_logits is None:
                yield self.cmp(seq_name, got, "exact")
                continue
            ref_new = ref[0, ids.shape[1]:].tolist()
            split = next((i for i in range(max(len(toks), len(ref_new)))
                          if i >= len(toks) or i >= len(ref_new) or toks[i] != ref_new[i]), None)
            if split is None:
                yield self.cmp(seq_name, got, "exact")
                common = len(toks)
            else:
                yield self._greedy_tie(seq_name, logit_name, ids[0].tolist() + ref_new[:split], split,
                                       toks, ref_new, logits, ref_logits, rep, suppressed)
                common = split + 1
            common = min(common, len(logits), ref_logits.shape[0])
            yield self.cmp(logit_name, np.stack(logits[:common]), ref=ref_logits[:common])

    def _greedy_tie(self, name, logit_name, history, i, toks, ref_new, logits, ref_logits, rep, suppressed) -> Check:
        def scores(raw):  # HF's processors: repetition penalty over the history, then suppression
            sc = np.asarray(raw, dtype=np.float64).copy()
            if rep != 1.0:
                seen = np.unique(history)
                v = sc[seen]
                sc[seen] = np.where(v < 0, v * rep, v / rep)
            sc[suppressed] = -np.inf
            return sc

        if i >= len(toks) or i >= len(ref_new) or i >= len(logits):
            return Check(name, float("inf"), 0.0, False, "exact", f"the sequences end differently at step {i}")
        a, b = ref_new[i], toks[i]  # the reference's token and the port's
        sr, sp = scores(ref_logits[i]), scores(logits[i])
        margin = float(sr[a] - sr[b])
        explained = abs(float(sp[a] - sp[b]) - margin)
        tie = 2 * self.tie_level(logit_name) * max(rep, 1.0)
        ok = -tie <= margin <= max(tie, explained)  # the reference's token must be its own (near-)argmax
        note = (f"identical through step {i - 1}; at step {i} the reference's margin between its token {a} and "
                f"the port's {b} is {margin:.3g} (near-tie level {tie:.2g}, port's error on it {explained:.2g}); "
                "not compared further")
        return Check(name, 0.0 if ok else margin, 0.0, ok, "exact", note)

    def generation(self) -> Iterator[Check]:
        if not self.b.has("gen.s0.bit_logits_cfg"):
            return
        gi = self.b.info.get("generation", {})
        schedule = _schedule(gi) if gi else None
        n = len(schedule) if schedule else sum(1 for k in self.b.outputs if k.endswith(".bits"))
        teacher = [mx.array(self.b[f"gen.s{k}.bits"]) for k in range(n)]
        settings = GenerationSettings(cfg=float(gi.get("cfg", 3.0)), tau=float(gi.get("tau", 0.5)), argmax=True)
        prefill = prefill_prompt(self.model, self.b["gen.prompt_ids"])
        (res,) = draw_images(self.model, *prefill, settings, teacher_bits=teacher, schedule=schedule, trace=True)
        tr = bundle_tensors(res)
        bit_names = []
        for name in sorted(self.b.outputs):
            if not name.startswith("gen.") or name in ("gen.sequences", "gen.prompt_ids", "gen.image_rgb_u8"):
                continue
            if name.endswith(".bits"):
                bit_names.append(name)
            elif name in ("gen.summed_codes", "gen.decoded"):
                yield self.cmp(name, tr[name].transpose(0, 3, 1, 2))
            elif name in tr:
                got = _np(tr[name])
                ref = self.b[name]
                tol = "bit_logits" if ".bit_logits" in name and self.tol == "fp32" else None
                c = self.cmp(name, got.reshape(ref.shape) if got.size == ref.size else got, tol)
                if name == "gen.cond_BD" and self.pool is not None:
                    c.ok, c.note = c.ok and self.pool.ok, "; ".join(filter(None, [self.pool.note, c.note]))
                yield c
            elif name == "gen.cond_BD_or_gss":
                yield self.cmp(name, self.model.vargpt_gen.ada_condition(tr["gen.cond_BD"]))
            elif name == "gen.sos_stage":
                yield self.cmp(name, self.model.vargpt_gen.sos_tokens(tr["gen.cond_BD"]))
            elif name.endswith(".proj_in_out"):
                k = int(name.split(".")[1][1:])
                x = next_scale_embedding(self.model, tr[f"gen.s{k}.next_in_codes"])
                yield self.cmp(name, x.reshape(self.b[name].shape))
        # bits: the port's choice from its own (teacher-forced) logits, near-tie rule
        for name in sorted(bit_names, key=lambda s: int(s.split(".")[1][1:])):
            k = int(name.split(".")[1][1:])
            lname = f"gen.s{k}.bit_logits_cfg"
            yield bits_agree_where_confident(name, _np(tr[lname]), self.b[lname], self.b[name],
                                             "fp32" if self.tol == "fp32" else "bf16",
                                             logit_bound=self.tie_level(lname), max_tie_frac=self.max_tie_frac)
        if self.b.has("gen.image_rgb_u8"):
            # the image decoded from the reference bits' codes
            yield self.image_check(res.image, _np(tr["gen.decoded"]).transpose(0, 3, 1, 2))
        if self.b.has("gen.sequences"):
            # prompt + <|image_gen_start|> + t2, the token upstream picks after the start token
            # (kept in its output, never embedded); t2 may differ at a near-tie of its logits
            seq = [*self.b["gen.prompt_ids"][0].tolist(), self.tok.image_gen_start_token_id,
                   int(mx.argmax(tr["gen.next_logits"]).item())]
            ref_seq = self.b["gen.sequences"]
            if self.b.has("gen.next_token_logits") and seq[-1] != int(ref_seq[0, -1]):
                ids = ref_seq[0, :-1].tolist()
                yield self._greedy_tie("gen.sequences", "gen.next_token_logits", ids, 0, [seq[-1]],
                                       [int(ref_seq[0, -1])], [_np(tr["gen.next_logits"]).reshape(-1)],
                                       self.b["gen.next_token_logits"].reshape(1, -1), 1.0, [])
            else:
                yield self.cmp("gen.sequences", np.array([seq]), "exact")
            if self.b.has("gen.next_token_logits"):
                yield self.cmp("gen.next_token_logits", _np(tr["gen.next_logits"]).reshape(self.b["gen.next_token_logits"].shape))
        if schedule is not None and len(bit_names) == n:
            yield self.free_running(prefill, settings, schedule, n, tr)

    def image_check(self, image: np.ndarray, decoded: np.ndarray) -> Check:
        """uint8 image = trunc(127.5 (x + 1)) of the decoded floats x: with x within b of the reference,
        a pixel is within 127.5 b + 1 grey levels (the 1: truncation at a level boundary). b is the
        decoded floats' bound when the bundle has them; else the measured rule (floor 1 grey level),
        else the legacy rule."""
        name, ref = "gen.image_rgb_u8", self.b["gen.image_rgb_u8"]
        if self.b.has("gen.decoded"):
            dref = self.b["gen.decoded"]
            if self.measured("gen.decoded"):
                b = measured_levels(self.stats["gen.decoded"], max(float(np.abs(dref).max()), 1.0))["max"]
            else:
                b = TOLERANCES["bf16" if self.tol == "bf16" else "fp32"][1] * max(float(np.abs(dref).max()), 1.0)
            bound = float(np.floor(127.5 * b)) + 1.0
            err = float(np.abs(image.astype(np.int32) - ref.astype(np.int32)).max())
            return Check(name, err, bound, err <= bound, "u8", f"127.5 x decoded bound {b:.2g} + 1 truncation level")
        if self.measured(name):
            return measured(name, image, ref, self.stats[name], floor=1.0)
        return compare(name, image, ref, "image_u8" if self.tol == "fp32" else "bf16_image_u8")

    def free_running(self, prefill, settings: GenerationSettings, schedule, n: int, trace: dict) -> Check:
        """Generation without teacher: identical bits until the first scale where a bit differs,
        and there only at reference near-ties (after it, the two runs legitimately diverge). Up to
        that scale the free run saw the teacher's inputs, so its logits are the teacher-forced
        ones and their actual error explains a flip."""
        (free,) = draw_images(self.model, *prefill, settings, schedule=schedule, decode=False)
        for k in range(n):
            got = _np(free.bits[k]).astype(np.uint8)
            ref = self.b[f"gen.s{k}.bits"]
            if np.array_equal(got.reshape(ref.shape), ref):
                continue
            lname = f"gen.s{k}.bit_logits_cfg"
            r = self.b[lname].astype(np.float64).reshape(-1, 2)
            g = _np(trace[lname]).astype(np.float64).reshape(-1, 2)
            c = bits_check("gen.free_running", got, ref, r[:, 1] - r[:, 0], 2 * self.tie_level(lname),
                           self.max_tie_frac, explained=(g[:, 1] - g[:, 0]) - (r[:, 1] - r[:, 0]))
            c.note = f"identical through scale {k - 1} of {n - 1}; at scale {k}: " + c.note + "; not compared further"
            return c
        return Check("gen.free_running", 0.0, 0.0, True, "bits", f"all {n} scales identical (argmax, no teacher)")

    # ------------------------------------------------------------------ VAE and training
    def _features(self):
        if not hasattr(self, "_feats"):
            self._feats = self.model.vae_local.encode_features(self._vae_input(self._dtype()))
        return self._feats

    def _given_ref_bits(self, feats: mx.array, schedule, ref_flat: np.ndarray):
        """Port bits of every scale given the reference's bits of the earlier scales, the
        teacher inputs and summed codes of the reference's bits, and the per-scale residuals
        (the quantity whose sign is the bit)."""
        ref_per = [mx.array(b) for b in _split_scales(ref_flat, schedule)]
        it = iter(ref_per)
        bits, x_wo, summed = bsq.encode_multiscale(feats.astype(mx.float32), schedule, flip=lambda _b: next(it))
        full, last = tuple(schedule[-1]), len(schedule) - 1
        cum, residuals = mx.zeros_like(feats.astype(mx.float32)), []
        for si, size in enumerate(schedule):
            r = feats.astype(mx.float32) - cum
            if si != last:
                r = bsq.downsample_area(r, size)
            residuals.append(r)
            cum = cum + bsq.upsample_trilinear(bsq.bits_to_codes(ref_per[si]), full)
        return bits, x_wo, summed, residuals

    def _gt_bits_check(self, name: str, got_per: list, residuals: list) -> Check:
        ref = self.b[name]
        port_r = _cat_scales(residuals).reshape(-1)
        if self.b.has("vae.bsc_residual"):
            margins = self.b["vae.bsc_residual"].reshape(-1)
            tie, explained = self.tie_level("vae.bsc_residual"), port_r - margins
        else:  # legacy bundle: the port's own residual (a flip implies a small residual on both sides)
            margins, explained = port_r, None
            tie = TOLERANCES["bf16" if self.tol == "bf16" else "fp32"][1] * max(
                float(np.abs(_np(self._features())).max()), 1.0)
        return bits_check(name, _cat_scales(got_per).astype(np.uint8), ref, margins, tie, self.max_tie_frac,
                          note="given the reference bits of earlier scales", explained=explained)

    def vae(self) -> Iterator[Check]:
        m, b = self.model, self.b
        dt = self._dtype()
        if b.has("vae.decode_out"):
            out = m.vae_local.decode(mx.array(b["vae.decode_in"]).transpose(0, 2, 3, 1).astype(dt))
            yield self.cmp("vae.decode_out", out.transpose(0, 3, 1, 2))
        if not b.has("vae.raw_features"):
            return
        feats = self._features()
        yield self.cmp("vae.raw_features", feats.transpose(0, 3, 1, 2))
        schedule = _schedule(b.info["vae"])
        bits, x_wo, summed, residuals = self._given_ref_bits(feats, schedule, b["vae.bsc_gt_BL"])
        if b.has("vae.bsc_residual"):
            yield self.cmp("vae.bsc_residual", _cat_scales(residuals))
        yield self._gt_bits_check("vae.bsc_gt_BL", bits, residuals)
        if b.has("vae.bsc_x_BLC_wo_prefix"):
            yield self.cmp("vae.bsc_x_BLC_wo_prefix", x_wo)
        if b.has("vae.bsc_summed_codes"):
            yield self.cmp("vae.bsc_summed_codes", summed.transpose(0, 3, 1, 2)[:, :, None])
        if b.has("vae.bsc_recon"):
            per = [mx.array(x) for x in _split_scales(b["vae.bsc_gt_BL"], schedule)]
            rec = m.vae_local.decode(bsq.codes_from_bits(per, schedule).astype(dt))
            yield self.cmp("vae.bsc_recon", rec.transpose(0, 3, 1, 2))

    def sft(self) -> Iterator[Check]:
        m, b = self.model, self.b
        dt = self._dtype()
        if b.has("sft_t2i.loss_total"):
            schedule = _schedule(b.info["sft_t2i"])
            ids = mx.array(b["sft_t2i.input_ids"])
            feats = self._features()
            ref_bits = next((n for n in ("sft_t2i.gt_BL", "vae.bsc_gt_BL") if b.has(n)), None)
            if ref_bits is not None:  # the training forward on the reference's bits
                gt_ref = b[ref_bits]
                bits, x_wo, _, residuals = self._given_ref_bits(feats, schedule, gt_ref)
                if b.has("sft_t2i.gt_BL"):
                    yield self._gt_bits_check("sft_t2i.gt_BL", bits, residuals)
            else:  # a refs file without the reference's bits (e.g. bf16 outputs only): the port's own
                bits, x_wo, _ = bsq.encode_multiscale(feats.astype(mx.float32), schedule)
                gt_ref = _cat_scales(bits).astype(np.int32)
            hidden, bit_logits = gen_forward(m, ids, x_wo.astype(dt), schedule)
            text_logits = m.lm_head(hidden)
            targets = ids[:, 1:]
            text_ce = masked_ce(text_logits[:, :-1], targets, targets == self.tok.image_gen_pad_token_id)
            B, Lb, _ = bit_logits.shape
            bit_ce = nn.losses.cross_entropy(bit_logits.astype(mx.float32).reshape(B, Lb, -1, 2),
                                             mx.array(gt_ref.astype(np.int32)), reduction="mean")
            bit_w = (bit_ce * scale_weights(schedule)).sum()
            names = {"sft_t2i.loss_total": text_ce + BIT_LOSS_WEIGHT * bit_w, "sft_t2i.loss_text_ce": text_ce,
                     "sft_t2i.loss_bits_mean": bit_ce, "sft_t2i.loss_bits_weighted": bit_w,
                     "sft_t2i.image_gen_logits": bit_logits}
            for name, got in names.items():
                if b.has(name):
                    tol = None if self.tol != "fp32" else "loss" if "loss" in name else "bit_logits"
                    yield self.cmp(name, got, tol)
            if b.has("sft_t2i.text_logits_nonpad"):
                rows = np.nonzero(b["sft_t2i.input_ids"][0] != self.tok.image_gen_pad_token_id)[0]
                yield self.cmp("sft_t2i.text_logits_nonpad", text_logits[0, mx.array(rows)])
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
        self.pool = self.pool_rounding()
        with _condition_rows(self.model.vargpt_gen, self.pool):
            for fam in self.FAMILIES:
                if on_family:
                    on_family(fam)
                for c in getattr(self, fam)():
                    results.append((fam, c))
        return results

    # ------------------------------------------------------------------ the condition's bf16 ties
    def pool_rounding(self) -> "PoolRounding | None":
        """The generation condition rows ``[cond; uncond]`` with the attentive pool's bfloat16 ties
        rounded as the reference's ``gen.cond_BD`` shows (tolerances.py: ``bf16_rounding_ties``).
        None (the plain check decides) for bundles without ``gen.cond_BD``, for ports computing in
        bf16, and for references computed in bf16: there upstream's v comes from bf16 arithmetic, off
        the exact value by up to a bf16 rounding at every element, not only at ties, so the tie count
        MAX_POOL_FLIPS was derived for (float32 noise only) does not apply; the bf16 rule's bound, the
        reference's own measured rounding, covers those rows (measured on the live bf16 config of
        VARGPT_LIVE_SEED=196483, where the tie rule wanted 4 flips: 0.018 against 0.074 unresolved)."""
        if not self.b.has("gen.cond_BD") or self._dtype() != mx.float32 or self.b.ref_dtype == "bfloat16":
            return None
        inf = self.model.vargpt_gen
        ca = inf.text_proj_for_sos.ca
        sos = self.model.sos_rows().astype(mx.float32)
        R, C = sos.shape[0], ca.v_bias.shape[0]
        _, v = ca.keys_values(CrossMemory(inf.text_norm(sos)[:, None]))
        v32 = np.array(v.transpose(0, 2, 1, 3).reshape(R, C))  # channel j = mat_kv output C + j
        s64 = np.asarray(sos, np.float64)  # the same in float64: RMSNorm, v half of mat_kv, v_bias
        xn = s64 / np.sqrt((s64**2).mean(-1, keepdims=True) + inf.text_norm.eps) * np.asarray(inf.text_norm.weight, np.float64)
        w, b = np.asarray(ca.mat_kv.weight[C:], np.float64), np.asarray(ca.v_bias, np.float64)
        ties, other = bf16_rounding_ties(v32, xn @ w.T + b, np.abs(xn) @ np.abs(w).T + np.abs(b))

        def rows(out: np.ndarray) -> mx.array:  # the rest of CrossAttention.__call__ for one key
            return ca.proj(mx.array(out).reshape(R, 1, C))[:, 0]

        out = np.array(v.transpose(0, 2, 1, 3).reshape(R, C).astype(mx.bfloat16).astype(mx.float32))
        if not np.array_equal(np.array(rows(out)), np.array(inf.condition(sos))):
            return PoolRounding(np.array(sos), inf.condition(sos), True,  # the plain check decides
                                "text_proj_for_sos not reproduced from its pieces: ties not resolved")
        ref = self.b["gen.cond_BD"].astype(np.float64).reshape(R, C)
        flips = []
        sq_err = np.sum((np.array(rows(out)) - ref) ** 2, axis=1)  # per row, for the current roundings
        for r, j in sorted(zip(*np.nonzero(ties)), key=lambda rj: abs(v32[rj] - (out[rj] + other[rj]) / 2)):
            trial = out.copy()
            trial[r, j] = other[r, j]
            e = np.sum((np.array(rows(trial))[r] - ref[r]) ** 2)
            if e < sq_err[r]:
                out, sq_err[r], flips = trial, e, flips + [(int(r), int(j))]
        note = (f"{int(ties.sum())} of {ties.size} bf16 roundings of text_proj_for_sos's v are ties; "
                f"{len(flips)} rounded the other way, as the reference's rows show"
                + (f" (row, channel {flips})" if flips else "") + f", at most {MAX_POOL_FLIPS}")
        return PoolRounding(np.array(sos), rows(out), len(flips) <= MAX_POOL_FLIPS, note)


def stored_dtype(model_dir: str | Path) -> str:
    """``bfloat16`` when the checkpoint stores bfloat16 floats, else ``float32``."""
    from .loading import weight_files

    for f in weight_files(Path(model_dir)):
        for v in mx.load(str(f)).values():
            if v.dtype == mx.bfloat16:
                return "bfloat16"
    return "float32"


def verify(model_dir: str | Path, refs_path: str | Path, on_family=None,
           dtype: mx.Dtype = mx.float32) -> list[tuple[str, Check]]:
    """Load ``model_dir`` (computing in ``dtype``) and compare it with every reference in ``refs_path``.

    Tolerances: with the reference's measured rounding distance (bundles made by ``vargpt-mlx
    reference record``, ``tolerances.py``), as long as the port runs the same weights in float32
    (a checkpoint stored like the reference's weights); otherwise the legacy fixed bounds: bf16 when
    the checkpoint stores bfloat16 (its weights carry bf16 rounding) or computes in bf16, float32
    else.
    """
    bundle = Bundle(refs_path)
    model = load_model(model_dir, dtype=dtype)
    stored = stored_dtype(model_dir)
    tol = "bf16" if (stored == "bfloat16" or dtype == mx.bfloat16 or bundle.ref_dtype == "bfloat16") else "fp32"
    same_weights = (bundle.ref_weights or "float32") == stored
    use_stats = bool(bundle.stats) and dtype == mx.float32 and same_weights
    return Verifier(model, bundle, tol, use_stats).run(on_family)
