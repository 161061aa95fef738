"""Fuzzing open_rgb: whatever bytes a user's folder holds, it returns a usable RGB image or a CdiffError."""

import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cdiff_cli.errors import CdiffError
from cdiff_cli.training.images import MIN_SIDE, open_rgb

FUZZ = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
EXTS = [".jpg", ".png", ".gif", ".webp", ".tif", ".bmp"]


def _encode(im, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _seeds() -> list[bytes]:
    """Small valid files of each format and tricky mode (kept small so every decode is quick)."""
    noise = Image.effect_noise((40, 36), 50)
    rgb = Image.merge("RGB", (noise, noise.rotate(90), noise.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    rgba = rgb.copy()
    rgba.putalpha(noise)
    exif = Image.Exif()
    exif[0x0112] = 6
    return [
        _encode(rgb, "PNG"),
        _encode(pal, "PNG", transparency=0),
        _encode(rgba, "PNG"),
        _encode(noise.point(lambda v: v * 256, "I").convert("I;16"), "PNG"),
        _encode(rgb, "JPEG", quality=80, exif=exif),
        _encode(rgb.convert("CMYK"), "JPEG"),
        _encode(pal, "GIF", transparency=0),
        _encode(rgb, "GIF", save_all=True, append_images=[pal]),
        _encode(rgba, "WEBP", lossless=True),
        _encode(rgb, "TIFF"),
        _encode(rgb, "BMP"),
    ]


SEEDS = _seeds()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def check(workdir, data: bytes, ext: str):
    path = workdir / f"fuzz{ext}"
    path.write_bytes(data)
    try:
        out = open_rgb(path)
    except CdiffError as e:
        msg = str(e)
        assert "\n" not in msg and path.name in msg, msg
        return
    assert isinstance(out, Image.Image) and out.mode == "RGB"
    assert min(out.size) >= MIN_SIDE
    out.load()


@FUZZ
@given(prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF", b"II*\x00", b"BM"]),
       body=st.binary(max_size=600), ext=st.sampled_from(EXTS))
def test_random_bytes(workdir, prefix, body, ext):
    check(workdir, prefix + body, ext)


@st.composite
def mutated(draw):
    seed = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        # Mostly hit the headers, where one flipped byte changes sizes, modes and chunk lengths.
        hi = len(seed) - 1 if draw(st.booleans()) else min(len(seed) - 1, 120)
        seed[draw(st.integers(0, hi))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        seed = seed[: draw(st.integers(0, len(seed)))]
    return bytes(seed)


@FUZZ
@given(data=mutated(), ext=st.sampled_from(EXTS))
def test_mutated_valid_images(workdir, data, ext):
    check(workdir, data, ext)


def test_seeds_load(workdir):
    # The unmutated seeds are usable photos (so mutations start from real files), except the animated GIF.
    for i, data in enumerate(SEEDS):
        path = workdir / f"seed{i}.img"
        path.write_bytes(data)
        if i == 7:
            with pytest.raises(CdiffError, match="animated"):
                open_rgb(path)
        else:
            assert open_rgb(path).size in ((40, 36), (36, 40))
