"""Chat with a persistent KV cache (``vargpt_mlx.chat``) and the ``vargpt-mlx chat`` command.

The key property: turns run on the kept cache (only each new turn's tokens prefilled, M-RoPE
positions continued) compute the same hidden states as one fresh prefill of the whole
conversation's tokens. The fixture model's weights are random, so replies are gibberish; tests
check behaviour, never quality.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import mlx.core as mx

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import CKPT, FIXTURES
from vargpt_mlx.api import load
from vargpt_mlx.chat import ChatError, ChatSession, ImageEvent, chat
from vargpt_mlx.image_processor import ImageError
from vargpt_mlx.models.rope_index import get_rope_index
from vargpt_mlx.models.vargpt import embed_multimodal
from vargpt_mlx.pipelines.image_generation import GenerationSettings
from vargpt_mlx.tolerances import compare

chat_mod = importlib.import_module("vargpt_mlx.chat")  # the module (the package exports the function `chat`)

TINY_TOKENIZER = Path(__file__).parent / "fixtures" / "tiny_tokenizer"
IMG_A = FIXTURES / "und_image_56x84.png"
IMG_B = FIXTURES / "preproc_image_61x97.png"


@pytest.fixture(scope="module")
def pipe():
    return load(CKPT, tokenizer=TINY_TOKENIZER)


class Steer:
    """Logits processor for tests: bans some tokens; ``plan`` forces a token at a reply step."""

    def __init__(self, vocab: int, ban=()):
        self.vocab = vocab
        self.ban = mx.zeros((vocab,), dtype=mx.bool_)
        if ban:
            self.ban[mx.array(list(ban))] = True
        self.plan: dict[int, int] = {}
        self.step = 0

    def turn(self, plan: dict[int, int] | None = None) -> "Steer":
        self.plan, self.step = dict(plan or {}), 0
        return self

    def __call__(self, history, logits):
        step, self.step = self.step, self.step + 1
        if step in self.plan:
            return mx.where(mx.arange(self.vocab) == self.plan[step], 0.0, -mx.inf)[None].astype(logits.dtype)
        return mx.where(self.ban, -mx.inf, logits)


def steer_for(pipe) -> Steer:
    """Ban the tokens that would make the conversation's token list ill-formed for get_rope_index
    (a random model may emit them) and the image-generation start."""
    t = pipe.config.tokens
    return Steer(pipe.config.llm.vocab_size,
                 ban=(t.vision_start_token_id, t.image_token_id, t.video_token_id, t.image_gen_start_token_id))


def fresh_hidden(pipe, ids: list[int], images) -> mx.array:
    """Final-norm hidden states of one fresh prefill of ``ids`` (all images of the conversation)."""
    t = pipe.config.tokens
    pv = grids = None
    if images:
        pv_np, grids = pipe.processor(list(images))
        pv = mx.array(pv_np)
    pos, _ = get_rope_index(np.array([ids]), grids, None, image_token_id=t.image_token_id,
                            video_token_id=t.video_token_id, vision_start_token_id=t.vision_start_token_id,
                            spatial_merge_size=pipe.config.vision.spatial_merge_size)
    embeds = embed_multimodal(pipe.model, mx.array([ids]), pv, grids)
    return pipe.model.model(embeds, mx.array(pos))[0]


def assert_matches_fresh(pipe, session: ChatSession, images) -> None:
    assert session.cache[0].offset == len(session.token_ids) == session.hidden.shape[0]
    ref = fresh_hidden(pipe, session.token_ids, images)
    check = compare("hidden", session.hidden, ref)
    assert check.ok, check
    lm = pipe.model.lm_head
    check = compare("logits", lm(session.hidden[-1:]), lm(ref[-1:]))
    assert check.ok, check


def collapse_pads(text: str) -> str:
    return re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", text)


def rendered(pipe, session: ChatSession) -> str:
    """The conversation as the chat template renders it, the last reply as generated so far."""
    msgs = session.messages
    return pipe.tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False) + msgs[-1]["content"]


def run(session: ChatSession, text: str, images=()):
    pieces = list(session.send(text, images))
    return "".join(p for p in pieces if isinstance(p, str)), [p for p in pieces if isinstance(p, ImageEvent)]


# ----------------------------------------------------------------------------- the key property
def test_kept_cache_matches_fresh_prefill(pipe):
    steer = steer_for(pipe)
    eos = pipe.config.tokens.eos_token_id
    s = ChatSession(pipe, max_tokens=6, temp=0.7, seed=0, logits_processors=[steer])

    steer.turn()
    run(s, "Describe this picture.", [IMG_A])  # stops at max_tokens: the last token is pending
    assert s.last_turn.finish == "length" and len(s._pending) == 1
    assert_matches_fresh(pipe, s, [IMG_A])
    n1 = len(s.token_ids)

    steer.turn({3: eos})  # ends with <|im_end|> at step 3
    run(s, "Now compare these two:", [IMG_B, IMG_A])
    assert s.last_turn.finish == "eos" and s.last_turn.generated_tokens == 4 and s._pending == []
    # only the new turn was prefilled: the pending token, the template continuation, two images
    assert s.last_turn.prompt_tokens == len(s.token_ids) - n1 - 3  # 3 reply tokens fed, eos not
    assert_matches_fresh(pipe, s, [IMG_A, IMG_B, IMG_A])

    steer.turn()
    run(s, "Thanks!")
    assert_matches_fresh(pipe, s, [IMG_A, IMG_B, IMG_A])
    assert s.image_grids == [tuple(g) for g in pipe.processor([IMG_A, IMG_B, IMG_A])[1].tolist()]
    # the cache holds the conversation exactly as the chat template renders it
    text = pipe.tokenizer.decode(s.token_ids + s._pending)
    assert collapse_pads(text) == rendered(pipe, s)
    assert s.rope_deltas < 0  # images shift the positions


def test_interrupted_reply_stays_consistent(pipe):
    steer = steer_for(pipe)
    s = ChatSession(pipe, max_tokens=20, temp=0.9, seed=1, logits_processors=[steer])
    steer.turn()
    it = s.send("Tell me a long story.", [IMG_A])
    next(it)
    it.close()  # the consumer stops early
    assert s.last_turn.finish == "interrupted"
    assert s.cache[0].offset == len(s.token_ids)
    steer.turn()
    run(s, "Go on.")
    assert_matches_fresh(pipe, s, [IMG_A])
    assert collapse_pads(pipe.tokenizer.decode(s.token_ids + s._pending)) == rendered(pipe, s)


def test_system_prompt_and_reset(pipe):
    s = ChatSession(pipe, system="Answer in one word.", max_tokens=3)
    run(s, "Hi")
    text = pipe.tokenizer.decode(s.token_ids)
    assert text.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\nHi")
    s.reset()
    assert s.token_ids == [] and s.cache[0].offset == 0 and s.messages == [{"role": "system", "content": "Answer in one word."}]
    a, _ = run(s, "Hi")
    b, _ = run(ChatSession(pipe, system="Answer in one word.", max_tokens=3), "Hi")
    assert a == b  # greedy: a reset session answers as a new one


# ----------------------------------------------------------------------------- image generation branch
def test_image_generation_in_chat(pipe, tmp_path, monkeypatch):
    tok = pipe.config.tokens
    steer = steer_for(pipe)
    seen = {}
    real = chat_mod.draw_images

    def spy(model, cache, hidden, settings, **kw):
        seen.update(offset=cache[0].offset, hidden=mx.array(hidden), seed=settings.seed)
        return real(model, cache, hidden, settings, **kw)

    monkeypatch.setattr(chat_mod, "draw_images", spy)
    scales = []
    s = ChatSession(pipe, max_tokens=8, seed=7, out_dir=tmp_path, logits_processors=[steer],
                    image_settings=GenerationSettings(argmax=True),
                    on_image_scale=lambda k, n: scales.append((k, n)))
    steer.turn({1: tok.image_gen_start_token_id})  # one text token, then <|image_gen_start|>
    text, events = run(s, "Draw a cat.")
    assert s.last_turn.finish == "image" and s.last_turn.generated_tokens == 2
    (ev,) = events
    assert ev.error is None and ev.seed == 7 and ev.path.parent == tmp_path
    assert ev.image.shape == (256, 256, 3) and ev.image.dtype == np.uint8
    with Image.open(ev.path) as im:  # fixture pn 0.06M: 256x256
        assert im.size == (256, 256) and im.mode == "RGB"
        assert np.array_equal(np.asarray(im), ev.image)
    assert [p.name for p in tmp_path.iterdir()] == [ev.path.name]  # no temp files left
    assert scales == [(k, 7) for k in range(7)]
    # generation started from context + <|image_gen_start|>, cross-attention memory = all of it
    assert s.token_ids[-1] == tok.image_gen_start_token_id
    assert seen["offset"] == len(s.token_ids) == seen["hidden"].shape[0]
    check = compare("gen hidden", seen["hidden"], fresh_hidden(pipe, s.token_ids, []))
    assert check.ok, check
    # the scale tokens went to a copy of the cache; the next turn first feeds <|image_gen_end|>
    assert s.cache[0].offset == len(s.token_ids) and s._pending == [tok.image_gen_end_token_id]
    assert s.messages[-1]["content"].endswith("<|image_gen_start|><|image_gen_end|>")
    steer.turn()
    run(s, "Nice. Describe it.")
    assert s.last_turn.finish == "length"
    assert tok.image_gen_end_token_id in s.token_ids
    assert_matches_fresh(pipe, s, [])
    assert pipe.tokenizer.decode(s.token_ids + s._pending) == rendered(pipe, s)


def test_image_needs_short_context(pipe, tmp_path):
    """Upstream's 512-token limit of the unconditional memory: no image, the chat goes on."""
    tok = pipe.config.tokens
    steer = steer_for(pipe)
    s = ChatSession(pipe, max_tokens=4, out_dir=tmp_path, logits_processors=[steer])
    steer.turn({0: tok.image_gen_start_token_id})
    _, (ev,) = run(s, "word " * 600)
    assert ev.path is None and "at most 512" in ev.error
    assert list(tmp_path.iterdir()) == []
    steer.turn()
    run(s, "ok")
    assert s.cache[0].offset == len(s.token_ids)


