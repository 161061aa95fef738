"""Loading users' photos: orientation, colour modes, bit depths and alpha handled; bad files refused clearly.

Every image is built here with Pillow (or a few hand-written bytes); there are no binary fixtures.
"""

import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cdiff_cli.errors import CdiffError, NotFoundError
from cdiff_cli.training.images import IMAGE_EXTS, MIN_SIDE, ImageItem, check_images, list_images, open_rgb, to_tensor

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def close(px, want, tol=12):
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(px, want))


def refused(path, *words):
    """open_rgb(path) raises CdiffError on one line naming the file and containing `words`; returns it."""
    with pytest.raises(CdiffError) as ei:
        open_rgb(path)
    msg = str(ei.value)
    assert "\n" not in msg and path.name in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


# ---- handled ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    # Stored sideways: 60 wide x 40 high, red block in the stored top-left corner.
    im = Image.new("RGB", (60, 40), BLUE)
    im.paste(RED, (0, 0, 12, 12))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "phone.jpg"
    im.save(path, quality=95, exif=exif)
    out = open_rgb(path)
    assert out.mode == "RGB" and out.size == (40, 60)  # upright portrait: size swapped
    # 6 = rotate 90 deg clockwise to view: stored top-left ends top-right. 8 = counter-clockwise: bottom-left.
    corner = (34, 5) if orientation == 6 else (5, 54)
    assert close(out.getpixel(corner), RED, 40)
    others = [(5, 5), (34, 5), (5, 54), (34, 54)]
    others.remove(corner)
    assert all(close(out.getpixel(p), BLUE, 40) for p in others)


@pytest.mark.parametrize("cmyk,rgb", [((0, 255, 255, 0), RED), ((255, 255, 0, 0), BLUE), ((0, 0, 0, 128), (127, 127, 127))])
def test_cmyk_jpeg_becomes_rgb(tmp_path, cmyk, rgb):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (40, 40), cmyk).save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    out = open_rgb(path)
    assert out.mode == "RGB" and close(out.getpixel((20, 20)), rgb)


def test_cmyk_with_unusable_icc_profile_falls_back(tmp_path):
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()  # an RGB profile on CMYK data
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(path, quality=95, icc_profile=srgb)
    assert Image.open(path).info.get("icc_profile")
    assert close(open_rgb(path).getpixel((20, 20)), RED)


def _tiff_rgb16(w, h, rgb16, big_endian=False) -> bytes:
    """A minimal uncompressed 16-bit-per-channel RGB TIFF (Pillow cannot write one)."""
    e = ">" if big_endian else "<"
    data = struct.pack(e + "HHH", *rgb16) * (w * h)
    n, ifd = 10, 8
    bps = ifd + 2 + n * 12 + 4
    start = bps + 6
    tags = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, bps), (259, 3, 1, 1), (262, 3, 1, 2),
            (273, 4, 1, start), (277, 3, 1, 3), (278, 3, 1, h), (279, 4, 1, len(data)), (284, 3, 1, 1)]
    out = (b"MM\x00\x2a" if big_endian else b"II\x2a\x00") + struct.pack(e + "IH", ifd, n)
    for tag, typ, count, value in tags:
        v = struct.pack(e + "HH", value, 0) if typ == 3 and count == 1 else struct.pack(e + "I", value)
        out += struct.pack(e + "HHI", tag, typ, count) + v
    return out + struct.pack(e + "I", 0) + struct.pack(e + "HHH", 16, 16, 16) + data


def _grey16(mode):
    # Left half mid-grey 32768, right quarter full white 65535, a column of black 0.
    a = np.full((40, 48), 32768, np.uint16)
    a[:, 36:] = 65535
    a[:, 0] = 0
    if mode == "I;16B":
        return Image.frombytes("I;16B", (48, 40), a.astype(">u2").tobytes())
    if mode == "I":
        return Image.fromarray(a.astype(np.int32))
    return Image.fromarray(a)  # I;16


@pytest.mark.parametrize("mode,ext", [("I;16", "png"), ("I;16", "tif"), ("I;16B", "tiff"), ("I", "tif")])
def test_16_bit_grey_is_scaled_not_clipped(tmp_path, mode, ext):
    path = tmp_path / f"scan.{ext}"
    _grey16(mode).save(path)
    assert Image.open(path).mode == mode
    out = open_rgb(path)
    assert out.mode == "RGB"
    assert out.getpixel((10, 20)) == (128, 128, 128)  # convert("RGB") would give 255
    assert out.getpixel((40, 20)) == WHITE and out.getpixel((0, 20)) == (0, 0, 0)


def test_float_tiff_in_unit_range_is_scaled(tmp_path):
    path = tmp_path / "hdr.tif"
    Image.fromarray(np.full((40, 40), 0.5, np.float32)).save(path)
    assert Image.open(path).mode == "F"
    assert open_rgb(path).getpixel((3, 3)) == (128, 128, 128)


