"""Compressed streams: the codec's bounds, the reader's checks, the encoder's bytes and resumes, the policy.

The end-to-end cases run the real receiver (the shipped bundle in a
subprocess) over a local pipe with ``compress = "zlib"`` forced, since
``auto`` never compresses for a local destination; the shaped-link test in
tests/ssh/ runs ``auto`` over a real slow link.
"""

from __future__ import annotations

import io
import random
import struct
import zlib

import pytest

from lvdeltafs.formats import codecs
from lvdeltafs.formats import stream as S
from lvdeltafs.formats.reader import StreamReader, verify_stream
from lvdeltafs.formats.stream import StreamError, StreamUnsupported
from lvmirror.compression import (
    MAX_INTERVAL,
    PROBE_BYTES,
    RUN_BYTES,
    Policy,
    choose_mode,
    policy_for,
    sample_ratio,
)
from lvmirror.encoder import DeltaStream, Resume
from tests.harness import MiB, image, memory_delta, sha, sha_file, staging_files, text

OLD = text(6 * MiB, 1)
NEW = bytearray(OLD)
NEW[MiB:MiB + 2 * MiB + 5000] = text(2 * MiB + 5000, 2)  # over 1 MiB: several records
NEW[4 * MiB:4 * MiB + 8192] = bytes(8192)  # becomes zeros
NEW[5 * MiB:5 * MiB + 300_000] = image(300_000, [(0, 300_000)], seed=3)  # random: does not compress
NEW = bytes(NEW)


def stream_of(source: DeltaStream, offset: int = 0, resume: Resume | None = None) -> bytes:
    return b"".join(source.read_from(offset, resume))


def records(blob: bytes):
    reader = StreamReader(io.BytesIO(blob))
    return list(reader), reader


# ---------------------------------------------------------------- the codec


CODECS = [codecs.ZLIB, codecs.ZSTD]  # zstd: the zstandard package, a dependency (python3-zstandard)


def test_this_python_has_both_codecs_and_the_best_common_one_is_chosen():
    assert codecs.available() == ["zlib", "zstd"]
    assert codecs.best(["zlib", "zstd"]) == "zstd" and codecs.best(["zlib"]) == "zlib"
    assert codecs.best([]) is None and codecs.best(["lz77"]) is None


@pytest.mark.parametrize("codec", CODECS)
def test_codec_round_trip_and_no_expansion(codec):
    data = text(MiB, 5)
    payload = codecs.compress(data, codec)
    assert payload is not None and len(payload) < len(data) // 2 and payload[0] == codec
    assert codecs.decompress(payload, len(data)) == data
    assert codecs.compress(image(MiB, [(0, MiB)], seed=6), codec) is None  # random bytes are sent raw
    # A piece that begins with random bytes (a compressed file's blocks) but is mostly text compresses.
    mixed = image(256 << 10, [(0, 256 << 10)], seed=7) + text(768 << 10, 8)
    assert len(codecs.compress(mixed, codec)) < 0.6 * len(mixed)
    for n in (4096, 4097, MiB):  # runs of one byte (zstd's RLE blocks), a whole record of them
        assert codecs.decompress(codecs.compress(bytes(n), codec), n) == bytes(n)
    assert codecs.compress(b"tiny", codec) is None  # would not shrink: sent raw


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("damage, match, unsupported", [
    (lambda p, n: (p, n + 1), "exactly|record", False),  # claims more bytes than it holds
    (lambda p, n: (p, n - 1), "exactly|record", False),  # holds more than it claims: never inflated past n
    (lambda p, n: (p[:4] + bytes(4) + p[8:], n), "checksum", False),  # the inner CRC
    (lambda p, n: (p[:-3], n), "damaged|exactly", False),  # cut short
    (lambda p, n: (p + b"tail", n), "exactly", False),  # trailing bytes after the deflate stream
    (lambda p, n: (bytes([9]) + p[1:], n), "codec 9", True),
    (lambda p, n: (p[:1] + b"\1" + p[2:], n), "reserved", False),
    (lambda p, n: (p[:8], n), "shorter than its prefix", False),
])
def test_codec_refuses_damage(damage, match, unsupported, codec):
    data = text(200_000, 7)
    payload, n = damage(codecs.compress(data, codec), len(data))
    with pytest.raises(codecs.CodecError, match=match) as e:
        codecs.decompress(payload, n)
    assert e.value.unsupported is unsupported