# ----------------------------------------------------------------------------- sampling, API, errors
def test_seed_reproducible(pipe):
    def tokens(seed):
        s = ChatSession(pipe, max_tokens=12, temp=1.0, top_p=0.9, seed=seed)
        run(s, "Say something.")
        return s.token_ids[-11:] + s._pending

    assert tokens(3) == tokens(3)
    assert tokens(3) != tokens(4)


def test_chat_function(pipe, model_dir):
    a = chat(pipe, "Hello", max_tokens=5, temp=0.5, seed=2)
    b = chat(str(model_dir), "Hello", max_tokens=5, temp=0.5, seed=2)
    c = chat(CKPT, "Hello", tokenizer=TINY_TOKENIZER, max_tokens=5, temp=0.5, seed=2)
    assert isinstance(a, str) and a == b == c


def test_bad_inputs_leave_session_unchanged(pipe, tmp_path):
    s = ChatSession(pipe, max_tokens=3)
    run(s, "Hi")
    before = (list(s.token_ids), s.cache[0].offset, list(s._pending), len(s.messages))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ChatError, match="empty"):
        s.send("   ")
    with pytest.raises(ImageError, match="not found"):
        s.send("look", [tmp_path / "missing.png"])
    with pytest.raises(ImageError, match="cannot read"):
        s.send("look", [bad])
    assert (s.token_ids, s.cache[0].offset, s._pending, len(s.messages)) == before
    with pytest.raises(ChatError, match="max_tokens"):
        ChatSession(pipe, max_tokens=0)
    context = pipe.config.llm.max_position_embeddings
    ChatSession(pipe, max_tokens=context)
    with pytest.raises(ChatError, match=f"max_tokens must be in 1..{context}, the model's context"):
        ChatSession(pipe, max_tokens=context + 1)
    with pytest.raises(ChatError, match="top_p"):
        ChatSession(pipe, temp=1.0, top_p=0.0)


