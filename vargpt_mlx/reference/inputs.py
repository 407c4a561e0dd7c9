"""Inputs of a reference recording: images and token ids (numpy only).

Without ``--image`` / ``--prompt`` every input is synthetic and seeded (``--seed`` changes all of
them): smooth colour fields with shapes and noise for the images, and token ids in the fixtures'
pseudo chat template (role words 100-103, system text 110-115, free text drawn from [200, 1000))
around the checkpoint's own special-token ids, so that any checkpoint can be recorded, one without
tokenizer files included. With ``--prompt`` (and the checkpoint's tokenizer or ``--tokenizer``)
the prompts are the Qwen2-VL chat template around that text; ``--image`` replaces the
understanding image and, resized and centre-cropped, the VAE / training image.

This file is run as a top-level module inside the recorder process (no package imports).
"""

from __future__ import annotations

import numpy as np

ROLE = {"system": 100, "user": 101, "assistant": 102, "\n": 103}
SYSTEM_TEXT = [110, 111, 112, 113, 114, 115]
UND_SIZES = [(56, 84), (84, 56), (56, 56), (84, 112), (112, 84)]


def synthetic_rgb(h: int, w: int, rng: np.random.RandomState) -> np.ndarray:
    """A seeded RGB uint8 image: colour gradients, a few discs and bars, mild noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        a, b, ph = rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(0, 2 * np.pi)
        img[..., c] = 0.5 + 0.35 * np.sin(a * x / w * np.pi + b * y / h * np.pi + ph)
    for _ in range(rng.randint(2, 6)):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.08, 0.3) * min(h, w)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 1, 3)
    for _ in range(rng.randint(1, 4)):
        y0, x0 = rng.randint(0, h), rng.randint(0, w)
        img[y0:y0 + rng.randint(2, max(3, h // 4)), x0:x0 + rng.randint(2, max(3, w // 3))] = rng.uniform(0, 1, 3)
    img += rng.normal(0, 0.03, img.shape)
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def cover_crop(u8: np.ndarray, h: int, w: int) -> np.ndarray:
    """Resize (LANCZOS) to cover h x w, then centre-crop: how upstream's training data is prepared."""
    from PIL import Image

    im = Image.fromarray(u8)
    s = max(h / im.height, w / im.width)
    im = im.resize((max(w, round(im.width * s)), max(h, round(im.height * s))), Image.LANCZOS)
    top, left = (im.height - h) // 2, (im.width - w) // 2
    return np.asarray(im)[top:top + h, left:left + w].copy()


class TokenScheme:
    """Token ids of the prompts: the fixtures' pseudo template, or a real tokenizer."""

    def __init__(self, ids: dict[str, int], vocab: int, rng: np.random.RandomState, tokenizer=None):
        self.ids, self.vocab, self.rng, self.tok = ids, vocab, rng, tokenizer
        self.im_start = ids["bos_token_id"] + 1  # <|im_start|> follows <|endoftext|> in both id schemes

    def text(self, n: int, text: str | None = None) -> list[int]:
        if self.tok is not None and text is not None:
            return list(self.tok.encode(text, add_special_tokens=False))
        hi = min(1000, self.vocab)
        return [int(t) for t in self.rng.randint(200, hi, size=n)]

    def turn(self, role: str, body: list[int]) -> list[int]:
        if self.tok is not None:
            return [self.im_start, *self.tok.encode(role + "\n", add_special_tokens=False), *body,
                    self.ids["eos_token_id"], *self.tok.encode("\n", add_special_tokens=False)]
        return [self.im_start, ROLE[role], ROLE["\n"], *body, self.ids["eos_token_id"], ROLE["\n"]]

    def system(self) -> list[int]:
        if self.tok is not None:
            return self.turn("system", self.tok.encode("You are a helpful assistant.", add_special_tokens=False))
        return self.turn("system", SYSTEM_TEXT)

    def assistant_prefix(self) -> list[int]:
        if self.tok is not None:
            return [self.im_start, *self.tok.encode("assistant\n", add_special_tokens=False)]
        return [self.im_start, ROLE["assistant"], ROLE["\n"]]

    def image_block(self, n_tokens: int) -> list[int]:
        return [self.ids["vision_start_token_id"], *[self.ids["image_token_id"]] * n_tokens,
                self.ids["vision_end_token_id"]]