def test_codec_bomb_is_bounded():
    """A tiny payload that would inflate to 1 GiB yields at most what its record claims, then an error."""
    packer = zlib.compressobj(1, zlib.DEFLATED, -15)
    bomb = packer.compress(bytes(1 << 30)) + packer.flush()
    payload = codecs.PREFIX.pack(codecs.ZLIB, zlib.crc32(bytes(MiB))) + bomb
    with pytest.raises(codecs.CodecError, match="exactly"):
        codecs.decompress(payload, MiB)


def zstd_payload(frame: bytes, crc_of: bytes) -> bytes:
    return codecs.PREFIX.pack(codecs.ZSTD, zlib.crc32(crc_of)) + frame


def test_zstd_bombs_and_frames_that_do_not_say_their_size_are_refused_before_anything_is_allocated():
    import zstandard
    gib = zstandard.ZstdCompressor(level=1).compress(bytes(1 << 30))  # records 1 GiB as its size
    with pytest.raises(codecs.CodecError, match="record"):
        codecs.decompress(zstd_payload(gib, bytes(MiB)), MiB)
    streamed = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(MiB))
    with pytest.raises(codecs.CodecError, match="record"):
        codecs.decompress(zstd_payload(streamed, bytes(MiB)), MiB)
    two = zstandard.ZstdCompressor(level=1).compress(bytes(1000))
    with pytest.raises(codecs.CodecError, match="exactly one zstd frame"):
        codecs.decompress(zstd_payload(two + two, bytes(1000)), 1000)  # a second frame after the first


def test_a_python_without_zstd_lists_zlib_only_and_calls_a_zstd_payload_unsupported(monkeypatch):
    payload = codecs.compress(text(100_000, 3), codecs.ZSTD)
    monkeypatch.setattr(codecs, "_ZSTD", None)
    assert codecs.available() == ["zlib"] and codecs.best(["zlib", "zstd"]) == "zlib"
    with pytest.raises(codecs.CodecError, match="codec 2 is not one this python has") as e:
        codecs.decompress(payload, 100_000)
    assert e.value.unsupported
    with pytest.raises(ValueError, match="zstd is not available"):
        codecs.compress(b"x" * 100_000, codecs.ZSTD)
    # A sender without it: auto compresses with zlib even when the far side has zstd; zstd asked for is off.
    assert policy_for("auto", local=False, far_codecs=["zlib", "zstd"]).codec == codecs.ZLIB
    assert policy_for("zstd", local=False, far_codecs=["zlib", "zstd"]).mode == "off"


# ---------------------------------------------------------------- the reader


def crafted(records_: list[tuple[int, int, int, bytes]], version: int = 2, size: int = 1 << 20) -> bytes:
    ident = {"volume": "v", "base": "a", "target": "b", "base_size": size, "target_size": size,
             "chunk_size": 4096, "source": "cow"}
    header = S.encode_header(ident, size, "0" * 32)
    prefix, seed = S.stream_prefix(header, size, version)
    out = b"".join(prefix)
    nd = db = 0
    for rtype, a, b, payload in records_:
        out += S.record_head(rtype, len(payload), a, b, zlib.crc32(payload) if payload else 0, seed) + payload
        nd, db = nd + 1, db + b
    end = S.END_PAYLOAD.pack(nd, 0, db, 0)
    return out + S.record_head(S.T_END, len(end), len(out), 2 + len(records_), zlib.crc32(end), seed) + end