@pytest.mark.parametrize("big_endian", [False, True])
def test_16_bit_rgb_tiff_and_png(tmp_path, big_endian):
    path = tmp_path / "scan.tiff"
    path.write_bytes(_tiff_rgb16(40, 40, (65535, 32768, 0), big_endian))
    assert open_rgb(path).getpixel((7, 7)) == (255, 128, 0)
    # 16-bit RGB PNG, hand-written: colour type 2, bit depth 16.
    raw = b"".join(b"\x00" + struct.pack(">HHH", 65535, 32768, 0) * 40 for _ in range(40))
    png = tmp_path / "scan16.png"
    png.write_bytes(_png_bytes(40, 40, 16, 2, zlib.compress(raw)))
    assert open_rgb(png).getpixel((7, 7)) == (255, 128, 0)


def _palette_image():
    # index 0: black, transparent; 1: red; 2: blue. Left half transparent, right half red, bottom-right blue.
    im = Image.new("P", (40, 40), 0)
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (253 * 3))
    im.paste(1, (20, 0, 40, 40))
    im.paste(2, (30, 30, 40, 40))
    return im


@pytest.mark.parametrize("ext", ["png", "gif"])
def test_palette_with_transparency_over_white(tmp_path, ext):
    path = tmp_path / f"sticker.{ext}"
    _palette_image().save(path, transparency=0)
    out = open_rgb(path)
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == WHITE  # black but transparent -> white
    assert out.getpixel((25, 5)) == RED and out.getpixel((35, 35)) == BLUE


def test_palette_without_transparency_keeps_colours(tmp_path):
    path = tmp_path / "plain.png"
    _palette_image().save(path)
    out = open_rgb(path)
    assert out.getpixel((5, 5)) == (0, 0, 0) and out.getpixel((25, 5)) == RED


def test_rgba_la_and_colour_key_over_white(tmp_path):
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # transparent black
    rgba.paste((0, 128, 255, 255), (20, 0, 40, 20))  # opaque
    rgba.paste((0, 0, 0, 128), (20, 20, 40, 40))  # half-transparent black
    rgba.save(tmp_path / "cut.png")
    rgba.save(tmp_path / "cut.webp", lossless=True)
    for name in ("cut.png", "cut.webp"):
        out = open_rgb(tmp_path / name)
        assert out.mode == "RGB"
        assert out.getpixel((5, 5)) == WHITE
        assert out.getpixel((30, 10)) == (0, 128, 255)
        assert close(out.getpixel((30, 30)), (127, 127, 127), 2)
    la = Image.new("LA", (40, 40), (0, 0))
    la.paste((60, 255), (20, 0, 40, 40))
    la.save(tmp_path / "la.png")
    out = open_rgb(tmp_path / "la.png")
    assert out.getpixel((5, 5)) == WHITE and out.getpixel((30, 5)) == (60, 60, 60)
    # RGB PNG whose pure green is marked transparent (tRNS colour key).
    key = Image.new("RGB", (40, 40), (0, 255, 0))
    key.paste(RED, (20, 0, 40, 40))
    key.save(tmp_path / "key.png", transparency=(0, 255, 0))
    out = open_rgb(tmp_path / "key.png")
    assert out.getpixel((5, 5)) == WHITE and out.getpixel((30, 5)) == RED


def test_very_wide_image_loads(tmp_path):
    path = tmp_path / "panorama.png"
    Image.new("RGB", (20000, 64), RED).save(path)
    out = open_rgb(path)
    assert out.size == (20000, 64)
    t = to_tensor(out, 32)
    assert t.shape == (3, 32, 32) and float(t[0].min()) == 1.0


def test_multi_frame_mpo_uses_the_main_photo(tmp_path):
    # Camera/phone MPO files are JPEGs with extra frames (preview, second eye, depth): not an animation.
    path = tmp_path / "camera.jpg"
    Image.new("RGB", (48, 40), RED).save(path, "MPO", save_all=True, append_images=[Image.new("RGB", (48, 40), BLUE)])
    assert Image.open(path).format == "MPO" and Image.open(path).n_frames == 2
    out = open_rgb(path)
    assert out.size == (48, 40) and close(out.getpixel((20, 20)), RED)


# ---- refused ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext,kw", [("gif", {}), ("webp", {"lossless": True}), ("png", {})])
def test_animated_images_are_refused(tmp_path, ext, kw):
    frames = [Image.new("RGB", (40, 40), c) for c in (RED, BLUE, WHITE)]
    path = tmp_path / f"anim.{ext}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, **kw)
    refused(path, "animated", "3 frames", "PNG or JPEG")


def test_multi_page_tiff_is_refused(tmp_path):
    path = tmp_path / "pages.tif"
    Image.new("RGB", (40, 40)).save(path, save_all=True, append_images=[Image.new("RGB", (40, 40))])
    refused(path, "2 pages", "PNG or JPEG")


