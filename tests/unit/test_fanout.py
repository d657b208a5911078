"""The read-once reader of lvmirror.fanout: every consumer gets every byte, each piece read once."""

from __future__ import annotations

import dataclasses
import random
import threading
import time

import pytest

from lvmirror.compression import Policy
from lvmirror.encoder import DeltaStream
from lvmirror.fanout import ConsumerStream, Dropped, SharedRead
from tests.harness import MemoryReader, memory_delta

MiB = 1 << 20


class CountingReader(MemoryReader):
    """Counts every read (and every read of the same piece) the source is asked for; slow if told."""

    def __init__(self, data: bytes, delay: float = 0.0):
        super().__init__(data)
        self.delay = delay
        self.reads: dict[tuple[int, int], int] = {}
        self.lock = threading.Lock()

    def pread(self, offset: int, length: int) -> bytes:
        with self.lock:
            self.reads[(offset, length)] = self.reads.get((offset, length), 0) + 1
        if self.delay:
            time.sleep(self.delay)
        return super().pread(offset, length)


def sample(size: int = 24 * MiB, seed: int = 1):
    """A base of zeros and a target with large changed runs (several 1 MiB pieces each) and small ones."""
    rnd = random.Random(seed)
    old = bytes(size)
    new = bytearray(old)
    for i in range(size // (4 * MiB)):
        off = (i * 4 + 1) * MiB
        new[off:off + 2 * MiB + 12288] = rnd.randbytes(2 * MiB + 12288)
    for _ in range(30):
        off = rnd.randrange(0, size - 4096) // 4096 * 4096
        new[off:off + 100] = rnd.randbytes(100)
    return old, bytes(new)


def stream_of(delta, policy: str = "off") -> bytes:
    return b"".join(DeltaStream(delta, Policy(policy)).read_from(0))


def fan_out(delta, source, consumers, *, limit=8 * MiB, fail: dict | None = None, slow: dict | None = None):
    """Send ``delta`` to ``consumers`` (names) in threads over one SharedRead; the streams each got."""
    shared = SharedRead.for_stream(source, DeltaStream(delta), limit=limit)
    got: dict[str, bytes | BaseException] = {}
    cons = {name: shared.consumer(name) for name in consumers}

    def send(name):
        consumer = cons[name]
        stream = ConsumerStream(DeltaStream(dataclasses.replace(delta, target=consumer)), consumer)
        out = []
        try:
            for i, block in enumerate(stream.read_from(0)):
                if fail and name in fail and i == fail[name]:
                    raise ConnectionError(f"{name}: link cut")
                if slow and name in slow:
                    time.sleep(slow[name])
                out.append(block)
            got[name] = b"".join(out)
        except BaseException as e:
            got[name] = e
        finally:
            consumer.close()

    threads = [threading.Thread(target=send, args=(n,)) for n in consumers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a consumer hung"
    shared.close()
    return shared, got


def test_every_consumer_gets_every_byte_and_each_piece_is_read_once():
    old, new = sample()
    delta = memory_delta(old, new, "a@1", "a@2")
    expected = stream_of(delta)
    source = CountingReader(new)
    shared, got = fan_out(delta, source, ["a", "b", "c"])
    assert all(got[n] == expected for n in "abc")
    assert source.reads and set(source.reads.values()) == {1}
    assert shared.bytes_read == delta.extents.data_bytes and shared.extra_bytes == 0


def test_held_bytes_stay_bounded_while_one_consumer_is_slow():
    old, new = sample()
    delta = memory_delta(old, new, "a@1", "a@2")
    expected = stream_of(delta)
    source = CountingReader(new)
    shared, got = fan_out(delta, source, ["fast", "slow"], limit=4 * MiB, slow={"slow": 0.002})
    assert got["fast"] == got["slow"] == expected
    assert shared.peak <= 4 * MiB + MiB  # the limit and at most one piece over it
    assert set(source.reads.values()) == {1}


def test_a_failing_consumer_is_dropped_and_holds_the_others_back_no_longer():
    old, new = sample()
    delta = memory_delta(old, new, "a@1", "a@2")
    expected = stream_of(delta)
    source = CountingReader(new)
    # Small limit: were the failed one not dropped, the reader would wait for it forever.
    shared, got = fan_out(delta, source, ["ok", "cut", "ok2"], limit=2 * MiB, fail={"cut": 5})
    assert isinstance(got["cut"], ConnectionError)
    assert got["ok"] == got["ok2"] == expected
    assert set(source.reads.values()) == {1}


def test_each_consumer_may_compress_its_own_way():
    old, new = sample()
    delta = memory_delta(old, new, "a@1", "a@2")
    source = CountingReader(new)
    shared = SharedRead.for_stream(source, DeltaStream(delta))
    plain, packed = shared.consumer("plain"), shared.consumer("packed")
    out = {}

    def send(name, consumer, policy):
        stream = ConsumerStream(DeltaStream(dataclasses.replace(delta, target=consumer), Policy(policy)),
                                consumer)
        out[name] = b"".join(stream.read_from(0))

    threads = [threading.Thread(target=send, args=a) for a in (("plain", plain, "off"),
                                                                ("packed", packed, "zlib"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out["plain"] == stream_of(delta)
    assert out["packed"] == stream_of(delta, "zlib")
    assert set(source.reads.values()) == {1}


def test_a_read_error_reaches_every_consumer():
    old, new = sample(8 * MiB)
    delta = memory_delta(old, new, "a@1", "a@2")

    class Failing(CountingReader):
        def pread(self, offset, length):
            if offset >= 4 * MiB:
                raise OSError(5, "Input/output error")
            return super().pread(offset, length)

    shared, got = fan_out(delta, Failing(new), ["a", "b"])
    assert all(isinstance(got[n], OSError) and "Input/output" in str(got[n]) for n in "ab")


def test_a_dropped_consumer_is_told_so_and_a_piece_outside_the_order_is_still_served():
    old, new = sample(8 * MiB)
    delta = memory_delta(old, new, "a@1", "a@2")
    source = CountingReader(new)
    shared = SharedRead.for_stream(source, DeltaStream(delta))
    a = shared.consumer("a")
    off, n = shared.pieces[0]
    assert a.pread(off, n) == new[off:off + n]
    assert a.pread(off, n) == new[off:off + n]  # asked again: its own read, counted apart
    assert a.pread(3, 5) == new[3:8]
    assert shared.extra_bytes == n + 5
    a.close()
    with pytest.raises(Dropped):
        a.pread(*shared.pieces[1])
    shared.close()
