"""The one image loader: orientation, colour modes, resize policies, draft decoding, broken files.

Every input is generated here (tiny images), and every expectation is computed independently of
the loader: from the pixels we wrote, from geometry, or from Pillow's own reference functions.
"""

import io
import shutil
import struct
import subprocess
import sys
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from conftest import ROOT
from vggface_gender import images
from vggface_gender.errors import ImageError, PipelineError
from vggface_gender.images import ImagePolicy, find_images, is_image_file, load_image, open_rgb, resolve_policy

ORIENTATION = 0x0112


def noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def smooth(h, w):
    """A smooth picture (JPEG-friendly, so lossy round trips stay close)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1),
                     (xx + yy) * 255 // max(1, h + w - 2)], axis=-1).astype(np.uint8)


def save(array_or_image, path, **kwargs):
    img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    img.save(path, **kwargs)
    return path


def with_orientation(orientation):
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif


def write_png16_rgb(path, arr):
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one), written by hand."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


# --------------------------------------------------------------------------- orientation
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow_reference(tmp_path, orientation):
    path = save(noise(12, 20), tmp_path / "o.png", exif=with_orientation(orientation))
    with Image.open(path) as img:
        expected = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    got = load_image(path)
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)


def test_exif_orientation_6_rotates_clockwise(tmp_path):
    # Stored 20 wide x 10 high with a red block at the top-left; orientation 6 means "rotate
    # 90 degrees clockwise to view": upright it is 10 wide x 20 high, red block at the top-right.
    stored = np.zeros((10, 20, 3), np.uint8)
    stored[:3, :3] = (255, 0, 0)
    path = save(stored, tmp_path / "o6.png", exif=with_orientation(6))
    got = load_image(path)
    assert got.shape == (20, 10, 3)
    assert (got[:3, -3:] == (255, 0, 0)).all()
    assert got[:, :-3].max() == 0 and got[3:].max() == 0


def test_damaged_exif_is_ignored_not_fatal(tmp_path):
    path = save(smooth(16, 16), tmp_path / "d.jpg", exif=b"Exif\x00\x00garbage-not-tiff")
    assert load_image(path).shape == (16, 16, 3)


# --------------------------------------------------------------------------- colour modes
def test_grayscale_and_bilevel_become_rgb(tmp_path):
    gray = np.random.default_rng(1).integers(0, 256, (9, 7), dtype=np.uint8)
    got = load_image(save(gray, tmp_path / "g.png"))
    assert got.dtype == np.uint8 and got.shape == (9, 7, 3)
    assert all(np.array_equal(got[..., c], gray) for c in range(3))
    bilevel = Image.fromarray(gray > 127).convert("1")
    got = load_image(save(bilevel, tmp_path / "b.bmp"))
    assert set(np.unique(got)) <= {0, 255}
    assert np.array_equal(got[..., 0] == 255, gray > 127)


@pytest.mark.parametrize("fmt,mean_error", [("TIFF", 0), ("JPEG", 3)])
def test_cmyk_becomes_rgb(tmp_path, fmt, mean_error):
    rgb = smooth(24, 32)
    path = tmp_path / f"c.{fmt.lower()}"
    Image.fromarray(rgb).convert("CMYK").save(path, fmt)
    with Image.open(path) as img:
        assert img.mode == "CMYK"
    got = load_image(path)
    assert got.shape == rgb.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - rgb).mean() <= mean_error  # TIFF exact; JPEG is lossy


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_grayscale_scales_by_mode_not_by_content(tmp_path, fmt):
    bright = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # full 16-bit range
    dark = np.arange(256, dtype=np.uint16).reshape(16, 16)            # all below 256: nearly black
    for name, arr in (("bright", bright), ("dark", dark)):
        path = tmp_path / f"{name}.{fmt.lower()}"
        Image.fromarray(arr).save(path, fmt)
        with Image.open(path) as img:
            assert img.mode.startswith("I")
        got = load_image(path)
        expected = np.round(arr / 257.0).astype(np.uint8)
        assert got.dtype == np.uint8
        assert np.array_equal(got[..., 0], expected), name
        assert np.array_equal(got[..., 0], got[..., 2])
    assert load_image(tmp_path / f"dark.{fmt.lower()}").max() <= 1


def test_16bit_rgb_png(tmp_path):
    arr = np.random.default_rng(2).integers(0, 65536, (8, 10, 3), dtype=np.uint16)
    got = load_image(write_png16_rgb(tmp_path / "rgb16.png", arr))
    assert got.dtype == np.uint8 and got.shape == (8, 10, 3)
    assert np.abs(got.astype(int) - np.round(arr / 257.0)).max() <= 1


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparent_index_composites_on_black(tmp_path, fmt):
    index = np.zeros((6, 8), np.uint8)
    index[:, 4:] = 1
    img = Image.fromarray(index, "P")
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    path = tmp_path / f"p.{fmt.lower()}"
    img.save(path, fmt, transparency=0)
    got = load_image(path)
    assert (got[:, :4] == 0).all()            # index 0 (red) is transparent: black
    assert (got[:, 4:] == (0, 255, 0)).all()  # index 1 stays green


def test_palette_with_partial_alpha_and_rgba_and_la(tmp_path):
    index = np.array([[0, 1]], np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette([200, 100, 50, 10, 20, 30] + [0] * (254 * 3))
    img.save(tmp_path / "pa.png", transparency=bytes([128, 255]))  # per-entry alpha (tRNS)
    got = load_image(tmp_path / "pa.png").astype(int)
    assert np.abs(got[0, 0] - np.round(np.array([200, 100, 50]) * 128 / 255)).max() <= 1
    assert list(got[0, 1]) == [10, 20, 30]

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = (240, 120, 60)
    rgba[..., 3] = [[0, 64], [191, 255]]
    got = load_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png")).astype(int)
    expected = np.round(np.array([240, 120, 60]) * rgba[..., 3:4] / 255.0)
    assert np.abs(got - expected).max() <= 1

    la = Image.fromarray(np.stack([np.full((2, 2), 200, np.uint8), rgba[..., 3]], -1), "LA")
    got = load_image(save(la, tmp_path / "la.png")).astype(int)
    assert np.abs(got[..., 0] - np.round(200 * rgba[..., 3].astype(float) / 255.0)).max() <= 1


@pytest.mark.parametrize("ext", ["jpg", "png", "bmp", "gif", "webp", "tif"])
def test_every_supported_format_decodes(tmp_path, ext):
    got = load_image(save(smooth(10, 14), tmp_path / f"x.{ext}"))
    assert got.shape == (10, 14, 3) and got.dtype == np.uint8


# --------------------------------------------------------------------------- resize policies
def three_bands(h=100, w=200):
    """Red left quarter, green middle half, blue right quarter."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 4] = (255, 0, 0)
    arr[:, w // 4: 3 * w // 4] = (0, 255, 0)
    arr[:, 3 * w // 4:] = (0, 0, 255)
    return arr


def test_stretch_keeps_everything_in_target_shape(tmp_path):
    path = save(three_bands(), tmp_path / "b.png")
    got = load_image(path, ImagePolicy((20, 40), "stretch", "nearest"))
    assert got.shape == (20, 40, 3)
    assert np.array_equal(got, three_bands(20, 40))


def test_crop_keeps_the_centre(tmp_path):
    path = save(three_bands(100, 200), tmp_path / "b.png")
    got = load_image(path, ImagePolicy((50, 50), "crop", "nearest"))
    assert got.shape == (50, 50, 3)
    # the centre 100x100 of a 200-wide image is exactly the green half
    assert (got == (0, 255, 0)).all()
    # a smoothing filter may borrow from just outside the crop at the edges, nowhere else
    got = load_image(path, ImagePolicy((50, 50), "crop", "bilinear"))
    assert (got[:, 1:-1] == (0, 255, 0)).all()


def test_pad_keeps_aspect_with_black_bars(tmp_path):
    path = save(three_bands(100, 200), tmp_path / "b.png")
    got = load_image(path, ImagePolicy((40, 40), "pad", "nearest"))
    assert got.shape == (40, 40, 3)
    assert got[:10].max() == 0 and got[30:].max() == 0        # 20 rows of content, centred
    assert np.array_equal(got[10:30], three_bands(20, 40))


def test_interpolation_is_the_policys(tmp_path):
    checker = (np.indices((40, 40)).sum(0) % 2 * 255).astype(np.uint8)
    path = save(checker, tmp_path / "c.png")
    nearest = load_image(path, ImagePolicy((15, 15), "stretch", "nearest"))
    bilinear = load_image(path, ImagePolicy((15, 15), "stretch", "bilinear"))
    assert set(np.unique(nearest)) <= {0, 255}
    assert len(set(np.unique(bilinear)) - {0, 255}) > 0
    assert not np.array_equal(
        load_image(path, ImagePolicy((15, 15), "stretch", "bicubic")),
        load_image(path, ImagePolicy((15, 15), "stretch", "lanczos")))


def test_policy_validation():
    with pytest.raises(ValueError):
        ImagePolicy((224, 224), "squash")
    with pytest.raises(ValueError):
        ImagePolicy((224, 224), "stretch", "area")
    with pytest.raises(ValueError):
        ImagePolicy((0, 224))


def test_resolve_policy_precedence():
    def cfg(interpolation, resize="stretch"):
        return SimpleNamespace(images=SimpleNamespace(interpolation=interpolation, resize=resize))

    info = {"input_size": [224, 200, 3], "interpolation": "bicubic"}
    assert resolve_policy(cfg(None), info) == ImagePolicy((224, 200), "stretch", "bicubic")
    assert resolve_policy(cfg("nearest", "pad"), info) == ImagePolicy((224, 200), "pad", "nearest")
    assert resolve_policy(cfg(None), {"input_size": [10, 12]}).interpolation == "bilinear"
    assert resolve_policy(cfg(None), {"input_size": [10, 12], "interpolation": "Bicubic"}).interpolation == "bicubic"


# --------------------------------------------------------------------------- draft decoding
@pytest.mark.parametrize("mode", ["stretch", "crop", "pad"])
def test_large_jpeg_is_drafted_but_never_below_what_resize_needs(tmp_path, mode):
    path = save(smooth(1200, 1600), tmp_path / "big.jpg", quality=95)
    policy = ImagePolicy((100, 120), mode, "bilinear")
    drafted = open_rgb(path, policy)
    assert drafted.size[0] < 1600 and drafted.size[1] < 1200  # decoded at a reduced DCT scale
    # enough pixels left for the resize: stretch needs both sides; crop covers; pad fits
    w, h = drafted.size
    if mode == "stretch":
        assert w >= 120 and h >= 100
    elif mode == "crop":
        assert min(w / 120, h / 100) >= 1
    else:
        assert max(w / 120, h / 100) >= 1
    # and the result is close to the full-resolution decode resized the same way
    reference = np.asarray(images.resize(open_rgb(path), policy)).astype(int)
    got = load_image(path, policy).astype(int)
    assert got.shape == (100, 120, 3)
    assert np.abs(got - reference).mean() < 3


def test_draft_accounts_for_exif_rotation(tmp_path):
    # Stored 1600x1200 (landscape), shown 1200x1600 (portrait). A wide, short target needs the
    # stored *height* to cover the target width.
    path = save(smooth(1200, 1600), tmp_path / "r.jpg", quality=95, exif=with_orientation(6))
    policy = ImagePolicy((50, 200), "stretch", "bilinear")
    w, h = open_rgb(path, policy).size
    assert w >= 200 and h >= 50
    assert w < 1200  # still drafted
    assert load_image(path, policy).shape == (50, 200, 3)


def test_small_images_and_non_jpegs_are_not_drafted(tmp_path):
    path = save(smooth(60, 80), tmp_path / "s.jpg")
    assert open_rgb(path, ImagePolicy((224, 224))).size == (80, 60)
    png = save(smooth(1200, 1600), tmp_path / "big.png")
    assert open_rgb(png, ImagePolicy((100, 100))).size == (1600, 1200)


# --------------------------------------------------------------------------- broken files
def _jpeg_bytes():
    buf = io.BytesIO()
    Image.fromarray(noise(64, 64)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_bytes():
    buf = io.BytesIO()
    Image.fromarray(noise(64, 64)).save(buf, "PNG")
    return buf.getvalue()


def _ico_bytes():
    buf = io.BytesIO()
    Image.fromarray(noise(16, 16)).save(buf, "ICO")
    return buf.getvalue()


BROKEN = {
    "empty.jpg": (lambda: b"", "empty file"),
    "text.jpg": (lambda: b"this is not an image\n" * 3, "not an image"),
    "html.png": (lambda: b"<html><body>404</body></html>", "not an image"),
    "icon.jpg": (_ico_bytes, "not an image"),  # a real image, but not a format we read
    "half.jpg": (lambda: _jpeg_bytes()[: len(_jpeg_bytes()) // 2], "truncated"),
    "noeoi.jpg": (lambda: _jpeg_bytes()[:-2][: len(_jpeg_bytes()) - 300], "truncated"),
    "header.jpg": (lambda: _jpeg_bytes()[:40], "truncated"),
    "half.png": (lambda: _png_bytes()[: len(_png_bytes()) // 2], "truncated"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
@pytest.mark.parametrize("with_policy", [False, True])
def test_broken_files_raise_one_line_image_error(tmp_path, name, with_policy):
    make, expected_text = BROKEN[name]
    path = tmp_path / name
    path.write_bytes(make())
    policy = ImagePolicy((32, 32)) if with_policy else None
    with pytest.raises(ImageError) as info:
        load_image(path, policy)
    message = str(info.value)
    assert isinstance(info.value, PipelineError)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert expected_text in message


def test_truncated_jpeg_is_an_error_not_grey_padding(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # importing the package must not change it
    path = tmp_path / "cut.jpg"
    path.write_bytes(_jpeg_bytes()[:-200])
    with pytest.raises(ImageError, match="truncated"):
        images.verify_image(path)
    with pytest.raises(ImageError, match="truncated"):
        load_image(path, ImagePolicy((16, 16)))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)


def test_no_pillow_padding_flag_or_heavy_imports_after_import():
    code = ("import sys; import vggface_gender.images, vggface_gender.dataset; "
            "from PIL import ImageFile; "
            "print(ImageFile.LOAD_TRUNCATED_IMAGES, "
            "sorted(m for m in ('tensorflow', 'keras', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split(None, 1)
    assert out[0] == "False" and out[1].strip() == "[]"


# --------------------------------------------------------------------------- finding files
def test_find_images_recursive_any_case_skips_hidden(tmp_path):
    for rel in ["a.jpg", "B.JPG", "sub/c.Jpeg", "sub/deeper/d.png", "e.WEBP", "f.tiff", "g.TIF",
                "h.gif", "i.bmp", ".hidden.jpg", ".hid/j.jpg", "notes.txt", "k.jpg.txt", "sub/.x.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == sorted(["B.JPG", "a.jpg", "e.WEBP", "f.tiff", "g.TIF", "h.gif", "i.bmp",
                            "sub/c.Jpeg", "sub/deeper/d.png"], key=lambda s: tuple(s.split("/")))
    assert is_image_file("x/Y.JPEG") and not is_image_file(".y.jpg") and not is_image_file("y.txt")


def test_loader_never_writes_next_to_the_image(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    save(smooth(300, 300), folder / "a.jpg", exif=with_orientation(3))
    shutil.copy(folder / "a.jpg", tmp_path / "copy.jpg")
    before = sorted(p.name for p in folder.iterdir())
    load_image(folder / "a.jpg", ImagePolicy((50, 50), "crop"))
    assert sorted(p.name for p in folder.iterdir()) == before
    assert (folder / "a.jpg").read_bytes() == (tmp_path / "copy.jpg").read_bytes()
