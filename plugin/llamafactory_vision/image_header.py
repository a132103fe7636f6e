"""``(width, height)`` of a PNG or JPEG file from its first bytes: what ``PIL.Image.open(path).size`` gives, for
a sixth of its cost (PIL's plugin dispatch and table parsing take ~90 us a JPEG; this ~15 us, most of it the
``open`` and ``read`` system calls).

A file is decided here only when everything PIL checks while opening it is well-formed: the same chunk CRCs, segment
lengths and handler preconditions as Pillow's ``PngImagePlugin`` / ``JpegImagePlugin`` (walked up to the first
``IDAT`` / start of scan, as PIL does). Anything else returns ``None`` so that the caller opens the file with PIL,
which then identifies, raises or warns exactly as it would have: other formats, truncated or malformed headers, JPEG
fill or junk bytes, MPO and Photoshop segments, an EXIF block PIL would parse for the DPI, PNG chunks other than the
common ones, a size above ``Image.MAX_IMAGE_PIXELS`` (PIL's decompression-bomb warning or error).

The size is the stored one, before any EXIF orientation, as ``Image.open(...).size`` is. :func:`image_size` is the
one way the package reads an image file's size (conversion, tokenization): this reader where it decides, PIL
otherwise. :func:`verified_size` also stands in for PIL's ``verify()`` after the open (a PNG's chunk CRCs up to
IEND), for the grounding converter.
"""

from __future__ import annotations

import os
import re
import zlib

from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_PREFIX = b"\xff\xd8\xff"  # what PIL's JPEG plugin accepts
FIRST_READ = 4096  # enough for a typical JPEG header up to its scan; longer headers are read on demand
MAX_PNG_CHUNK = 1 << 16  # chunks before IDAT longer than this are left to PIL (it reads them block by block)
MAX_VERIFIED_FILE = 1 << 26  # PNG files verified by reading them whole; larger ones are left to PIL
_IS_CID = re.compile(rb"\w\w\w\w").match  # a PNG chunk type as PIL's ``is_cid`` accepts it

# JPEG marker codes (the byte after 0xFF) PIL's JpegImagePlugin handles as below; every other code is left to PIL.
JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
JPEG_SKIPPED = frozenset({0xC4, 0xCC, 0xDC, 0xDD, 0xDF, 0xFE})  # DHT, DAC, DNL, DRI, EXP, COM: read and ignored
JPEG_SOS, JPEG_DQT = 0xDA, 0xDB
# PNG chunks before IDAT this reader checks like PIL does: minimum length of each (tRNS depends on the colour type).
PNG_MIN_LENGTH = {b"PLTE": 0, b"gAMA": 4, b"sRGB": 1, b"pHYs": 9, b"cHRM": 0, b"tRNS": 0}
PNG_TRNS_MIN_LENGTH = {0: 2, 2: 6}  # grey: one 16-bit value; truecolour: three
PNG_COLOUR_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}  # the PNG spec's


class _Head:
    """The bytes of an open file read so far; :meth:`has` reads on until the file holds ``end`` bytes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.data = os.read(fd, FIRST_READ)

    @property
    def size(self) -> int:
        """The file's size in bytes now."""
        return os.fstat(self.fd).st_size

    def has(self, end: int) -> bool:
        while len(self.data) < end:
            more = os.read(self.fd, end - len(self.data))
            if not more:
                return False
            self.data += more
        return True


FileVersion = tuple[str, int, int, int, int]  # (path, inode, size in bytes, mtime_ns, ctime_ns)


