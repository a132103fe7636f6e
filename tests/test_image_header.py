"""image_header.header_size against PIL (the oracle): the same (width, height) wherever it decides, and no decision
wherever PIL would fail or warn, on generated PNG/JPEG files, hand-built PNG chunks, and truncated or mutated
headers."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path
from unittest import mock

import pytest
from llamafactory_vision import image_header
from llamafactory_vision.convert_records import Record, RecordError, open_image
from llamafactory_vision.image_header import header_size, image_size, verified_size
from PIL import Image


def _pil_size(path: Path) -> tuple[int, int] | None:
    """What ``Image.open(path).size`` gives, None where PIL raises or warns (its warnings raised as errors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            with Image.open(path) as image:
                return image.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Warning):  # what PIL's open raises
            return None


def _chunk(cid: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + cid + data + struct.pack(">I", zlib.crc32(cid + data))


def _png(size: tuple[int, int], depth: int = 8, colour: int = 2, interlace: int = 0, extra: tuple = ()) -> bytes:
    """A PNG built chunk by chunk: IHDR, ``extra`` chunks, one IDAT (not a valid stream: PIL's open never reads
    it), IEND."""
    ihdr = struct.pack(">IIBBBBB", size[0], size[1], depth, colour, 0, 0, interlace)
    chunks = [_chunk(b"IHDR", ihdr), *extra, _chunk(b"IDAT", zlib.compress(b"\0" * 16)), _chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


ICC = b"a fake ICC profile, PIL stores it without reading it " * 100  # > 4 KiB: read past the first read
SIZES = [(1, 1), (17, 3), (3, 17), (641, 479), (1000, 1), (2049, 5)]


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _png_info() -> object:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("comment", "text chunk")
    return info


# name -> (mode, save keyword arguments, decided by the fast reader)
SAVED = {
    "png-1": ("1", {"format": "PNG"}, True),
    "png-L": ("L", {"format": "PNG"}, True),
    "png-LA": ("LA", {"format": "PNG"}, True),
    "png-RGB": ("RGB", {"format": "PNG"}, True),
    "png-RGBA": ("RGBA", {"format": "PNG"}, True),
    "png-P": ("P", {"format": "PNG"}, True),
    "png-P-transparency": ("P", {"format": "PNG", "transparency": 3}, True),
    "png-L-transparency": ("L", {"format": "PNG", "transparency": 7}, True),
    "png-RGB-transparency": ("RGB", {"format": "PNG", "transparency": (1, 2, 3)}, True),
    "png-I;16": ("I;16", {"format": "PNG"}, True),
    "png-dpi": ("RGB", {"format": "PNG", "dpi": (300, 300)}, True),
    "png-text": ("RGB", {"format": "PNG", "pnginfo": _png_info()}, False),
    "png-icc": ("RGB", {"format": "PNG", "icc_profile": ICC}, False),
    "jpeg-baseline": ("RGB", {"format": "JPEG", "quality": 90}, True),
    "jpeg-progressive": ("RGB", {"format": "JPEG", "progressive": True}, True),
    "jpeg-optimize-444": ("RGB", {"format": "JPEG", "optimize": True, "subsampling": 0}, True),
    "jpeg-grey": ("L", {"format": "JPEG"}, True),
    "jpeg-cmyk": ("CMYK", {"format": "JPEG"}, True),
    "jpeg-dpi": ("RGB", {"format": "JPEG", "dpi": (72, 72)}, True),
    "jpeg-icc": ("RGB", {"format": "JPEG", "icc_profile": ICC}, True),
    "jpeg-long-comment": ("RGB", {"format": "JPEG", "comment": b"c" * 30000}, True),
    "jpeg-exif-orientation-6": ("RGB", {"format": "JPEG", "exif": _exif(6)}, False),  # PIL reads EXIF for DPI
    "jpeg-exif-orientation-8-dpi": ("RGB", {"format": "JPEG", "exif": _exif(8), "dpi": (96, 96)}, True),
    "tiff": ("RGB", {"format": "TIFF"}, False),
    "bmp": ("RGB", {"format": "BMP"}, False),
    "gif": ("P", {"format": "GIF"}, False),
    "webp": ("RGB", {"format": "WEBP"}, False),
}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", sorted(SAVED))
def test_saved_images_give_pils_size(tmp_path: Path, name: str, size: tuple[int, int]) -> None:
    mode, kwargs, decided = SAVED[name]
    path = tmp_path / f"{name}.img"
    Image.new(mode, size).save(path, **kwargs)
    assert _pil_size(path) == size
    assert header_size(path) == (size if decided else None)
    assert verified_size(path) == header_size(path)  # whole files: PIL's verify() passes on each


def test_animated_and_multi_picture_files_are_left_to_pil(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (64, 48), colour) for colour in ("red", "blue")]
    for name in ("a.png", "a.mpo"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], format=name[2:].upper())
        assert _pil_size(tmp_path / name) == (64, 48)
        assert header_size(tmp_path / name) is None