def test_reader_yields_a_compressed_record_as_the_data_it_stands_for():
    data = text(70_000, 8)
    blob = crafted([(S.T_COMPRESSED, 4096, len(data), codecs.compress(data))])
    recs, reader = records(blob)
    assert [(r.type, r.offset, r.length, r.data) for r in recs[2:3]] == [("data", 4096, len(data), data)]
    assert reader.summary().data_bytes == len(data) and reader.version == 2


@pytest.mark.parametrize("case, exc, match", [
    ("in_v1", StreamError, "compressed record in a version 1 stream"),
    ("expanding", StreamError, "malformed"),
    ("inner_crc", StreamError, "fail their checksum"),
    ("codec", StreamUnsupported, "codec 7"),
    ("too_long", StreamError, "malformed or larger"),
    ("wrong_length", StreamError, "exactly"),
])
def test_reader_refuses_bad_compressed_records(case, exc, match):
    data = text(70_000, 9)
    payload = codecs.compress(data)
    rec = (S.T_COMPRESSED, 0, len(data), payload)
    version = 2
    if case == "in_v1":
        version = 1
    elif case == "expanding":
        rec = (S.T_COMPRESSED, 0, 100, payload)  # a payload no smaller than the data it stands for
    elif case == "inner_crc":
        rec = (S.T_COMPRESSED, 0, len(data), payload[:4] + struct.pack("<I", 1) + payload[8:])
    elif case == "codec":
        rec = (S.T_COMPRESSED, 0, len(data), bytes([7]) + payload[1:])
    elif case == "too_long":
        rec = (S.T_COMPRESSED, 0, S.MAX_DATA + 1, payload)
    elif case == "wrong_length":
        rec = (S.T_COMPRESSED, 0, len(data) - 1, payload)
    with pytest.raises(exc, match=match):
        verify_stream(io.BytesIO(crafted([rec], version)))


def test_every_bit_flip_in_a_compressed_stream_is_caught():
    source = DeltaStream(memory_delta(OLD, NEW, "vol@1", "vol@2"), Policy("zlib"))
    blob = stream_of(source)
    rnd = random.Random(4)
    for at in rnd.sample(range(len(blob)), 300):
        bad = bytearray(blob)
        bad[at] ^= 1 << rnd.randrange(8)
        with pytest.raises(StreamError):
            verify_stream(io.BytesIO(bytes(bad)))


# ---------------------------------------------------------------- the encoder


def test_uncompressed_stream_is_byte_for_byte_the_layouts():
    d = memory_delta(OLD, NEW, "vol@1", "vol@2")
    source = DeltaStream(d)
    assert source.version == 1 and source.size == source.layout.size
    assert stream_of(source) == b"".join(source.layout.blocks(d.read))


def test_many_small_ranges_are_batched_and_still_the_layouts_bytes():
    """10,000 alternating 4 KiB data and zero ranges: batches are capped in records, not only in bytes."""
    from lvdeltafs.delta import Delta
    from lvdeltafs.extents import DATA, ZERO, Extents
    from tests.harness import MemoryReader
    n = 10_000
    target = text(2 * n * 4096, 12)
    ident = memory_delta(None, target, "", "vol@1").identity
    ext = Extents.from_ranges([i * 8192 for i in range(n)] + [i * 8192 + 4096 for i in range(n)],
                              [4096] * (2 * n), [DATA] * n + [ZERO] * n, len(target))
    d = Delta(ident, ext, MemoryReader(target))
    assert stream_of(DeltaStream(d)) == b"".join(DeltaStream(d).layout.blocks(d.read))


def apply_records(base: bytes, blob: bytes) -> bytes:
    out = bytearray(base)
    recs, reader = records(blob)
    out[reader.target_size:] = b""
    out += bytes(reader.target_size - len(out))
    for r in recs:
        if r.type in ("data", "zero"):
            out[r.offset:r.offset + r.length] = r.data if r.type == "data" else bytes(r.length)
    return bytes(out)


