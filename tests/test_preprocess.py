"""Image preprocessing: the evaluation path and the serving path give the same tensor, and
hostile or unusual images are decoded correctly or refused with a clear status."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from models.errors import InvalidInput
from models.manifest import ImagePreprocessing
from models.preprocess import DecodeLimits, ImagePreprocessor, decode_image
from tests.conftest import encode


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height but carries no pixel data (a 'bomb' header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_eval_path_equals_service_path(fashion_test) -> None:
    """Training evaluates on arrays; the service sees PNG bytes. Same pixels in, same tensor out."""
    x, _ = fashion_test
    pre = ImagePreprocessor(ImagePreprocessing(height=64, width=64))
    for i in range(0, 200, 7):
        eval_tensor, _ = pre(Image.fromarray(x[i]))
        served_tensor, _ = pre.from_bytes(encode(Image.fromarray(x[i]), "PNG"))
        np.testing.assert_array_equal(eval_tensor, served_tensor)
        assert eval_tensor.dtype == np.float32 and eval_tensor.shape == (3, 64, 64)


def test_normalisation_matches_the_manifest() -> None:
    spec = ImagePreprocessing(height=4, width=4, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    img = Image.new("RGB", (4, 4), (255, 0, 51))
    t, _ = ImagePreprocessor(spec)(img)
    np.testing.assert_allclose(t[:, 0, 0], [(1 - 0.5) / 0.5, (0 - 0.25) / 0.25, 0.2], rtol=1e-6)


def test_normalisation_gives_the_values_models_were_trained_and_exported_with() -> None:
    """Every uint8 value in every channel: the tensor is, bit for bit, (float32(x) * scale) + bias,
    the formula the artifacts in the registry were trained and parity-checked with."""
    spec = ImagePreprocessing(height=16, width=48)
    pre = ImagePreprocessor(spec)
    pixels = np.arange(16 * 48 * 3, dtype=np.uint32).reshape(16, 48, 3).astype(np.uint8)
    std = np.asarray(spec.std, dtype=np.float32)
    scale = (1.0 / (255.0 * std)).reshape(3, 1, 1)
    bias = (-np.asarray(spec.mean, dtype=np.float32) / std).reshape(3, 1, 1)
    expected = pixels.astype(np.float32).transpose(2, 0, 1) * scale + bias
    got = pre.to_tensor(Image.fromarray(pixels))
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_allowed_formats_decode(fmt: str) -> None:
    img = Image.new("RGB", (40, 30), (200, 20, 20))
    out = decode_image(encode(img, fmt))
    assert out.mode == "RGB" and out.size == (40, 30)


def test_unsupported_format_is_415() -> None:
    img = Image.new("RGB", (8, 8))
    with pytest.raises(InvalidInput) as e:
        decode_image(encode(img, "TIFF"))
    assert e.value.status_code == 415 and "allowed" in str(e.value)
    with pytest.raises(InvalidInput):
        decode_image(b"hello, I am not an image")


def test_empty_and_truncated_images_are_400() -> None:
    with pytest.raises(InvalidInput, match="empty"):
        decode_image(b"")
    jpeg = encode(Image.new("RGB", (200, 200), (10, 200, 10)), "JPEG")
    with pytest.raises(InvalidInput) as e:
        decode_image(jpeg[: len(jpeg) // 3])
    assert e.value.status_code == 400


def test_decompression_bomb_refused_before_decoding() -> None:
    # 8000 x 6000 = 48 MP declared, over the 40 MP default, with no pixel data at all.
    with pytest.raises(InvalidInput, match="8000x6000 pixels") as e:
        decode_image(png_header_only(8000, 6000))
    assert e.value.status_code == 413
    with pytest.raises(InvalidInput) as e:
        decode_image(png_header_only(100_000, 100_000))
    assert e.value.status_code == 413
    with pytest.raises(InvalidInput, match="limit is 0.001 megapixels"):
        decode_image(encode(Image.new("RGB", (100, 100))), DecodeLimits(max_pixels=1000))


def test_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buf.getvalue())
    r, _, b = out.getpixel((8, 8))
    assert r > 200 and b < 50


def test_transparency_becomes_white() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert decode_image(encode(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (8, 8), (0, 255))
    assert decode_image(encode(la, "PNG")).getpixel((0, 0)) == (0, 0, 0)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([10, 20, 30] * 256)
    pal.info["transparency"] = 0
    assert decode_image(encode(pal, "PNG", transparency=0)).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grey_is_rescaled_not_clipped() -> None:
    arr = np.full((4, 4), 65535, dtype=np.uint16)
    arr[0, 0] = 32896  # ~ half scale
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = decode_image(encode(img, "PNG"))
    assert out.getpixel((1, 1)) == (255, 255, 255)
    assert out.getpixel((0, 0))[0] == 128


def test_cmyk_jpeg_converts() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    r, g, b = decode_image(encode(cmyk, "JPEG", quality=95)).getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (60, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 60)
    assert out.getpixel((10, 2))[0] > 200  # the strip is now at the top


def test_jpeg_draft_decodes_large_images_at_reduced_size() -> None:
    big = Image.new("RGB", (1600, 1200), (120, 60, 30))
    out = decode_image(encode(big, "JPEG"), draft_size=(64, 64))
    assert out.size[0] < 1600 and out.size[0] >= 64 and out.size[1] >= 64


def test_letterbox_geometry_inverts_exactly() -> None:
    spec = ImagePreprocessing(height=320, width=320, resize="letterbox")
    pre = ImagePreprocessor(spec)
    img = Image.new("RGB", (640, 360))
    _, geo = pre(img)
    assert geo.pad_x == 0 and geo.pad_y == 70  # 640x360 -> 320x180 centred vertically
    model_box = np.array([[32.0, 70 + 18.0, 64.0, 70 + 36.0]])
    np.testing.assert_allclose(geo.to_original(model_box), [[64, 36, 128, 72]], atol=1e-4)
    # Boxes reaching into the padding are clipped to the original image.
    np.testing.assert_allclose(geo.to_original(np.array([[-10.0, 10.0, 330.0, 300.0]])), [[0, 0, 640, 360]])
