"""The payload of a COMPRESSED record: which codecs a python has, compress, decompress within bounds.

Standard library only: the receiver carries this module to hosts that have
nothing but python3, and decompresses there with what that python3 has.

A payload is an 8-byte prefix (u8 codec, 3 reserved zero bytes, u32 CRC-32
of the uncompressed bytes), then the compressed bytes.  The stream's own
payload CRC covers what travelled; the inner CRC covers what will be
written, so a codec bug or a bit flip the codec passes through cannot reach
a destination (docs/stream-format.md).

Two codecs.  zlib (1) is in every python3: level 1 over raw deflate (no
zlib header, no Adler-32) compresses a filesystem's data at about 60-200 MB/s
a core.  zstd (2) at level 1 compresses the same data about five times
faster and a little smaller; it comes from python 3.14's standard library
(``compression.zstd``) or the ``zstandard`` package (Debian: python3-zstandard),
and is used only when both ends list it in :func:`available`.  Every
python3 decompresses zlib, so that is the fallback.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from typing import Any

from lvdeltafs.formats.stream import crc32

ZLIB = 1
ZSTD = 2
NAMES = {ZLIB: "zlib", ZSTD: "zstd"}
BY_NAME = {name: number for number, name in NAMES.items()}
PREFIX = struct.Struct("<B3xI")  # codec, reserved, crc32 of the uncompressed bytes
PREFIX_SIZE = PREFIX.size  # 8
LEVEL = 1  # the fastest: compression only pays when it keeps ahead of the link
_RAW_DEFLATE = -15  # window bits: raw deflate (compressobj/decompressobj take it on every python3)
# A codec is slowest on what does not compress.  Eight 4 KiB slices spread over a piece (files and
# their blocks interleave, so one place says little) are compressed first; if together they shrink
# by less than 10%, the piece is sent as it is.  It costs 3% more work on a piece that compresses.
_SLICES = 8
_SLICE = 4 << 10
_GIVE_UP = 0.9


def _looks_incompressible(data: bytes, pack: Callable[[bytes], bytes]) -> bool:
    if len(data) < 4 * _SLICES * _SLICE:
        return False  # small: compressing it whole costs about as much as sampling
    step = len(data) // _SLICES
    sample = b"".join(data[i * step:i * step + _SLICE] for i in range(_SLICES))
    return len(pack(sample)) > _GIVE_UP * len(sample)


class CodecError(Exception):
    """A payload that does not decompress to what its record says; ``unsupported``: an unknown codec."""

    def __init__(self, message: str, unsupported: bool = False):
        super().__init__(message)
        self.unsupported = unsupported


def _find_zstd() -> tuple[str, Any] | None:
    """(which, module) of the zstd this python has: 3.14's standard library, else the zstandard package."""
    try:
        from compression import zstd  # type: ignore[import-not-found]  (python 3.14)
        return "stdlib", zstd
    except ImportError:
        pass
    try:
        import zstandard  # type: ignore[import-not-found]
        return "zstandard", zstandard
    except ImportError:
        return None


_ZSTD = _find_zstd()
ZSTD_LEVEL = 1


def available() -> list[str]:
    """The codecs this python can decompress (and compress), by name, the preferred last."""
    return ["zlib", "zstd"] if _ZSTD else ["zlib"]


def best(far: list[str]) -> str | None:
    """The fastest codec both this python and the far side's (``far``, its :func:`available`) have."""
    common = [name for name in available() if name in far]
    return common[-1] if common else None


def _deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(LEVEL, zlib.DEFLATED, _RAW_DEFLATE)
    return packer.compress(data) + packer.flush()


def _zstd_pack(data: bytes) -> bytes:
    """One zstd frame that records its content size (the reader checks it before it allocates)."""
    which, mod = _ZSTD  # type: ignore[misc]
    if which == "stdlib":
        return mod.compress(data, level=ZSTD_LEVEL)
    return mod.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(data)


def compress(data: bytes, codec: int = ZLIB) -> bytes | None:
    """The payload for ``data``, or None when compressing would not make it smaller (send it raw).

    Both codecs release the GIL while they work, so worker threads compress in parallel.
    """
    if codec == ZSTD and _ZSTD is None:
        raise ValueError("zstd is not available to this python")
    if codec not in NAMES:
        raise ValueError(f"unknown codec {codec}")
    pack = _zstd_pack if codec == ZSTD else _deflate
    if _looks_incompressible(data, pack):
        return None  # already compressed (media, archives, encrypted data): do not spend the CPU
    packed = pack(data)
    if len(packed) + PREFIX_SIZE >= len(data):
        return None
    return PREFIX.pack(codec, crc32(data)) + packed