def test_compressed_stream_rebuilds_the_target_and_is_smaller():
    source = DeltaStream(memory_delta(OLD, NEW, "vol@1", "vol@2"), Policy("zlib"))
    blob = stream_of(source)
    assert blob[8:10] == b"\x02\x00"  # version 2
    assert apply_records(OLD, blob) == NEW
    recs, _ = records(blob)
    assert len(blob) < source.total * 0.6
    # the random part went raw: a DATA record, not an expanded COMPRESSED one
    assert source.counts.wire_data < source.counts.raw_data


@pytest.mark.parametrize("mode", ["off", "zlib"])
def test_resume_from_every_record_end_continues_the_same_stream(mode):
    """Cut after each record: the receiver's verifier state is all the sender needs to finish it."""
    d = memory_delta(OLD, NEW, "vol@1", "vol@2")
    whole = stream_of(DeltaStream(d, Policy(mode)))
    reader = StreamReader(io.BytesIO(whole))
    states = []
    for _rec in reader:
        if reader.target_size is not None and not reader.done:
            states.append(reader.state())
    for state in states:
        resume = Resume.from_reply({k: state[k] for k in Resume.__dataclass_fields__})
        # A different policy on the resumed run: the version held decides what may follow.
        other = Policy("off" if mode == "zlib" else "zlib")
        tail = stream_of(DeltaStream(d, other), state["position"], resume)
        blob = whole[:state["position"]] + tail
        assert apply_records(OLD, blob) == NEW
        rest = StreamReader(io.BytesIO(tail), resume=state)
        list(rest)
        assert rest.summary().stream_bytes == len(blob)


def test_resume_refuses_a_state_that_does_not_fit():
    d = memory_delta(OLD, NEW, "vol@1", "vol@2")
    with pytest.raises(ValueError):
        stream_of(DeltaStream(d), 100, None)
    with pytest.raises(ValueError):
        Resume.from_reply({"position": 1, "version": 3, "prev_end": 0, "nrec": 2, "ndata": 0, "nzero": 0,
                           "dbytes": 0, "zbytes": 0})
    with pytest.raises(ValueError):
        Resume.from_reply({"position": -1})


# ---------------------------------------------------------------- the policy


def run_policy(policy: Policy, seconds_per_mib: dict[bool, float], mib: int, depth: int = 4) -> dict:
    """Feed the policy batches of 1 MiB timed as a link would take them, observed ``depth`` batches after
    they were chosen (as the encoder's pipeline does); the bytes sent each way."""
    chosen = []
    for _ in range(mib):
        chosen.append(policy.choose(MiB))
        if len(chosen) > depth:
            way, run, place = chosen.pop(0)
            policy.observe(way, run, place, MiB, seconds_per_mib[way])
    return policy.sent


def NO_CPU():  # noqa: N802 (a constant-like stand-in): the host's CPU use, unknown
    return None


class FakeCpu:
    """The host's CPU counters, advancing by ``busy`` of each tick the policy reads them at."""

    def __init__(self, busy: float):
        self.busy, self.total = busy, 0

    def __call__(self) -> tuple[int, int]:
        self.total += 1000
        return int(self.total * (1 - self.busy)), self.total


def test_auto_compresses_while_the_link_is_the_bottleneck():
    sent = run_policy(Policy("auto", cpu=NO_CPU), {True: 0.01, False: 0.02}, 4096)  # compressed twice as fast
    assert sent[True] > 0.95 * sum(sent.values())


def test_auto_sends_raw_while_the_cpu_is_the_bottleneck_and_probes_rarely():
    sent = run_policy(Policy("auto", cpu=NO_CPU), {True: 0.02, False: 0.01}, 4096)  # compression costs time
    assert sent[True] < 0.05 * sum(sent.values())
    # the probes: the first run, then ones at longer and longer intervals (at most MAX_INTERVAL runs)
    probes = 1 + 6 + 4096 * MiB // (RUN_BYTES * MAX_INTERVAL)
    assert sent[True] <= probes * PROBE_BYTES