def test_generation_config_eos(pipe, tmp_path):
    """A reply also ends at generation_config.json's eos ids (HF generate's stop tokens)."""
    import dataclasses
    import json

    t = pipe.config.tokens
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [t.eos_token_id, t.pad_token_id]}))
    other = dataclasses.replace(pipe, path=tmp_path)
    assert chat_mod.eos_token_ids(other) == {t.eos_token_id, t.pad_token_id}
    assert chat_mod.eos_token_ids(pipe) == {t.eos_token_id}
    steer = Steer(pipe.config.llm.vocab_size)
    s = ChatSession(other, max_tokens=8, logits_processors=[steer.turn({2: t.pad_token_id})])
    run(s, "Hi")
    assert s.last_turn.finish == "eos" and s.last_turn.generated_tokens == 3
    assert t.pad_token_id not in s.token_ids[-2:] and s._pending == []
    run(s, "Again")
    assert_matches_fresh(pipe, s, [])


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli():
    import vargpt_mlx.cli.chat_cmd  # noqa: F401  (registers the command)
    from vargpt_mlx.cli.app import app

    runner = CliRunner()

    def invoke(*args, input=None, env=None):
        return runner.invoke(app, ["chat", *map(str, args)], input=input,
                             env={"VARGPT_MODEL": None, **(env or {})})

    return invoke