def decompress(payload: bytes, length: int) -> bytes:
    """The ``length`` bytes a payload holds, checked against its inner CRC; never more memory than that.

    Raises CodecError for an unknown codec (``unsupported``), or for a payload
    that decompresses to more or fewer bytes, not to a whole deflate stream,
    or to bytes whose CRC-32 is not the one recorded.
    """
    if len(payload) <= PREFIX_SIZE:
        raise CodecError(f"a compressed payload of {len(payload)} bytes is shorter than its prefix")
    codec, crc = PREFIX.unpack_from(payload)
    if codec not in NAMES or (codec == ZSTD and _ZSTD is None):
        raise CodecError(f"codec {codec} is not one this python has (it knows "
                         f"{', '.join(f'{BY_NAME[name]} {name}' for name in available())})", unsupported=True)
    if payload[1:4] != b"\0\0\0":
        raise CodecError("the reserved bytes of a compressed payload are not zero")
    body = memoryview(payload)[PREFIX_SIZE:]
    data = _unzstd(body, length) if codec == ZSTD else _inflate(body, length)
    if crc32(data) != crc:
        raise CodecError("the decompressed bytes fail their checksum")
    return data


def _inflate(body: memoryview, length: int) -> bytes:
    unpacker = zlib.decompressobj(_RAW_DEFLATE)
    try:
        # max_length bounds the memory whatever the payload claims (no decompression bomb).
        data = unpacker.decompress(body, length)
        if len(data) == length and not unpacker.eof:
            # The output filled up just before the end marker: one more byte must not come out.
            data += unpacker.decompress(unpacker.unconsumed_tail, 1)
    except zlib.error as e:
        raise CodecError(f"the compressed bytes are damaged ({e})") from None
    if len(data) != length or not unpacker.eof or unpacker.unconsumed_tail or unpacker.unused_data:
        raise CodecError(f"the compressed bytes do not decompress to exactly {length} bytes")
    return data


def _unzstd(body: memoryview, length: int) -> bytes:
    """Exactly ``length`` bytes from one zstd frame, never more memory than that.

    The frame must record its content size, and it must be ``length``:
    that is checked before anything is allocated.  The zstandard package
    decompresses into a buffer of the recorded size; python 3.14's
    decompressor is given ``length`` as its limit and must end the frame
    there; the zstandard package would ignore bytes after the frame, so the
    frame's length is found from its block headers first.
    """
    which, mod = _ZSTD  # type: ignore[misc]
    try:
        if which == "stdlib":
            if mod.get_frame_info(body).decompressed_size != length:
                raise CodecError(f"the zstd frame does not record {length} bytes as its size")
            unpacker = mod.ZstdDecompressor()
            data = unpacker.decompress(body, max_length=length)
            if not unpacker.eof or unpacker.unused_data:
                raise CodecError(f"the compressed bytes are not exactly one zstd frame of {length} bytes")
        else:
            if mod.frame_content_size(body) != length:
                raise CodecError(f"the zstd frame does not record {length} bytes as its size")
            if _zstd_frame_length(body) != len(body):  # the package would ignore bytes after the frame
                raise CodecError(f"the compressed bytes are not exactly one zstd frame of {length} bytes")
            data = mod.ZstdDecompressor().decompress(body, max_output_size=length)
    except (mod.ZstdError, ValueError) as e:  # damaged input, as either library says it
        raise CodecError(f"the compressed bytes are damaged ({e})") from None
    if len(data) != length:
        raise CodecError(f"the compressed bytes do not decompress to exactly {length} bytes")
    return data


def _zstd_frame_length(body: memoryview) -> int:
    """The length of the zstd frame ``body`` begins with, from its header and block headers (RFC 8878
    3.1.1); -1 when they run past the end or a block type is reserved (the decompressor says why)."""
    if len(body) < 6 or bytes(body[:4]) != b"\x28\xb5\x2f\xfd":
        return -1
    fhd = body[4]
    fcs_flag, single, checksum, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
    at = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag] + ((1 if single else 0), 2, 4, 8)[fcs_flag]
    while at + 3 <= len(body):
        head = int.from_bytes(body[at:at + 3], "little")
        last, kind, size = head & 1, (head >> 1) & 3, head >> 3
        if kind == 3:
            return -1
        at += 3 + (1 if kind == 1 else size)  # an RLE block holds one byte, repeated size times
        if last:
            return at + 4 * checksum
    return -1