def make_inputs(*, seed: int, ids: dict[str, int], vocab: int, gen_hw: tuple[int, int],
                image: np.ndarray | None = None, prompt: str | None = None, tokenizer=None,
                processor=None) -> tuple[dict[str, np.ndarray], dict]:
    """Every input of a recording. ``processor(u8) -> (pixel_values, grid_thw)`` gives the image token
    count of the understanding prompt. Returns (arrays, description for refs.json)."""
    rng = np.random.RandomState(int(seed) % 2**32)
    if image is None:
        uh, uw = UND_SIZES[rng.randint(len(UND_SIZES))]
        und = synthetic_rgb(uh, uw, rng)
    else:
        und = image
    pre = synthetic_rgb(61, 97, rng)
    H, W = gen_hw
    enc = cover_crop(image, H, W) if image is not None else synthetic_rgb(H, W, rng)
    ts = TokenScheme(ids, vocab, rng, tokenizer)
    if prompt is not None and tokenizer is None:
        raise ValueError("--prompt needs tokenizer files (in the checkpoint or --tokenizer DIR)")
    _, grid = processor(und)
    n_img = int(np.prod(grid[0])) // 4
    user = ts.text(int(rng.randint(4, 9)), prompt)
    und_ids = [*ts.system(), *ts.turn("user", [*user, *ts.image_block(n_img)]), *ts.assistant_prefix()]
    txt_ids = [*ts.system(), *ts.turn("user", ts.text(int(rng.randint(8, 17)), prompt)), *ts.assistant_prefix()]
    gen_ids = [*ts.system(), *ts.turn("user", ts.text(int(rng.randint(8, 17)), prompt)), *ts.assistant_prefix()]
    # training samples (LLaMA-Factory style: labels -100 on the prompt)
    t2i_prompt = [*ts.system(), *ts.turn("user", ts.text(int(rng.randint(6, 13)), prompt)), *ts.assistant_prefix()]
    answer = ts.text(int(rng.randint(3, 7)), "Here is the picture." if tokenizer is not None else None)
    und_answer = ts.text(int(rng.randint(5, 10)), "It shows a few coloured shapes." if tokenizer is not None else None)
    arrays = {
        "und.image_u8": und, "pre.image_u8": pre, "vae.enc_image_u8": enc,
        "und.input_ids": np.array([und_ids], dtype=np.int64),
        "txt.input_ids": np.array([txt_ids], dtype=np.int64),
        "gen.prompt_ids": np.array([gen_ids], dtype=np.int64),
        "_t2i_prompt": np.array(t2i_prompt + answer, dtype=np.int64),
        "_t2i_prompt_len": np.array(len(t2i_prompt)),
        "sft_und.input_ids": np.array([und_ids + und_answer + [ids["eos_token_id"]]], dtype=np.int64),
        "sft_und.labels": np.array([[-100] * len(und_ids) + und_answer + [ids["eos_token_id"]]], dtype=np.int64),
    }
    desc = {"seed": int(seed), "image": "given" if image is not None else "synthetic (seeded)",
            "prompt": prompt if prompt is not None else "seeded token ids in the pseudo chat template",
            "pseudo_template_tokens": None if tokenizer is not None else
            {"role_words": ROLE, "system_text": SYSTEM_TEXT, "free_text": "seeded ids in [200, 1000)"}}
    return arrays, desc


def finish_t2i(arrays: dict, ids: dict[str, int], n_pad: int) -> None:
    """The text-to-image SFT sample once the schedule's padded length is known."""
    head = arrays.pop("_t2i_prompt").tolist()
    plen = int(arrays.pop("_t2i_prompt_len"))
    seq = head + [ids["image_gen_start_token_id"], *[ids["image_gen_pad_token_id"]] * n_pad,
                  ids["image_gen_end_token_id"], ids["eos_token_id"]]
    arrays["sft_t2i.input_ids"] = np.array([seq], dtype=np.int64)
    arrays["sft_t2i.labels"] = np.array([[-100] * plen + seq[plen:]], dtype=np.int64)