def test_auto_does_not_try_compression_while_the_cpu_is_all_busy():
    """The loopback, a LAN: sending raw already keeps the CPU busy, so compressing cannot help."""
    policy = Policy("auto", cpu=FakeCpu(busy=0.95))
    sent = run_policy(policy, {True: 0.005, False: 0.01}, 1024)  # even if it looked faster per batch
    assert sent[True] == 0


def test_auto_tries_compression_when_the_cpu_has_room():
    policy = Policy("auto", cpu=FakeCpu(busy=0.3))
    sent = run_policy(policy, {True: 0.005, False: 0.01}, 1024)
    assert sent[True] > 0.9 * sum(sent.values())


def test_auto_tries_compression_after_a_short_first_run():
    from lvmirror.compression import FIRST_BYTES
    sent = run_policy(Policy("auto", cpu=NO_CPU), {True: 0.01, False: 0.02}, 64)
    # Raw: the first run and what was in flight when compression won its probe; every byte after, compressed.
    assert sent[False] <= FIRST_BYTES + PROBE_BYTES and FIRST_BYTES < RUN_BYTES


@pytest.mark.parametrize("compressed_faster, mostly", [(1.05, False), (1.2, False), (1.4, True)])
def test_auto_changes_way_only_for_a_clear_gain(compressed_faster, mostly):
    """Within MARGIN (25%) the way in use stays: raw at first, so a 5% or 20% gain does not switch it."""
    sent = run_policy(Policy("auto", cpu=NO_CPU), {True: 0.01 / compressed_faster, False: 0.01}, 2048)
    assert (sent[True] > 0.9 * sum(sent.values())) is mostly


def test_auto_follows_a_link_that_changes():
    policy = Policy("auto", cpu=NO_CPU)
    run_policy(policy, {True: 0.02, False: 0.01}, 1024)
    before = policy.sent[True]
    run_policy(policy, {True: 0.01, False: 0.05}, 1024)  # the link got busy
    assert policy.sent[True] - before > 0.8 * 1024 * MiB


def test_modes():
    assert choose_mode("auto", local=True, far_codecs=["zlib"]) == "off"
    assert choose_mode("auto", local=False, far_codecs=["zlib"]) == "auto"
    assert choose_mode("zlib", local=True, far_codecs=["zlib"]) == "zlib"
    assert choose_mode("zlib", local=False, far_codecs=[]) == "off"  # an older far side: fall back
    assert choose_mode("zstd", local=False, far_codecs=["zlib"]) == "off"  # a far side without zstd
    assert choose_mode("auto", local=False, far_codecs=["zlib"]) == "auto"
    auto = policy_for("auto", local=False, far_codecs=["zlib", "zstd"])
    assert (auto.mode, auto.codec_name) == ("auto", "zstd") and "auto (zstd)" in auto.describe()
    assert policy_for("auto", local=False, far_codecs=["zlib"]).codec_name == "zlib"
    assert policy_for("zlib", local=False, far_codecs=["zlib", "zstd"]).codec_name == "zlib"
    assert not Policy("off").choose()[0] and Policy("zlib").choose()[0]
    with pytest.raises(ValueError):
        Policy("gzip")


def test_sample_ratio_spreads_over_the_data():
    data = image(64 * MiB, [(32 * MiB, 32 * MiB)], seed=5)  # zeros, then random
    ratio = sample_ratio([(0, 64 * MiB)], 64 * MiB, lambda o, n: data[o:o + n], sample_bytes=8 * MiB)
    assert 0.4 < ratio < 0.6  # half the pieces compress to nothing, half not at all
    assert sample_ratio([], 0, lambda o, n: b"") is None


# ---------------------------------------------------------------- through the real receiver


