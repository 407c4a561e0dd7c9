"""Make the README's nano gallery: generated images (held-out and seen prompts), a chat
transcript about a picture drawn with PIL, and an edit before / after, all with ``--model nano``.

    python scripts/nano_gallery.py --out docs/nano

Writes PNGs and ``gallery.md`` (the Markdown block pasted into README.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from PIL import Image, ImageDraw

from vargpt_mlx import api
from vargpt_mlx.chat import ChatSession

PROMPTS = [  # the first three name held-out (colour, shape) pairs: never seen in training
    "a red star on a blue background",
    "a yellow circle on a purple background",
    "a black diamond on a white background",
    "a green square on an orange background",
    "a blue circle on a yellow background",
    "a purple triangle on a green background",
]


def pil_picture(path: Path) -> Path:
    """A picture drawn by another tool (PIL's own colours, no anti-aliasing)."""
    im = Image.new("RGB", (128, 128), (255, 255, 255))
    ImageDraw.Draw(im).polygon([(64, 24), (104, 100), (24, 100)], fill=(0, 0, 255))
    im.save(path)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/nano"))
    ap.add_argument("--model", default="nano")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    pipe = api.load(a.model)
    md = ["| prompt | image |", "|---|---|"]
    t0 = time.perf_counter()
    for i, p in enumerate(PROMPTS):
        img = api.generate_image(pipe, p, seed=i)[0]
        name = f"gen_{i}.png"
        api.save_image(img, a.out / name)
        md.append(f"| {p} | ![{p}]({a.out.as_posix()}/{name}) |")
    gen_s = (time.perf_counter() - t0) / len(PROMPTS)
    pic = pil_picture(a.out / "pil_triangle.png")
    md += ["", f"Chat about a picture drawn with PIL, ![pil]({pic.as_posix()}) (one question per session, as "
           "the model was trained on single-turn samples):", "", "```"]
    for q in ("What shape is in the image?", "What color is the triangle?", "What colour is the background?"):
        reply = "".join(t for t in ChatSession(pipe, max_tokens=24).send(q, images=[pic]) if isinstance(t, str))
        md += [f"> {q}", reply.strip()]
    md += ["```", ""]
    src = api.generate_image(pipe, "a green circle on a black background", seed=7)[0]
    api.save_image(src, a.out / "edit_before.png")
    for j, instr in enumerate(("Make the circle red.", "Turn the circle into a square.")):
        ed = api.edit_image(pipe, src, instr, seed=j)[0]
        api.save_image(ed, a.out / f"edit_after_{j}.png")
        md.append(f"Edit \"{instr}\": ![before]({a.out.as_posix()}/edit_before.png) -> "
                  f"![after]({a.out.as_posix()}/edit_after_{j}.png)")
    md.append(f"\n({gen_s:.2f} s per generated image on this machine.)")
    (a.out / "gallery.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
