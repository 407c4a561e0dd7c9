"""Checkpoint loading: the explicit key map accepts upstream's layout exactly, errors name keys."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from tests.conftest import CKPT, CKPT_BF16, FIXTURES
from vargpt_mlx.config import VARGPTConfig
from vargpt_mlx.loading import CheckpointError, check_weights, load_model, load_raw_weights
from vargpt_mlx.models.vargpt import VARGPT, sanitize, sos_row

DTYPES = {"F32": mx.float32, "float32": mx.float32, "BF16": mx.bfloat16, "bfloat16": mx.bfloat16,
          "I64": mx.int64, "int64": mx.int64}
# the dead weights upstream stores and never uses (zero_k_bias buffers, text_proj_for_ca, ln_q)
DEAD = ("zero_k_bias", "text_proj_for_ca.", "image_gen_projector.ln_q.", "image_gen_projector_out.ln_q.",
        "quantizer.lfq.mask")


def keys_json():
    return json.loads((FIXTURES / "keys.json").read_text())


def real_config() -> VARGPTConfig:
    """The full-size configuration: upstream's real config.json values (ids shifted back)."""
    real = keys_json()["real"]["config"]
    cfg = json.loads((CKPT / "config.json").read_text())
    shift = 151643 - 1000

    def fix(d):
        for k, v in d.items():
            if k.endswith("token_id") and isinstance(v, int):
                d[k] = v + shift
        return d

    fix(cfg)
    fix(cfg["special_tokens"])
    cfg.update({k: real[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                      "num_attention_heads", "num_key_value_heads")})
    cfg["rope_scaling"]["mrope_section"] = real["mrope_section"]
    cfg["vision_config"] = {"depth": 32, "embed_dim": 1280, "hidden_size": real["hidden_size"], "num_heads": 16}
    return VARGPTConfig.from_dict(cfg, None)  # no sidecar: Infinity-2B / VAE-128 defaults


def test_full_size_key_map_accepts_exactly_the_real_checkpoint_layout():
    """Build the full-size model lazily (no weight data is ever materialised) and map all 1706
    upstream names and shapes onto it."""
    info = keys_json()["real"]
    cfg = real_config()
    assert cfg.tokens.image_gen_start_token_id == 151657
    model = VARGPT(cfg)
    fake = {e["name"]: mx.zeros(e["shape"], DTYPES[e["dtype"]]) for e in info["keys"]}  # lazy
    assert len(fake) == info["num_keys"] == 1706
    mapped, dropped = sanitize(fake)
    mapped = sos_row(mapped, cfg)  # the one sos_embedding row upstream reads
    check_weights(model, mapped)  # raises naming any missing / unexpected / mis-shaped key
    assert all(any(d in k for d in DEAD) for k in dropped), [k for k in dropped if not any(d in k for d in DEAD)]
    assert len(dropped) == sum(any(d in k for d in DEAD) for k in fake)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    n_dropped = sum(fake[k].size for k in dropped)
    sos_rows_left = fake["sos_embedding.weight"].size - mapped["sos_embedding.weight"].size
    assert mapped["sos_embedding.weight"].shape == (1, 2048) and sos_rows_left == 151657 * 2048
    assert n_params + n_dropped + sos_rows_left == info["num_elements"]


def test_tiny_checkpoint_loads_every_key(raw_weights, config):
    mapped, dropped = sanitize(dict(raw_weights))
    check_weights(VARGPT(config), sos_row(mapped, config))
    assert len(mapped) + len(dropped) == len(raw_weights) == keys_json()["tiny"]["num_keys"]


def test_sos_embedding_keeps_the_row_upstream_reads(tmp_path, raw_weights, config):
    """Upstream's table has image_gen_start_token_id + 1 rows and reads only image_gen_start's: the
    model keeps that row, from an upstream checkpoint and from a directory that still has the whole
    table; a save of the loaded model loads back; a table of any other row count is named."""
    table = raw_weights["sos_embedding.weight"]
    sid = config.tokens.image_gen_start_token_id
    assert table.shape[0] == sid + 1
    m = load_model(CKPT, dtype=mx.float32)
    assert m.sos_embedding.weight.shape == (1, table.shape[1])
    assert mx.array_equal(m.sos_embedding.weight[0], table[sid]).item()
    assert mx.array_equal(m.sos_rows()[0], table[sid]).item()
    d = tmp_path / "saved"
    shutil.copytree(CKPT, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "format": "mlx"}))  # this port's layout: no sanitize
    mapped, _ = sanitize(dict(raw_weights))
    mx.save_safetensors(str(d / "model.safetensors"), dict(tree_flatten(m.parameters())))
    m2 = load_model(d, dtype=mx.float32)
    assert mx.array_equal(m2.sos_embedding.weight, m.sos_embedding.weight).item()
    mx.save_safetensors(str(d / "model.safetensors"), mapped)  # an older directory: whole table kept
    assert mx.array_equal(load_model(d, dtype=mx.float32).sos_embedding.weight[0], table[sid]).item()
    mx.save_safetensors(str(d / "model.safetensors"), {**mapped, "sos_embedding.weight": table[:-1]})
    with pytest.raises(CheckpointError, match=r"sos_embedding\.weight has shape"):
        load_model(d)


def test_bf16_checkpoint_loads():
    m = load_model(CKPT_BF16, dtype=mx.float32)
    assert m.lm_head.weight.dtype == mx.float32
    raw = load_raw_weights(CKPT_BF16)
    assert raw["lm_head.weight"].dtype == mx.bfloat16


def _copy_ckpt(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(CKPT, d)
    return d


def _rewrite(d, fn):
    w = dict(mx.load(str(d / "model.safetensors")))
    fn(w)
    mx.save_safetensors(str(d / "model.safetensors"), w)


def test_missing_key_is_named(tmp_path):
    d = _copy_ckpt(tmp_path)
    _rewrite(d, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing key model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(d)


def test_unexpected_and_misshaped_keys_are_named(tmp_path):
    d = _copy_ckpt(tmp_path)
    _rewrite(d, lambda w: w.__setitem__("model.layers.0.extra.weight", mx.zeros((2,))))
    with pytest.raises(CheckpointError, match=r"unexpected key model\.layers\.0\.extra\.weight"):
        load_model(d)
    d2 = tmp_path / "ckpt2"
    shutil.copytree(CKPT, d2)
    _rewrite(d2, lambda w: w.__setitem__("lm_head.weight", mx.zeros((10, 64))))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight has shape \(10, 64\)"):
        load_model(d2)


def test_sharded_checkpoint_loads_like_single_file(tmp_path, raw_weights):
    d = tmp_path / "sharded"
    d.mkdir()
    for f in ("config.json", "tiny_arch.json", "preprocessor_config.json"):
        shutil.copy(CKPT / f, d / f)
    keys = sorted(raw_weights)
    half = len(keys) // 2
    wmap = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        mx.save_safetensors(str(d / name), {k: raw_weights[k] for k in part})
        wmap.update({k: name for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    a = dict(tree_flatten(load_model(d, dtype=mx.float32).parameters()))
    b = dict(tree_flatten(load_model(CKPT, dtype=mx.float32).parameters()))
    assert a.keys() == b.keys()
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_pickle_checkpoint_is_refused(tmp_path):
    d = tmp_path / "pt"
    d.mkdir()
    shutil.copy(CKPT / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(d)


def test_not_a_vargpt_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not a VARGPT"):
        load_model(tmp_path)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    d = _copy_ckpt(tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="cannot read model.safetensors"):
        load_model(d)