def test_compressed_sync_through_the_receiver(tmp_path):
    from lvmirror.pipelines import send
    from lvmirror.transports import LocalTransport
    dest = tmp_path / "mirror.img"
    dest.write_bytes(b"")
    with LocalTransport(str(dest)) as rc:
        rc.hello()
        init = memory_delta(None, OLD, "", "vol@1")
        send(rc, init, "init", compress="zlib")
        assert rc.bytes_sent < len(OLD) * 0.6
        rc.hello()
        send(rc, memory_delta(OLD, NEW, "vol@1", "vol@2"), "sync", compress="zlib")
        assert rc.hello().state["snapshot"] == "vol@2"
    assert sha_file(dest) == sha(NEW) and staging_files(dest) == []


def test_a_dry_run_estimates_the_compressed_size_and_times_the_cap_by_it():
    from lvmirror.pipelines import Outcome
    out = Outcome("web", "sync", "snap@2", 600 * MiB, 0, 12, dry_run=True, bwlimit=12 * MiB,
                  stream_bytes=600 * MiB + 4096, compress_ratio=0.5)
    assert out.summary() == ("web: sync would send 600.0 MiB of data in 12 ranges and 0 B of zeros; "
                             "compressed (estimated from a sample) the data would be about 300.0 MiB; "
                             "at the cap of 12.0 MiB/s sending 300.0 MiB takes about 25s")


def test_changed_runs_finds_the_differing_blocks_and_the_tail():
    from lvmirror.encoder import changed_runs
    base = bytearray(text(10 * 4096 + 100, 11))
    data = bytearray(base)
    for block in (0, 3, 4, 9):
        data[block * 4096 + 7] ^= 1
    assert changed_runs(bytes(data), bytes(base)) == [(0, 4096), (3 * 4096, 2 * 4096), (9 * 4096, 4096)]
    data[-1] ^= 1
    assert changed_runs(bytes(data), bytes(base))[-1] == (9 * 4096, 4096 + 100)
    assert changed_runs(bytes(base), bytes(base)) == []


def test_while_compressing_only_blocks_that_differ_from_the_base_are_sent():
    """A classic snapshot marks a whole chunk for any write: with the base readable, the rest stays home."""
    from lvdeltafs.delta import Delta
    from lvdeltafs.extents import DATA, Extents
    from tests.harness import MemoryReader, memory_delta
    ident = memory_delta(OLD, NEW, "vol@1", "vol@2").identity
    marked = Extents.from_ranges([0], [len(NEW)], DATA, len(NEW))  # everything marked changed

    def delta(base):
        return Delta(ident, marked, MemoryReader(NEW), base=base)
    same = sum(4096 for o in range(0, len(NEW), 4096) if NEW[o:o + 4096] == OLD[o:o + 4096])
    lean = DeltaStream(delta(MemoryReader(OLD)), Policy("zlib"))
    blob = stream_of(lean)
    assert apply_records(OLD, blob) == NEW
    assert lean.unchanged == same > 3 * MiB
    assert len(blob) < len(stream_of(DeltaStream(delta(None), Policy("zlib")))) / 2
    plain = DeltaStream(delta(MemoryReader(OLD)), Policy("off"))  # not compressing: everything marked
    assert apply_records(OLD, stream_of(plain)) == NEW and plain.unchanged == 0


# ---------------------------------------------------------------- reading ahead, the local pipe


class AdvisedReader:
    """A target in memory that records, in order, the ranges advised and the reads made."""

    def __init__(self, data: bytes):
        self.data, self.size = data, len(data)
        self.events: list[tuple[str, int, int]] = []

    def advise(self, offset: int, length: int) -> None:
        self.events.append(("advise", offset, length))

    def pread(self, offset: int, length: int) -> bytes:
        self.events.append(("read", offset, length))
        return self.data[offset:offset + length]

    def close(self) -> None:
        pass