def file_version(path: str | os.PathLike[str]) -> FileVersion:
    """``(path, inode, size in bytes, mtime_ns, ctime_ns)`` of the file at ``path`` as it is now: the key under which
    what was read from it (its size, its preprocessed tensors) may be reused.

    mtime can be set back by a program (``os.utime``, ``cp -p``, ``rsync -t``), so a rewrite of the same size with the
    old mtime would pass as unchanged; the inode (a file replaced by rename) and ctime (which every write and every
    ``utime`` advance, and no program can set) catch it, to the file system's ctime granularity."""
    stat = os.stat(path)
    return os.fspath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(width, height)`` of the image file at ``path``, as ``PIL.Image.open(path).size`` gives it: from
    :func:`header_size` where it decides (well-formed PNG and JPEG headers), else from PIL, which then identifies the
    file or raises (and warns) exactly as its own open does: ``FileNotFoundError``, ``UnidentifiedImageError``,
    ``OSError``, ``Image.DecompressionBombError``."""
    size = header_size(path)
    if size is not None:
        return size
    with Image.open(path) as image:
        return image.size


def header_size(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """``(width, height)`` of the PNG or JPEG file at ``path``, or None where PIL has to decide (including every
    file that cannot be opened or read: PIL then raises its own error, e.g. ``FileNotFoundError``)."""
    return _size(path, verify=False)


def verified_size(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """``(width, height)`` of the PNG or JPEG file at ``path`` where ``PIL.Image.open(path)`` followed by
    ``verify()`` would pass with that size; None where PIL has to decide (it then raises, warns or passes itself).

    PIL's ``verify()`` of a PNG (``ChunkStream.verify``) reads every chunk from the first ``IDAT`` to ``IEND``: each
    chunk type must be four word characters and each chunk's CRC must match (without decompressing); for a JPEG
    (and every other format but PNG) ``verify()`` checks nothing beyond ``open``. Here the PNG is read whole (one
    system call) and the same checks run on it, strictly (PIL's ``LOAD_TRUNCATED_IMAGES`` only loosens them); the
    CRCs still take most of the time, ~0.45 us a KiB, but PIL's per-chunk Python and its second open go.
    """
    return _size(path, verify=True)


def _size(path: str | os.PathLike[str], verify: bool) -> tuple[int, int] | None:
    try:
        # A bare descriptor: one open and one read system call for the whole header of a typical file.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError:
        return None
    try:
        head = _Head(fd)
        if head.data.startswith(PNG_SIGNATURE):
            size, idat = _png_header(head)
            if verify and size is not None and not _png_chunks_verify(head, idat):
                return None
        elif head.data.startswith(JPEG_PREFIX):
            size = _jpeg_size(head)
        else:
            return None
    except OSError:  # a read error (e.g. a folder): PIL's own open reports it
        return None
    finally:
        os.close(fd)
    if size is None or not size[0] > 0 < size[1]:  # PIL: "not identified by this driver"
        return None
    limit = Image.MAX_IMAGE_PIXELS  # read per call: users raise or clear it
    if limit is not None and size[0] * size[1] > limit:
        return None  # PIL warns or refuses (decompression bomb)
    return size


def _png_header(head: _Head) -> tuple[tuple[int, int] | None, int]:
    """Walk the chunks from IHDR to the first IDAT like PIL's ``PngImageFile._open``, checking each CRC; returns the
    size (None where PIL has to decide) and the offset of the first IDAT chunk."""
    pos, colour, size = len(PNG_SIGNATURE), None, None
    while head.has(pos + 8):
        data = head.data
        length = int.from_bytes(data[pos : pos + 4], "big")
        cid = data[pos + 4 : pos + 8]
        if cid == b"IDAT":
            return size, pos  # PIL stops here without reading the chunk
        if size is None:
            if cid != b"IHDR" or length < 13:  # PIL: ValueError "Truncated IHDR chunk"
                return None, pos
        elif cid not in PNG_MIN_LENGTH or length < PNG_MIN_LENGTH[cid]:
            return None, pos
        end = pos + 8 + length
        if length > MAX_PNG_CHUNK or not head.has(end + 4):
            return None, pos
        data = head.data
        chunk = data[pos + 8 : end]
        if zlib.crc32(chunk, zlib.crc32(cid)) != int.from_bytes(data[end : end + 4], "big"):
            return None, pos  # PIL: SyntaxError "bad header checksum"
        if cid == b"IHDR":
            depth, colour = chunk[8], chunk[9]
            if depth not in PNG_COLOUR_DEPTHS.get(colour, ()) or chunk[11]:  # no PIL mode / unknown filter
                return None, pos
            size = int.from_bytes(chunk[0:4], "big"), int.from_bytes(chunk[4:8], "big")
        elif cid == b"tRNS" and length < PNG_TRNS_MIN_LENGTH.get(colour, 0):
            return None, pos  # PIL reads 16-bit values past the end: struct.error
        elif cid == b"cHRM" and length % 4:
            return None, pos  # PIL unpacks whole 32-bit values only
        pos = end + 4
    return None, pos


def _png_chunks_verify(head: _Head, pos: int) -> bool:
    """Whether PIL's ``ChunkStream.verify`` passes from the chunk at ``pos`` (the first IDAT) on: every chunk until
    IEND complete, of a word-character type, with a matching CRC (IEND's own CRC and anything after it unread)."""
    size = head.size  # one fstat
    if size > MAX_VERIFIED_FILE or not head.has(size):
        return False  # very large files: PIL's block-wise reading; a file shorter than its size: PIL reports it
    data = head.data
    view = memoryview(data)
    while pos + 8 <= len(data):
        cid = data[pos + 4 : pos + 8]
        if not _IS_CID(cid):
            return False  # PIL: SyntaxError "broken PNG file (chunk ...)"
        if cid == b"IEND":
            return True
        end = pos + 8 + int.from_bytes(data[pos : pos + 4], "big")
        if end + 4 > len(data) or zlib.crc32(view[pos + 8 : end], zlib.crc32(cid)) != int.from_bytes(
            data[end : end + 4], "big"
        ):
            return False  # PIL: "Truncated File Read", "incomplete checksum" or "bad header checksum"
        pos = end + 4
    return False  # PIL: "truncated PNG file"


def _jpeg_size(head: _Head) -> tuple[int, int] | None:
    """Walk the segments up to the start of scan like PIL's ``JpegImageFile._open``; the last SOF gives the size."""
    pos, size, dpi, exif, icc = len(JPEG_PREFIX), None, False, False, []
    data = head.data
    while True:
        # pos: the marker code (PIL reads 0xFF D8 FF, then the first code; 0xFF fill bytes before a code are padding)
        if pos + 3 > len(data) and not head.has(pos + 3):
            return None
        data = head.data
        while data[pos] == 0xFF:
            pos += 1
            if pos + 3 > len(data) and not head.has(pos + 3):
                return None
            data = head.data
        code, length = data[pos], data[pos + 1] << 8 | data[pos + 2]
        start, end = pos + 3, pos + 1 + length
        # PIL: a negative read, or "Truncated File Read"; the byte after the segment must be there too (see below;
        # after the scan header PIL does not read it: a file ending there is left to PIL)
        if length < 2 or end + 1 > len(data) and not head.has(end + 1):
            return None
        data = head.data
        if code in JPEG_SKIPPED:
            pass
        elif code in JPEG_SOF:
            if length < 8 or data[start] != 8 or data[start + 5] not in (1, 3, 4) or (length - 8) % 3:
                return None  # PIL: short SOF, "cannot handle n-bit layers / n-layer images", partial component
            icc.sort()
            if icc and len(icc[0]) < 14:
                return None  # PIL reads the first ICC fragment's count byte
            icc = []
            size = data[start + 3] << 8 | data[start + 4], data[start + 1] << 8 | data[start + 2]
        elif code == JPEG_SOS:
            return None if exif and not dpi else size  # PIL parses EXIF for a DPI missing from JFIF
        elif code == JPEG_DQT:
            at = start
            while at < end:
                at += 65 if data[at] < 16 else 129  # 64 8-bit or 16-bit values after the table id
            if at != end:
                return None  # PIL: "bad quantization table marker"
        elif 0xE0 <= code <= 0xEF:
            segment = data[start:end]
            if code == 0xE0 and segment.startswith(b"JFIF"):
                if length < 9:
                    return None  # PIL reads the JFIF version: struct.error
                dpi = dpi or length >= 14 and segment[7] in (1, 2)
            elif code == 0xE1 and segment.startswith(b"Exif\0\0"):
                exif = True
            elif code == 0xE2 and segment.startswith(b"ICC_PROFILE\0"):
                icc.append(segment)
            elif code == 0xE2 and segment.startswith(b"MPF\0") or code == 0xED and segment.startswith(b"Photoshop"):
                return None  # MPO detection / Photoshop resources: left to PIL
            elif code == 0xEE and segment.startswith(b"Adobe") and length < 9:
                return None
        else:
            return None  # SOI, EOI, RSTn, JPGn, DHP in a header: left to PIL
        # PIL reads the next byte: 0xFF starts the next marker; anything else is junk it skips (left to PIL)
        if data[end] != 0xFF:
            return None
        pos = end + 1