def assert_user_error(result, pattern: str):
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), result.stderr
    assert "Traceback" not in result.output


def test_cli_one_shot_streams(cli, model_dir, pipe):
    r = cli("--model", model_dir, "--max-tokens", 6, "--temp", 0.8, "--seed", 5, "Hello there")
    assert r.exit_code == 0, r.output
    expected = chat(pipe, "Hello there", max_tokens=6, temp=0.8, seed=5)
    assert r.stdout == expected + "\n"
    again = cli("--model", model_dir, "--max-tokens", 6, "--temp", 0.8, "--seed", 5, "Hello there")
    assert again.stdout == r.stdout
    other = cli("--model", model_dir, "--max-tokens", 6, "--temp", 0.8, "--seed", 6, "Hello there")
    assert other.exit_code == 0 and other.stdout != r.stdout


def test_cli_images_and_env_model(cli, model_dir, pipe):
    r = cli("--image", IMG_A, "--image", IMG_B, "--max-tokens", 5, "-v", "What differs?",
            env={"VARGPT_MODEL": str(model_dir)})
    assert r.exit_code == 0, r.output
    assert r.stdout == chat(pipe, "What differs?", [IMG_A, IMG_B], max_tokens=5) + "\n"
    assert "prompt:" in r.stderr and "tokens/s" in r.stderr


def test_cli_interactive(cli, model_dir, pipe):
    script = "Hello\n/image {a}\nWhat is this?\n/reset\nHello\n/bogus\n/image /nope.png\n/exit\nnever sent\n"
    r = cli("--model", model_dir, "--max-tokens", 4, input=script.format(a=IMG_A))
    assert r.exit_code == 0, r.output
    replies = r.stdout.split("\n")[:-1]
    assert len(replies) == 3
    assert replies[0] == replies[2]  # greedy; /reset starts over
    s = ChatSession(pipe, max_tokens=4)
    assert replies[:2] == [run(s, "Hello")[0], run(s, "What is this?", [IMG_A])[0]]
    assert "unknown command /bogus" in r.stderr and "not found" in r.stderr
    # end of input also quits
    r = cli("--model", model_dir, "--max-tokens", 2, input="Hi\n")
    assert r.exit_code == 0 and len(r.stdout.split("\n")) == 2


def test_cli_draws_image(cli, model_dir, tmp_path, monkeypatch):
    """Force <|image_gen_start|> at the first step of the first reply: PNG written, chat goes on."""
    real_init = ChatSession.__init__

    def init(self, pipeline, *a, **kw):
        steer = Steer(pipeline.config.llm.vocab_size).turn({0: pipeline.config.tokens.image_gen_start_token_id})
        real_init(self, pipeline, *a, logits_processors=[steer], **kw)

    monkeypatch.setattr(ChatSession, "__init__", init)
    out = tmp_path / "imgs"
    r = cli("--model", model_dir, "--out-dir", out, "--seed", 11, "--max-tokens", 3, input="Draw a cat\n")
    assert r.exit_code == 2 and "does not exist" in r.stderr  # --out-dir must exist (checked before loading)
    out.mkdir()
    old_umask = os.umask(0o022)
    try:
        r = cli("--model", model_dir, "--out-dir", out, "--seed", 11, "--max-tokens", 3,
                input="Draw a cat\nAnd now?\n")
    finally:
        os.umask(old_umask)
    assert r.exit_code == 0, r.output
    (png,) = out.iterdir()
    assert png.name.endswith("-seed11.png")
    assert png.stat().st_mode & 0o777 == 0o644  # the umask's mode, not mkstemp's 0600
    with Image.open(png) as im:
        assert im.size == (256, 256)
        # the metadata generate writes: prompt, seed and settings
        assert (im.text["prompt"], im.text["mode"], im.text["seed"]) == ("Draw a cat", "chat", "11")
        assert {"cfg", "tau", "top_k", "top_p", "pn", "aspect", "model", "software"} <= set(im.text)
    lines = r.stdout.split("\n")
    assert lines[0] == f"[image 256x256 saved to {png}]"  # the first reply: just the image
    assert len(lines) == 3 and lines[1] and lines[2] == ""  # then the second reply