def test_the_target_is_advised_ahead_of_every_read_and_never_too_far(monkeypatch):
    import dataclasses

    from lvmirror import encoder
    monkeypatch.setattr(encoder, "ADVISE_AHEAD", 4 * MiB)
    old = text(96 * MiB, 11)
    new = bytearray(old)
    for k in range(0, 96, 3):  # a changed MiB in every three: 32 ranges, 32 MiB of data
        new[k * MiB:(k + 1) * MiB] = text(MiB, 100 + k)
    delta = memory_delta(old, bytes(new), "vol@1", "vol@2")
    reader = AdvisedReader(bytes(new))
    source = DeltaStream(dataclasses.replace(delta, target=reader), workers=1)
    verify_stream(io.BytesIO(stream_of(source)))  # the same stream, a whole and valid one
    advised_to = read_to = 0  # stream order: offsets only grow
    for what, off, n in reader.events:
        if what == "advise":
            advised_to = max(advised_to, off + n)
        else:
            assert off + n <= advised_to, f"read at {off} before it was advised"
            read_to = off + n
            # The window: what is advised runs at most ADVISE_AHEAD, a batch and the batches in flight
            # (1 MiB of data each) past the reads; here data is a third of the target's bytes.
            assert advised_to - read_to <= 3 * (encoder.ADVISE_AHEAD + (encoder.DEPTH + 2) * MiB)
    advised = sum(n for what, _, n in reader.events if what == "advise")
    assert advised == 32 * MiB  # every data byte once: adjacent records' ranges joined


def test_the_pipe_to_a_local_receiver_holds_a_whole_frame(tmp_path):
    import fcntl

    from lvmirror.transports import PIPE_BYTES, LocalTransport
    with LocalTransport(str(tmp_path / "m.img")) as rc:
        rc.hello()
        assert fcntl.fcntl(rc.chan.w.fileno(), fcntl.F_GETPIPE_SZ) >= PIPE_BYTES


def test_a_generated_stream_goes_in_whole_frames_and_what_precedes_a_failed_read_still_goes(tmp_path):
    """Records come a head and a payload at a time; they leave in 1 MiB frames.  A read that fails
    midway still sends what was read before it, so the receiver keeps every whole record up to there."""
    from lvmirror.client import FRAME_BYTES
    from lvmirror.transports import LocalTransport
    dest = tmp_path / "m.img"
    with LocalTransport(str(dest)) as rc:
        rc.hello()
        d = memory_delta(None, NEW, "", "vol@1")
        stream = DeltaStream(d)
        frames: list[int] = []
        write_frame = rc.chan.write_frame
        rc.chan.write_frame = lambda data: (frames.append(len(data)), write_frame(data))[1]
        rc.send_delta(stream, d.identity.delta_id)
        assert frames[-1] == 0 and set(frames[:-2]) == {FRAME_BYTES} and sum(frames) == stream.size
        rc.apply()
    assert sha_file(dest) == sha(NEW)

    class FailsMidway:  # the snapshot goes away after 1.5 MiB of the stream
        def __init__(self, inner):
            self.inner, self.size = inner, inner.size

        def header(self):
            return self.inner.header()

        def read_from(self, offset, resume=None):
            sent = 0
            for blk in self.inner.read_from(offset, resume):
                if sent + len(blk) > FRAME_BYTES * 3 // 2:
                    raise OSError(5, "Input/output error")
                sent += len(blk)
                yield blk

    other = tmp_path / "other.img"
    islands = image(6 * MiB, [(i * 128 * 1024, 64 * 1024) for i in range(48)], seed=4)  # 64 KiB records
    with LocalTransport(str(other)) as rc:
        d = memory_delta(None, islands, "", "vol@1")
        with pytest.raises(OSError, match="Input/output"):
            rc.send_delta(FailsMidway(DeltaStream(d)), d.identity.delta_id)
        assert rc.hello().staged.verified > FRAME_BYTES * 5 // 4  # not just the whole frames
