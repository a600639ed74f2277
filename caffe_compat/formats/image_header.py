"""Image sizes read from encoded headers, so that a decode cannot ask for more memory than
the bytes present justify (a flipped bit in a 572-byte PNG's header asked OpenCV for 2.3 GB).

``check_encoded_size(data)`` reads width × height × channels from the header of a PNG, JPEG,
BMP, GIF, WebP, binary PNM or (classic) TIFF image and raises DataError when the header is truncated, a
dimension is zero, the decoded image exceeds the memory budget, or — for PNG, whose deflate
stream cannot expand more than about 1032:1 — the pixels cannot come from the bytes given.
Other formats are refused: their size cannot be checked before OpenCV allocates.
"""
from __future__ import annotations

import re
import struct

from caffe_compat.formats.budget import human, memory_budget
from caffe_compat.formats.errors import DataError

DEFLATE_MAX_RATIO = 1032          # zlib's worst-case expansion of a deflate stream
MAX_PIXELS = 1 << 30              # OpenCV's own default limit (CV_IO_MAX_IMAGE_PIXELS)
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _png(data: bytes):
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise DataError("encoded PNG is truncated before its IHDR header")
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    _png_chunks_fit(data)
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(colour, 4)
    raw = height * (1 + (width * channels * max(depth, 8) + 7) // 8)
    if raw > DEFLATE_MAX_RATIO * len(data) + 4096:
        raise DataError(f"encoded PNG header declares {width}×{height} pixels, more than its "
                        f"{len(data)} bytes can hold")
    return width, height, channels


def _png_chunks_fit(data: bytes) -> None:
    """Every chunk's declared length must fit in the bytes present: a mutated length (up to
    4 GiB) makes libpng's buffered reader spin for seconds before it gives up."""
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if length > len(data) - pos - 12:
            name = kind.decode("latin-1") if kind.isalpha() else repr(kind)
            raise DataError(f"encoded PNG is truncated: chunk {name} at byte {pos} declares "
                            f"{length} bytes, {max(len(data) - pos - 12, 0)} remain")
        if kind == b"IEND":
            return
        pos += 12 + length


def _jpeg_segments(data: bytes):
    """(marker, position) of each JPEG marker up to and including the first scan's (SOS)."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise DataError("encoded JPEG has a malformed marker before its frame header")
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        yield marker, pos
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker == 0xDA or length < 2:
            return
        pos += 2 + length


def _jpeg(data: bytes):
    for marker, pos in _jpeg_segments(data):
        if marker in _JPEG_SOF:
            if pos + 10 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return width, height, max(1, data[pos + 9])
    raise DataError("encoded JPEG has no frame header (truncated or corrupt)")


def jpeg_is_truncated(data: bytes) -> bool:
    """Whether a JPEG file stops before its end-of-image marker: libjpeg then prints
    "Premature end of JPEG file" on stderr and decodes the missing part grey (the marker
    cannot occur inside scan data, where every 0xFF byte is stuffed or starts a marker)."""
    if data[:2] != b"\xff\xd8":
        return False
    try:
        scans = [pos for marker, pos in _jpeg_segments(data) if marker == 0xDA]
    except DataError:
        return False            # malformed: libjpeg refuses it with an error, not a warning
    return not scans or data.rfind(b"\xff\xd9", scans[0]) < 0    # from the end: fast


def _bmp(data: bytes):
    if len(data) < 26:
        raise DataError("encoded BMP is truncated before its header")
    width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height), 4


def _gif(data: bytes):
    if len(data) < 10:
        raise DataError("encoded GIF is truncated before its header")
    width, height = struct.unpack("<HH", data[6:10])
    return width, height, 4


def _webp(data: bytes):
    kind = data[12:16]
    if kind == b"VP8X" and len(data) >= 30:
        return (int.from_bytes(data[24:27], "little") + 1,
                int.from_bytes(data[27:30], "little") + 1, 4)
    if kind == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, 4
    if kind == b"VP8 " and len(data) >= 30:
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF, 3
    raise DataError("encoded WebP is truncated or has an unknown chunk")


def _pnm(data: bytes):
    head = re.findall(rb"\d+", re.sub(rb"#[^\n]*", b"", data[2:512]))
    if len(head) < 3:
        raise DataError("encoded PNM has a malformed header")
    width, height, maxval = (int(h) for h in head[:3])
    return width, height, (3 if data[1:2] == b"6" else 1) * (2 if maxval > 255 else 1)


def _tiff(data: bytes):
    """Width, height and bytes per pixel from the first IFD of a (classic) TIFF."""
    order = "<" if data[:2] == b"II" else ">"
    if len(data) < 8:
        raise DataError("encoded TIFF is truncated before its header")
    ifd = struct.unpack(order + "I", data[4:8])[0]
    if ifd + 2 > len(data):
        raise DataError(f"encoded TIFF's first directory (byte {ifd}) is past its end")
    count = struct.unpack(order + "H", data[ifd:ifd + 2])[0]
    tags = {}
    for pos in range(ifd + 2, min(ifd + 2 + 12 * count, len(data) - 11), 12):
        tag, kind = struct.unpack(order + "HH", data[pos:pos + 4])
        fmt = {3: "H", 4: "I"}.get(kind)
        if fmt:
            tags[tag] = struct.unpack(order + fmt, data[pos + 8:pos + 8 + struct.calcsize(fmt)])[0]
    if 256 not in tags or 257 not in tags:
        raise DataError("encoded TIFF has no image width or length in its first directory")
    bits = tags.get(258, 8) if tags.get(277, 1) == 1 else 8    # several samples: an offset
    return tags[256], tags[257], max(1, tags.get(277, 1)) * max(1, bits // 8)


_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", _png), (b"\xff\xd8", _jpeg), (b"BM", _bmp),
               (b"GIF8", _gif), (b"P5", _pnm), (b"P6", _pnm), (b"II*\0", _tiff),
               (b"MM\0*", _tiff))


def _has_known_signature(head: bytes) -> bool:
    return (head[:4] == b"RIFF" and head[8:12] == b"WEBP") or \
        any(head.startswith(signature) for signature, _ in _SIGNATURES)


def image_size(data: bytes) -> tuple[int, int, int]:
    """(width, height, channels) from an encoded image's header; DataError if unknown."""
    data = bytes(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp(data)
    for signature, reader in _SIGNATURES:
        if data.startswith(signature):
            return reader(data)
    raise DataError("encoded record is not a PNG, JPEG, BMP, GIF, WebP, PNM or TIFF image (other "
                    "formats are refused: their size cannot be checked before decoding)")


def check_encoded_size(data: bytes, unknown_ok: bool = False) -> None:
    """DataError unless decoding ``data`` allocates a sane, budgeted amount of memory.

    ``unknown_ok`` lets a format without a header reader here pass (image files: TIFF and
    the like are OpenCV's to refuse, under its own pixel limit)."""
    try:
        width, height, channels = image_size(data)
    except DataError:
        if unknown_ok and not _has_known_signature(bytes(data[:12])):
            return
        raise
    if width <= 0 or height <= 0:
        raise DataError(f"encoded image header declares an empty {width}×{height} image")
    if width * height > MAX_PIXELS:
        raise DataError(f"encoded image header declares {width}×{height} pixels, more than "
                        f"OpenCV decodes ({MAX_PIXELS})")
    nbytes = width * height * channels * 2    # decode buffer plus the C×H×W copy
    if nbytes > memory_budget():
        raise DataError(f"encoded image {width}×{height} needs {human(nbytes)} to decode, more "
                        "than the memory budget (CAFFE_COMPAT_MEMORY_BUDGET)")
