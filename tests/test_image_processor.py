"""Image preprocessing vs upstream ``VARGPTQwen2VLImageProcessor`` (refs ``und.*`` / ``pre.*``)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import CKPT, FIXTURES
from vargpt_mlx.image_processor import ImageError, ImageProcessor, load_image, smart_resize
from vargpt_mlx.tolerances import compare

PNGS = {"und": FIXTURES / "und_image_56x84.png", "pre": FIXTURES / "preproc_image_61x97.png"}


@pytest.fixture(scope="module")
def processor() -> ImageProcessor:
    return ImageProcessor.from_dir(CKPT)


# ---------------------------------------------------------------------------- smart_resize
@pytest.mark.parametrize(
    "hw, expected",
    [
        ((56, 84), (56, 84)),  # already multiples of 28
        ((61, 97), (56, 84)),  # the pre.* fixture
        ((42, 70), (56, 56)),  # 1.5 -> 2 and 2.5 -> 2: Python round is half to even
        ((28, 28), (56, 56)),  # below min_pixels: scaled up with ceil
        ((2000, 3000), (812, 1204)),  # above max_pixels: scaled down with floor
    ],
)
def test_smart_resize(hw, expected):
    assert smart_resize(*hw) == expected


@pytest.mark.parametrize("hw", [(27, 100), (100, 27), (28, 5601)])
def test_smart_resize_rejects(hw):
    with pytest.raises(ImageError):
        smart_resize(*hw)


# ---------------------------------------------------------------------------- parity with upstream
@pytest.mark.parametrize("prefix", ["und", "pre"])
@pytest.mark.parametrize("source", ["array", "file"])
def test_pixel_values_match_upstream(processor, refs, prefix, source):
    image = refs[f"{prefix}.image_u8"] if source == "array" else PNGS[prefix]
    pixel_values, grid = processor([image])
    assert pixel_values.dtype == np.float32 and grid.dtype == np.int64
    check = compare(f"{prefix}.pixel_values", pixel_values, refs[f"{prefix}.pixel_values"], tol="preprocess")
    assert check.ok, check
    assert compare(f"{prefix}.image_grid_thw", grid, refs[f"{prefix}.image_grid_thw"], tol="exact").ok


def test_num_image_tokens(processor, refs):
    assert processor.num_image_tokens(refs["und.image_grid_thw"]) == [6]
    assert processor.num_image_tokens([[1, 4, 6], [2, 8, 8]]) == [6, 32]


def test_several_images_are_concatenated(processor, refs):
    small = refs["und.image_u8"][:, :56]  # 56x56 -> grid (1, 4, 4)
    pixel_values, grid = processor([refs["und.image_u8"], small])
    assert grid.tolist() == [[1, 4, 6], [1, 4, 4]]
    assert pixel_values.shape == (24 + 16, 1176)
    np.testing.assert_array_equal(pixel_values[:24], refs["und.pixel_values"])
    np.testing.assert_array_equal(pixel_values[24:], processor([small])[0])


def test_from_dir(tmp_path):
    assert ImageProcessor.from_dir(tmp_path) == ImageProcessor()
    (tmp_path / "preprocessor_config.json").write_text('{"size": {"min_pixels": 100, "max_pixels": 5000}}')
    loaded = ImageProcessor.from_dir(tmp_path)
    assert (loaded.min_pixels, loaded.max_pixels) == (100, 5000)
    assert ImageProcessor.from_dir(CKPT) == ImageProcessor()  # fixture ships the class defaults


# ---------------------------------------------------------------------------- loading
@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "L", "I;16", "I", "F", "1"])
def test_load_image_converts_modes_to_rgb(refs, mode):
    rgb = Image.fromarray(refs["und.image_u8"])
    if mode in ("I;16", "I"):
        image = Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257).astype(np.uint16 if mode == "I;16" else np.int32))
    elif mode == "F":
        image = Image.fromarray(np.asarray(rgb.convert("L"), np.float32) / 255.0)
    else:
        image = rgb.convert(mode)
    out = load_image(image)
    assert out.mode == "RGB" and out.size == rgb.size
    if mode in ("I;16", "I", "F"):  # high bit depth is scaled, not clipped to white
        np.testing.assert_array_equal(np.asarray(out)[..., 0], np.asarray(rgb.convert("L")))
    pixel_values, grid = ImageProcessor()([image])
    assert pixel_values.shape == (24, 1176) and np.isfinite(pixel_values).all()


def test_load_image_applies_exif_orientation(tmp_path, refs):
    image = Image.fromarray(refs["und.image_u8"])
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    out = np.asarray(load_image(path))
    np.testing.assert_array_equal(out, np.rot90(refs["und.image_u8"], k=-1))
    _, grid = ImageProcessor()([path])
    assert grid.tolist() == [[1, 6, 4]]


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_load_image_errors(tmp_path):
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "missing.png")
    assert "not found" in _one_line_error(e)

    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(ImageError) as e:
        load_image(garbage)
    assert "garbage.png" in _one_line_error(e)

    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(PNGS["und"].read_bytes()[:400])
    with pytest.raises(ImageError) as e:
        ImageProcessor()([truncated])
    assert "truncated.png" in _one_line_error(e)


def test_bad_inputs_raise_image_error(processor):
    with pytest.raises(ImageError):
        processor([np.zeros((56, 84, 3), np.float32)])
    with pytest.raises(ImageError):
        processor([np.zeros((20, 84, 3), np.uint8)])  # smaller than 28 pixels
    with pytest.raises(ImageError):
        processor([42])
    with pytest.raises(ImageError):
        ImageProcessor(do_convert_rgb=False)([Image.new("L", (56, 56))])