def test_tiny_image_is_refused(tmp_path):
    path = tmp_path / "icon.png"
    Image.new("RGB", (8, 8)).save(path)
    refused(path, "8x8 px", str(MIN_SIDE))
    Image.new("RGB", (MIN_SIDE, 200)).save(tmp_path / "ok.png")
    assert open_rgb(tmp_path / "ok.png").size == (MIN_SIDE, 200)
    Image.new("RGB", (200, MIN_SIDE - 1)).save(tmp_path / "thin.png")
    refused(tmp_path / "thin.png", f"200x{MIN_SIDE - 1} px")


def _png_bytes(w, h, depth, colour_type, idat) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side,mpx", [(20000, "400 megapixels"), (10000, "100 megapixels")])
def test_decompression_bomb_is_refused_without_allocating(tmp_path, side, mpx):
    # A small valid PNG whose header claims side x side: Pillow checks the size at open, before decoding.
    # 20000^2 is past Pillow's hard limit (an error); 10000^2 only past its warning limit.
    buf = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(data))
    refused(path, mpx, "downscale")


def test_truncated_jpeg_is_refused(tmp_path):
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 60).convert("RGB").save(buf, "JPEG", quality=90)
    path = tmp_path / "half.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.open(path).close()  # the header is fine: only the full decode notices
    refused(path, "truncated")


def test_text_file_named_jpg_is_refused(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_text("this is not a photo\n")
    refused(path, "not an image")


def test_png_content_with_jpg_name_loads(tmp_path):
    path = tmp_path / "download.jpg"
    Image.new("RGB", (40, 40), RED).save(path, "PNG")
    assert open_rgb(path).getpixel((1, 1)) == RED


def test_missing_file_is_not_found(tmp_path):
    with pytest.raises(NotFoundError, match="gone.png"):
        open_rgb(tmp_path / "gone.png")


# ---- folders and check_images ----------------------------------------------------------------------


def _photos(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (48, 40), (40 * i, 100, 200)).save(folder / f"img{i + 1}.png")
    return folder


def test_check_images_refuses_exact_duplicates(tmp_path):
    folder = _photos(tmp_path / "cat")
    digests = check_images(list_images(folder))  # distinct photos pass
    # ... and each is hashed (once): the run id and the manifest reuse these
    assert digests == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}
    (folder / "img3.png").write_bytes((folder / "img1.png").read_bytes())
    with pytest.raises(CdiffError) as ei:
        check_images(list_images(folder))
    assert str(ei.value) == "img3.png is a copy of img1.png: remove one (duplicates weight training towards one photo)"
    # The same path listed twice is not a copy.
    check_images([ImageItem(folder / "img1.png"), ImageItem(folder / "img1.png"), ImageItem(folder / "img2.png")])


def test_check_images_reports_a_bad_file_before_training(tmp_path):
    folder = _photos(tmp_path / "cat")
    (folder / "img4.gif").write_bytes(b"GIF89a not really")
    items = list_images(folder)
    assert [p.path.name for p in items][-1] == "img4.gif"  # GIFs are listed (and checked), not ignored
    with pytest.raises(CdiffError, match="img4.gif"):
        check_images(items)


def test_image_exts_include_gif_and_tiff():
    assert {".gif", ".tif", ".tiff", ".jpg", ".jpeg", ".png", ".webp", ".bmp"} == IMAGE_EXTS


def test_folder_without_images_says_what_it_skipped(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "notes.txt").write_text("hi")
    with pytest.raises(CdiffError) as ei:
        list_images(folder)
    msg = str(ei.value)
    assert "skipped 1 other file: notes.txt" in msg and "\n" not in msg
    assert type(ei.value) is CdiffError
    (folder / ".DS_Store").write_bytes(b"\0\0")
    (folder / "._IMG_1.jpg").write_bytes(b"\0\5\26\7")  # macOS AppleDouble metadata, not a photo
    (folder / "IMG_2.HEIC").write_bytes(b"....ftypheic")
    (folder / "sub").mkdir()
    with pytest.raises(CdiffError) as ei:
        list_images(folder)
    msg = str(ei.value)
    assert "skipped 4 other files" in msg and "1 sub-folder" in msg and "HEIC" in msg


def test_apple_double_files_are_ignored(tmp_path):
    folder = _photos(tmp_path / "cat", n=1)
    (folder / "._img1.png").write_bytes(b"\0\5\26\7 resource fork")
    assert [p.path.name for p in list_images(folder)] == ["img1.png"]


def test_missing_folder_is_not_found(tmp_path):
    with pytest.raises(NotFoundError) as ei:
        list_images(tmp_path / "nope")
    assert ei.value.exit_code == 2 and "nope" in str(ei.value)


def test_caption_that_is_not_utf8_is_refused_by_name(tmp_path):
    folder = tmp_path / "reg"
    folder.mkdir()
    Image.new("RGB", (40, 40), BLUE).save(folder / "a.png")
    (folder / "a.txt").write_bytes("photo of a café".encode("latin-1"))
    with pytest.raises(CdiffError, match=r"cannot read the caption .*a\.txt.*UTF-8"):
        list_images(folder, with_captions=True)
