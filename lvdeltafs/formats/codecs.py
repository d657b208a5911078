"""The payload of a COMPRESSED record: which codecs a python has, compress, decompress within bounds.

Standard library only: the receiver carries this module to hosts that have
nothing but python3, and decompresses there with what that python3 has.

A payload is an 8-byte prefix (u8 codec, 3 reserved zero bytes, u32 CRC-32
of the uncompressed bytes), then the compressed bytes.  The stream's own
payload CRC covers what travelled; the inner CRC covers what will be
written, so a codec bug or a bit flip the codec passes through cannot reach
a destination (docs/stream-format.md).

Only zlib is here: every python3 has it, and at level 1 over raw deflate
(no zlib header, no Adler-32) it compresses a filesystem's data at about
100-200 MB/s a core, far above the links compression is for.  A faster
codec (zstd, in python 3.14's standard library) gets a new codec number and
is used only when both ends list it in ``available()``.
"""

from __future__ import annotations

import struct
import zlib

ZLIB = 1
NAMES = {ZLIB: "zlib"}
BY_NAME = {name: number for number, name in NAMES.items()}
PREFIX = struct.Struct("<B3xI")  # codec, reserved, crc32 of the uncompressed bytes
PREFIX_SIZE = PREFIX.size  # 8
LEVEL = 1  # the fastest: compression only pays when it keeps ahead of the link
_RAW_DEFLATE = -15  # window bits: raw deflate (compressobj/decompressobj take it on every python3)
# zlib is slowest on what does not compress.  Eight 4 KiB slices spread over a piece (files and
# their blocks interleave, so one place says little) are compressed first; if together they shrink
# by less than 10%, the piece is sent as it is.  It costs 3% more work on a piece that compresses.
_SLICES = 8
_SLICE = 4 << 10
_GIVE_UP = 0.9


def _looks_incompressible(data: bytes) -> bool:
    if len(data) < 4 * _SLICES * _SLICE:
        return False  # small: compressing it whole costs about as much as sampling
    step = len(data) // _SLICES
    sample = b"".join(data[i * step:i * step + _SLICE] for i in range(_SLICES))
    packer = zlib.compressobj(LEVEL, zlib.DEFLATED, _RAW_DEFLATE)
    return len(packer.compress(sample) + packer.flush()) > _GIVE_UP * len(sample)


class CodecError(Exception):
    """A payload that does not decompress to what its record says; ``unsupported``: an unknown codec."""

    def __init__(self, message: str, unsupported: bool = False):
        super().__init__(message)
        self.unsupported = unsupported


def available() -> list[str]:
    """The codecs this python can decompress (and compress), by name."""
    return list(BY_NAME)


def compress(data: bytes, codec: int = ZLIB) -> bytes | None:
    """The payload for ``data``, or None when compressing would not make it smaller (send it raw).

    zlib releases the GIL while it works, so worker threads compress in parallel.
    """
    if codec != ZLIB:
        raise ValueError(f"unknown codec {codec}")
    if _looks_incompressible(data):
        return None  # already compressed (media, archives, encrypted data): do not spend the CPU
    packer = zlib.compressobj(LEVEL, zlib.DEFLATED, _RAW_DEFLATE)
    packed = packer.compress(data) + packer.flush()
    if len(packed) + PREFIX_SIZE >= len(data):
        return None
    return PREFIX.pack(codec, zlib.crc32(data)) + packed


def decompress(payload: bytes, length: int) -> bytes:
    """The ``length`` bytes a payload holds, checked against its inner CRC; never more memory than that.

    Raises CodecError for an unknown codec (``unsupported``), or for a payload
    that decompresses to more or fewer bytes, not to a whole deflate stream,
    or to bytes whose CRC-32 is not the one recorded.
    """
    if len(payload) <= PREFIX_SIZE:
        raise CodecError(f"a compressed payload of {len(payload)} bytes is shorter than its prefix")
    codec, crc = PREFIX.unpack_from(payload)
    if codec not in NAMES:
        raise CodecError(f"codec {codec} is not one this release knows (it knows "
                         f"{', '.join(f'{n} {name}' for n, name in NAMES.items())})", unsupported=True)
    if payload[1:4] != b"\0\0\0":
        raise CodecError("the reserved bytes of a compressed payload are not zero")
    unpacker = zlib.decompressobj(_RAW_DEFLATE)
    try:
        # max_length bounds the memory whatever the payload claims (no decompression bomb).
        data = unpacker.decompress(memoryview(payload)[PREFIX_SIZE:], length)
        if len(data) == length and not unpacker.eof:
            # The output filled up just before the end marker: one more byte must not come out.
            data += unpacker.decompress(unpacker.unconsumed_tail, 1)
    except zlib.error as e:
        raise CodecError(f"the compressed bytes are damaged ({e})") from None
    if len(data) != length or not unpacker.eof or unpacker.unconsumed_tail or unpacker.unused_data:
        raise CodecError(f"the compressed bytes do not decompress to exactly {length} bytes")
    if zlib.crc32(data) != crc:
        raise CodecError("the decompressed bytes fail their checksum")
    return data