HAND_MADE = {
    "16-bit RGB": (_png((33, 7), depth=16, colour=2), (33, 7)),
    "16-bit RGBA": (_png((33, 7), depth=16, colour=6), (33, 7)),
    "2-bit grey": (_png((33, 7), depth=2, colour=0), (33, 7)),
    "4-bit palette": (_png((9, 9), depth=4, colour=3, extra=(_chunk(b"PLTE", b"\0" * 48),)), (9, 9)),
    "interlaced": (_png((640, 480), interlace=1), (640, 480)),
    "colour chunks": (
        _png((5, 6), extra=(_chunk(b"sRGB", b"\0"), _chunk(b"gAMA", b"\0\0\xb1\x8f"), _chunk(b"cHRM", b"\0" * 32))),
        (5, 6),
    ),
    "pixel size": (_png((5, 6), extra=(_chunk(b"pHYs", b"\0\0\x0b\x13" * 2 + b"\1"),)), (5, 6)),
}
LEFT_TO_PIL = {
    "short grey tRNS": _png((5, 6), colour=0, extra=(_chunk(b"tRNS", b"\0"),)),
    "short RGB tRNS": _png((5, 6), extra=(_chunk(b"tRNS", b"\0\0\0\0"),)),
    "cHRM not whole 32-bit values": _png((5, 6), extra=(_chunk(b"cHRM", b"\0" * 31),)),
    "short sRGB": _png((5, 6), extra=(_chunk(b"sRGB", b""),)),
    "short pHYs": _png((5, 6), extra=(_chunk(b"pHYs", b"\0" * 8),)),
    "8-bit grey + alpha depth 4": _png((5, 6), depth=4, colour=4),
    "unknown colour type": _png((5, 6), colour=5),
    "zero width": _png((0, 6)),
    "private chunk": _png((5, 6), extra=(_chunk(b"prIv", b"data"),)),
    "bad IHDR checksum": _png((5, 6))[:29] + b"\0\0\0\0" + _png((5, 6))[33:],
    "IHDR of 12 bytes": b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", _png((5, 6))[16:28]) + _png((5, 6))[33:],
    "IDAT before IHDR": b"\x89PNG\r\n\x1a\n" + _chunk(b"IDAT", b"") + _png((5, 6))[8:],
}


@pytest.mark.parametrize("name", sorted(HAND_MADE))
def test_hand_made_pngs_give_pils_size(tmp_path: Path, name: str) -> None:
    data, size = HAND_MADE[name]
    (tmp_path / "x.png").write_bytes(data)
    assert _pil_size(tmp_path / "x.png") == size
    assert header_size(tmp_path / "x.png") == size


@pytest.mark.parametrize("name", sorted(LEFT_TO_PIL))
def test_pngs_pil_checks_further_are_left_to_it(tmp_path: Path, name: str) -> None:
    (tmp_path / "x.png").write_bytes(LEFT_TO_PIL[name])
    assert header_size(tmp_path / "x.png") is None


