"""Composed points (lvdeltafs.formats.overlay) against the model: apply the undo deltas newest first."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lvdeltafs.formats import overlay
from lvdeltafs.formats.stream import KIND_DATA, KIND_ZERO, StreamError
from tests.encoder import write_stream

IDENT = {"volume": "vg/v", "base": "b", "target": "t", "source": "undo", "base_size": 0, "target_size": 0,
         "chunk_size": 4096}


def undo_file(tmp_path, name: str, size: int, pieces: list[tuple[int, int, int]], content: bytes,
              base: str = "b", target: str = "t") -> int:
    ident = {**IDENT, "base": base, "target": target, "target_size": size}
    path = tmp_path / name
    path.write_bytes(b"".join(write_stream(ident, size, pieces, lambda o, n: content[o:o + n])))
    return os.open(path, os.O_RDONLY)


def model(base: bytes, layers_newest_first: list[tuple[int, list[tuple[int, int, int]], bytes]]) -> bytes:
    img = bytearray(base)
    for size, pieces, content in layers_newest_first:
        img = img[:size] + bytearray(max(0, size - len(img)))
        for off, ln, kind in pieces:
            img[off:off + ln] = content[off:off + ln] if kind == KIND_DATA else bytes(ln)
    return bytes(img)


def random_pieces(rng: random.Random, size: int) -> list[tuple[int, int, int]]:
    out, pos = [], 0
    while pos < size:
        pos += rng.randrange(0, 3 * 4096)
        ln = rng.randrange(1, 3 * 4096)
        if pos >= size:
            break
        ln = min(ln, size - pos)
        out.append((pos, ln, rng.choice((KIND_DATA, KIND_DATA, KIND_ZERO))))
        pos += ln + 1
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), nlayers=st.integers(1, 4))
def test_a_composed_point_equals_the_undo_deltas_applied_newest_first(tmp_path_factory, seed, nlayers):
    tmp = tmp_path_factory.mktemp("ov")
    rng = random.Random(seed)
    base = rng.randbytes(rng.randrange(1, 40000))
    (tmp / "base").write_bytes(base)
    layers = []  # built newest first, then turned oldest first
    newer_size = len(base)
    for _ in range(nlayers):
        # A real undo delta covers the bytes past a smaller newer size (docs/history.md).
        size = rng.randrange(1, 40000)
        pieces = random_pieces(rng, min(size, newer_size))
        if size > newer_size:
            pieces.append((newer_size, size - newer_size, KIND_DATA))
        layers.append((size, pieces, rng.randbytes(size)))
        newer_size = size
    layers.reverse()
    fds = [undo_file(tmp, f"u{i}", *layer) for i, layer in enumerate(layers)]
    base_fd = os.open(tmp / "base", os.O_RDONLY)
    try:
        idx = [overlay.index_undo(fd) for fd in fds]
        size = idx[0].target_size
        comp = overlay.Composed(base_fd, len(base), fds, overlay.overlay([i.ranges for i in idx], size), size)
        want = model(base, list(reversed(layers)))
        assert comp.read(0, size + 10) == want
        for _ in range(20):
            off = rng.randrange(0, size + 5)
            n = rng.randrange(0, 9000)
            assert comp.read(off, n) == want[off:off + n]
        # The squash: the changed ranges, read from the composition, applied to the base give the point.
        squashed = bytearray(base[:size]) + bytearray(max(0, size - len(base)))
        for off, ln, _kind in comp.changed():
            squashed[off:off + ln] = comp.read(off, ln)
        assert bytes(squashed) == want
    finally:
        for fd in fds + [base_fd]:
            os.close(fd)


def test_a_damaged_undo_delta_is_refused_before_anything_is_read(tmp_path):
    content = os.urandom(8192)
    fd = undo_file(tmp_path, "u", 8192, [(0, 8192, KIND_DATA)], content)
    os.close(fd)
    raw = bytearray((tmp_path / "u").read_bytes())
    raw[200] ^= 1
    (tmp_path / "u").write_bytes(bytes(raw))
    fd = os.open(tmp_path / "u", os.O_RDONLY)
    try:
        with pytest.raises(StreamError):
            overlay.index_undo(fd)
    finally:
        os.close(fd)


def test_undo_deltas_that_do_not_chain_are_refused(tmp_path):
    a = overlay.index_undo(undo_file(tmp_path, "a", 10, [], b"", base="s2", target="s1"))
    b = overlay.index_undo(undo_file(tmp_path, "b", 10, [], b"", base="s3", target="s2"))
    overlay.check_chain([a, b])
    c = overlay.index_undo(undo_file(tmp_path, "c", 10, [], b"", base="s4", target="sX"))
    with pytest.raises(StreamError, match="chain"):
        overlay.check_chain([a, c])