@pytest.mark.parametrize("fam, images", [("txt", []), ("und", [IMG_A])])
def test_cli_greedy_reply_is_upstream_reference(cli, model_dir, refs, monkeypatch, fam, images):
    """The chat command decodes the fixture prompt (upstream's token ids, given in place of the
    template's, which the tiny tokenizer cannot spell) into upstream's greedy tokens."""
    sessions = []
    real_init, real_prepare = ChatSession.__init__, ChatSession._prepare

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        sessions.append(self)

    def prepare(self, text, imgs):
        user_msg, _, pixel_values, grids = real_prepare(self, text, imgs)
        return user_msg, refs[f"{fam}.input_ids"][0].tolist(), pixel_values, grids

    monkeypatch.setattr(ChatSession, "__init__", init)
    monkeypatch.setattr(ChatSession, "_prepare", prepare)
    prompt, ref = refs[f"{fam}.input_ids"], refs[f"{fam}.gen_sequences"]
    n_new = ref.shape[1] - prompt.shape[1]
    args = [x for img in images for x in ("--image", img)]
    r = cli("--model", model_dir, "--max-tokens", n_new, *args, "Describe.")
    assert r.exit_code == 0, r.output
    (session,) = sessions
    assert session.last_turn.tokens == ref[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("case", ["missing_image", "corrupt_image", "empty_prompt", "unknown_model",
                                  "no_model", "bad_adapter", "out_dir_is_file", "bad_top_p", "bad_temp",
                                  "bad_max_tokens"])
def test_cli_bad_inputs(cli, model_dir, tmp_path, case):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    args, pattern = {
        "missing_image": (["--model", model_dir, "--image", tmp_path / "nope.png", "hi"], "image file not found"),
        "corrupt_image": (["--model", model_dir, "--image", bad, "hi"], "cannot read image"),
        "empty_prompt": (["--model", model_dir, "  "], "empty prompt"),
        "unknown_model": (["--model", tmp_path / "no_such_model", "hi"], "does not exist"),
        "no_model": (["hi"], "no model given"),
        "bad_adapter": (["--model", model_dir, "--adapter-path", tmp_path / "nope", "hi"], "adapter path"),
        "out_dir_is_file": (["--model", model_dir, "--out-dir", bad, "hi"], "not a directory"),
        "bad_top_p": (["--model", model_dir, "--top-p", 0, "hi"], "--top-p"),
        "bad_temp": (["--model", model_dir, "--temp", -1, "hi"], "--temp"),
        "bad_max_tokens": (["--model", model_dir, "--max-tokens", 0, "hi"], "--max-tokens"),
    }[case]
    assert_user_error(cli(*args), pattern)


def test_cli_adapters(cli, model_dir, pipe, tmp_path):
    """--adapter-path applies LoRA adapters (written here with random non-zero B matrices)."""
    from vargpt_mlx.training import lora

    tuned = load(CKPT, tokenizer=TINY_TOKENIZER)
    cfg = lora.apply_lora(tuned.model, lora.LoraConfig(rank=4, num_layers=-1, targets=("llm",)))
    key = mx.random.key(0)
    for _, layer in lora.lora_layers(tuned.model):
        key, sub = mx.random.split(key)
        layer.lora_b = 0.5 * mx.random.normal(layer.lora_b.shape, key=sub)
    lora.save_adapters(tuned.model, tmp_path / "adapters", cfg)
    r = cli("--model", model_dir, "--adapter-path", tmp_path / "adapters", "--max-tokens", 6, "Hello")
    assert r.exit_code == 0, r.output
    assert r.stdout == chat(tuned, "Hello", max_tokens=6) + "\n"
    assert r.stdout != chat(pipe, "Hello", max_tokens=6) + "\n"
    assert_user_error(cli("--model", model_dir, "--adapter-path", tmp_path, "hi"), "adapter")
