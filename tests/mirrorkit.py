"""Mirrors with kept points, as docs/history.md lays them out, for the tests of the @mirrors tree.

A mirror image file, its state (written by lvmirror's own state writer, so
its binding is the real one) and one undo delta per point, each written by
tests/encoder.write_stream.  The model: each point's content is the next
point's (or the mirror's) content resized, with random data and zero ranges
laid over it: exactly what applying the undo deltas newest first gives.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from lvdeltafs.formats.stream import KIND_DATA, KIND_ZERO
from lvmirror.remote.destination import Destination
from lvmirror.remote.state import Files
from tests.encoder import write_stream


@dataclass
class Kept:
    generation: int
    size: int
    content: bytes
    undo: Path


def undo_pieces(rng: random.Random, size: int, newer_size: int,
                block: int = 4096) -> list[tuple[int, int, int]]:
    """Random ranges within ``size``, always covering the bytes past a smaller newer size."""
    out, pos = [], 0
    limit = min(size, newer_size)
    while pos < limit:
        pos += rng.randrange(0, 6) * block + rng.randrange(0, 2) * rng.randrange(1, block)
        ln = rng.randrange(1, 3 * block)
        if pos >= limit:
            break
        ln = min(ln, limit - pos)
        out.append((pos, ln, rng.choice((KIND_DATA, KIND_DATA, KIND_ZERO))))
        pos += ln + 1
    if size > newer_size:
        out.append((newer_size, size - newer_size, KIND_DATA))
    return out


def write_undo(path: Path, generation: int, size: int, pieces: list[tuple[int, int, int]], content: bytes,
               base: str, target: str) -> None:
    ident = {"volume": "vg0/data", "base": base, "target": target, "source": "undo", "base_size": 0,
             "target_size": size, "chunk_size": 4096}
    path.write_bytes(b"".join(write_stream(ident, size, pieces, lambda o, n: content[o:o + n],
                                           delta_id=f"undo-{generation}")))


def write_state(image: Path, generation: int, history: list[dict]) -> None:
    dest = Destination(str(image))
    Files(dest).write_state({"volume": "vg0/data", "snapshot": f"snap{generation}",
                             "size": image.stat().st_size, "generation": generation,
                             "synced": "2026-12-01T02:00:05Z", "binding": dest.binding(), "history": history})


def history_entry(image: Path, k: Kept) -> dict:
    return {"generation": k.generation, "snapshot": f"snap{k.generation}", "synced": "2026-11-30T02:00:00Z",
            "synced_epoch": 1796000000.0 + k.generation, "size": k.size,
            "undo": f"{image.name}.lvmirror-undo-{k.generation}", "undo_bytes": k.undo.stat().st_size}


def make_mirror(folder: Path, seed: int, sizes: dict[int, int], present: bytes,
                present_generation: int) -> tuple[Path, list[Kept]]:
    """``folder/data.img`` holding ``present``, with a point for each generation in ``sizes``."""
    rng = random.Random(seed)
    image = folder / "data.img"
    image.write_bytes(present)
    kept: list[Kept] = []
    newer, newer_snap = present, f"snap{present_generation}"
    for gen in sorted(sizes, reverse=True):
        size = sizes[gen]
        pieces = undo_pieces(rng, size, len(newer))
        content = bytearray(newer[:size]) + bytearray(max(0, size - len(newer)))
        fresh = rng.randbytes(size)
        for off, ln, kind in pieces:
            content[off:off + ln] = fresh[off:off + ln] if kind == KIND_DATA else bytes(ln)
        undo = folder / f"data.img.lvmirror-undo-{gen}"
        write_undo(undo, gen, size, pieces, bytes(content), base=newer_snap, target=f"snap{gen}")
        kept.append(Kept(gen, size, bytes(content), undo))
        newer, newer_snap = bytes(content), f"snap{gen}"
    kept.reverse()
    write_state(image, present_generation, [history_entry(image, k) for k in kept])
    return image, kept