def test_sizes_over_pils_decompression_bomb_limit_are_left_to_it(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(_png((20_000, 20_000)))  # 400 M pixels: PIL refuses (over twice its limit)
    assert _pil_size(path) is None and header_size(path) is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the user lifted the limit
    assert _pil_size(path) == header_size(path) == (20_000, 20_000)


def _jpeg_bytes(**kwargs) -> bytes:
    import io

    out = io.BytesIO()
    Image.new(kwargs.pop("mode", "RGB"), (37, 23)).save(out, format="JPEG", **kwargs)
    return out.getvalue()


FUZZED = {
    "jpeg": _jpeg_bytes(dpi=(72, 72), icc_profile=b"p" * 100),
    "jpeg-progressive": _jpeg_bytes(progressive=True, mode="L"),
    "png-P": _png((37, 23), depth=8, colour=3, extra=(_chunk(b"PLTE", b"\1" * 9), _chunk(b"tRNS", b"\0\xff"))),
}


def _header_positions(data: bytes) -> list[int]:
    """Byte positions a header reader depends on: every PNG byte up to the first IDAT; for a JPEG each marker,
    length and payload byte up to the start of scan, except the contents of quantization and Huffman tables (their
    table ids are kept) and of application segments (their first 16 bytes are kept)."""
    if data.startswith(b"\x89PNG"):
        return list(range(data.index(b"IDAT") + 4))
    positions, pos = [0, 1], 2
    while True:
        code, length = data[pos + 1], struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        start, end = pos + 4, pos + 2 + length
        positions += range(pos, start)
        if code == 0xDB:
            at = start
            while at < end:
                positions.append(at)
                at += 65 if data[at] < 16 else 129
        elif code == 0xC4:
            positions.append(start)
        elif 0xE0 <= code <= 0xEF:  # application segments: their signatures
            positions += range(start, min(end, start + 16))
        else:
            positions += range(start, end)
        if code == 0xDA:
            return positions
        pos = end


@pytest.mark.parametrize("name", sorted(FUZZED))
def test_truncated_and_mutated_headers_never_disagree_with_pil(tmp_path: Path, name: str) -> None:
    """The header cut before and after each byte it depends on, and each such byte set to 0x00, 0xFF, +1 and -1:
    wherever the fast reader decides, PIL opens the file with the same size and no warning. The unchanged files
    must be decided."""
    data = FUZZED[name]
    positions = _header_positions(data)
    variants = [data[:n] for n in sorted({*positions, *(i + 1 for i in positions)})]
    for i in positions:
        for value in {0x00, 0xFF, (data[i] + 1) % 256, (data[i] - 1) % 256} - {data[i]}:
            variants.append(data[:i] + bytes([value]) + data[i + 1 :])
    path, decided = tmp_path / "x.img", 0
    for k, variant in enumerate(variants):
        path.write_bytes(variant)
        size = header_size(path)
        if size is not None:
            decided += 1
            assert _pil_size(path) == size, (k, size)
    path.write_bytes(data)
    assert header_size(path) == (37, 23)
    assert decided > 1, decided  # besides the whole file (PNG chunks carry CRCs: few of its mutations are valid)


def _segment(code: int, payload: bytes) -> bytes:
    return bytes([0xFF, code]) + struct.pack(">H", len(payload) + 2) + payload


def _after_soi(*segments: bytes, **kwargs) -> bytes:
    data = _jpeg_bytes(**kwargs)
    return data[:2] + b"".join(segments) + data[2:]


def _sof_with_extra_byte() -> bytes:
    data = _jpeg_bytes()
    at = data.index(b"\xff\xc0")
    length = struct.unpack(">H", data[at + 2 : at + 4])[0]
    return (
        data[: at + 2]
        + struct.pack(">H", length + 1)
        + data[at + 4 : at + 2 + length]
        + b"\1"
        + data[at + 2 + length :]
    )


JPEG_DECIDED = {
    "fill bytes before markers": _jpeg_bytes().replace(b"\xff\xc4", b"\xff\xff\xff\xc4"),
    "restart interval": _after_soi(_segment(0xDD, b"\0\4")),
    "Adobe segment": _after_soi(_segment(0xEE, b"Adobe\0\x64\0\0\0\0\1")),
    "XMP segment": _after_soi(_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0<x/>")),
}
JPEG_PIL_REFUSES = {
    "short JFIF": _after_soi(_segment(0xE0, b"JFIF\0")),
    "short ICC fragment": _after_soi(_segment(0xE2, b"ICC_PROFILE\0\1")),
    "partial SOF component": _sof_with_extra_byte(),
    "SOF of 5 bytes": _jpeg_bytes().replace(
        b"\xff\xc0\x00\x11", b"\xff\xc0\x00\x07\x08\x00\x17\x00\x25\xff\xc0\x00\x11"
    ),
    "12-bit samples": _jpeg_bytes().replace(b"\xff\xc0\x00\x11\x08", b"\xff\xc0\x00\x11\x0c"),
    "short Adobe": _after_soi(_segment(0xEE, b"Adobe")),
}
JPEG_LEFT_TO_PIL = {  # opened by PIL, or warned about, or refused
    "junk between segments": _jpeg_bytes().replace(b"\xff\xc4", b"\0\xff\xc4", 1),
    "MPF segment": _after_soi(_segment(0xE2, b"MPF\0" + b"\0" * 8)),
    "Photoshop segment": _after_soi(_segment(0xED, b"Photoshop 3.0\0" + b"8BIM")),
    "EXIF without JFIF DPI": _jpeg_bytes(exif=_exif(3)),
}


@pytest.mark.parametrize("name", sorted(JPEG_DECIDED))
def test_hand_made_jpegs_give_pils_size(tmp_path: Path, name: str) -> None:
    (tmp_path / "x.jpg").write_bytes(JPEG_DECIDED[name])
    assert _pil_size(tmp_path / "x.jpg") == header_size(tmp_path / "x.jpg") == (37, 23)


@pytest.mark.parametrize("name", sorted(JPEG_PIL_REFUSES) + sorted(JPEG_LEFT_TO_PIL))
def test_jpegs_pil_checks_further_are_left_to_it(tmp_path: Path, name: str) -> None:
    (tmp_path / "x.jpg").write_bytes({**JPEG_PIL_REFUSES, **JPEG_LEFT_TO_PIL}[name])
    assert header_size(tmp_path / "x.jpg") is None
    if name in JPEG_PIL_REFUSES:
        assert _pil_size(tmp_path / "x.jpg") is None


# The errors of open_image: the same messages as opening every file with PIL alone.
BAD_FILES = {
    "zero-byte.jpg": b"",
    "truncated-header.png": _png((5, 6))[:20],
    "no-sof.jpg": b"\xff\xd8\xff\xdb" + _jpeg_bytes()[4:].split(b"\xff\xc0")[0] + b"\xff\xda\x00\x02",
    "not-an-image.jpg": b"hello, I am text",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_open_image_errors_equal_the_pil_only_path(tmp_path: Path, name: str, monkeypatch) -> None:
    path = tmp_path / name
    path.write_bytes(BAD_FILES[name])
    rec = Record(tmp_path / "instances.json", "images[4]", {"file_name": name})
    with pytest.raises(RecordError) as fast:
        open_image(rec, "file_name", path)
    monkeypatch.setattr(image_header, "header_size", lambda _path: None)
    with pytest.raises(RecordError) as pil_only:
        open_image(rec, "file_name", path)
    assert str(fast.value) == str(pil_only.value)
    assert fast.value.reason == pil_only.value.reason == "corrupt_image"
    assert str(fast.value).startswith(f"{tmp_path / 'instances.json'}: images[4].file_name: cannot read image ")


def test_open_image_missing_file_and_folder(tmp_path: Path) -> None:
    rec = Record(tmp_path / "instances.json", "images[0]", {})
    with pytest.raises(RecordError, match=r"images\[0\]\.file_name: image file '.*nothing\.jpg' not found"):
        open_image(rec, "file_name", tmp_path / "nothing.jpg")
    with pytest.raises(RecordError, match=r"images\[0\]\.file_name: cannot read image .*Is a directory"):
        open_image(rec, "file_name", tmp_path)


def test_a_png_named_jpg_gives_its_size(tmp_path: Path) -> None:
    Image.new("RGB", (31, 17)).save(tmp_path / "x.jpg", format="PNG")
    assert header_size(tmp_path / "x.jpg") == (31, 17)
    assert open_image(Record(tmp_path / "i.json", "images[0]", {}), "file_name", tmp_path / "x.jpg") == (31, 17)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_image_size_reads_headers_and_falls_back_to_pil(tmp_path: Path, fmt: str) -> None:
    """PNG and JPEG sizes come from the header reader without a PIL open; every other format is opened by PIL; both
    give PIL's size (the oracle, read before counting)."""
    path = tmp_path / f"x.{fmt.lower()}"
    Image.new("RGB", (29, 11)).save(path, format=fmt)
    expected = _pil_size(path)
    with mock.patch.object(Image, "open", wraps=Image.open) as opened:
        assert image_size(path) == expected == (29, 11)
    assert opened.call_count == (0 if fmt in ("PNG", "JPEG") else 1)


# --- verified_size: PIL's open + verify() -----------------------------------------------------------------------------


def _pil_verified_size(path: Path) -> tuple[int, int] | None:
    """What ``Image.open(path)`` then ``verify()`` gives (the size), None where PIL raises or warns."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            with Image.open(path) as image:
                size = image.size
                image.verify()
                return size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Warning):
            return None


def _noisy_png() -> bytes:
    """A PNG of several IDAT chunks (noise does not compress below PIL's 64 KiB blocks), an ancillary chunk after
    the image data, then IEND."""
    import io
    import random

    rng = random.Random(0)
    out = io.BytesIO()
    Image.frombytes("RGB", (160, 150), bytes(rng.randrange(256) for _ in range(160 * 150 * 3))).save(out, "PNG")
    data = out.getvalue()
    iend = data.rindex(b"IEND") - 4
    return data[:iend] + _chunk(b"tEXt", b"after\0the pixels") + data[iend:]


def test_verified_size_never_passes_what_pils_verify_refuses(tmp_path: Path) -> None:
    """The data after the header cut at and around each chunk boundary, and bytes of each chunk's length, type,
    data and CRC changed: wherever ``verified_size`` decides, PIL's open + verify() passes with that size; every
    change PIL's verify() refuses is refused; bytes after IEND are not read, as by PIL."""
    data = _noisy_png()
    starts, pos = [], data.index(b"IDAT") - 4
    while True:
        starts.append(pos)
        if data[pos + 4 : pos + 8] == b"IEND":
            break
        pos += 12 + struct.unpack(">I", data[pos : pos + 4])[0]
    assert len(starts) > 3, "several IDAT chunks and the chunk after them"
    variants = [data[:n] for start in starts for n in (start, start + 3, start + 8, start + 11) if n < len(data)]
    iend = starts[-1]
    # a chunk type PIL's verify() refuses though its CRC is right
    variants += [data[:-1], data[:iend] + _chunk(b"t-Xt", b"x") + data[iend:], data + b"junk after IEND"]
    for start in starts:
        length = struct.unpack(">I", data[start : start + 4])[0]
        for i in (start, start + 3, start + 4, start + 7, start + 8, start + 8 + length // 2, start + 8 + length):
            if i < len(data):
                for value in {0x00, 0x20, 0xFF, (data[i] + 1) % 256} - {data[i]}:
                    variants.append(data[:i] + bytes([value]) + data[i + 1 :])
    path, refused = tmp_path / "x.png", 0
    for k, variant in enumerate(variants):
        path.write_bytes(variant)
        size, pil = verified_size(path), _pil_verified_size(path)
        refused += pil is None
        assert size is None or size == pil, (k, size, pil)
    assert refused > len(variants) // 2, refused  # most changes break a CRC, a type or the length
    path.write_bytes(data)
    assert verified_size(path) == _pil_verified_size(path) == (160, 150)
    path.write_bytes(data + b"junk after IEND")
    assert verified_size(path) == (160, 150)
