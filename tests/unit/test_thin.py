"""thin_delta and thin_dump parsing, on pool metadata made with thin_restore (no kernel needed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lvdeltafs.errors import BadInput, CommandFailed, UnsupportedFormat
from lvdeltafs.extents import DATA, ZERO
from lvdeltafs.sources import thin
from lvdeltafs.sources.thin import (
    parse_thin_delta,
    parse_thin_dump,
    thin_delta_extents,
    thin_mapped_extents,
    thin_tools_version,
)

pytestmark = pytest.mark.skipif(shutil.which("thin_restore") is None,
                                reason="needs thin-provisioning-tools (scripts/setup installs it)")

BLOCK = 128 * 512  # data_block_size="128"
MIB = 1 << 20

# Device 1 is the older snapshot, 2 the newer; block numbers in comments.
META_XML = """<superblock uuid="" time="1" transaction="1" data_block_size="128" nr_data_blocks="1024">
  <device dev_id="1" mapped_blocks="6" transaction="0" creation_time="0" snap_time="0">
    <range_mapping origin_begin="0" data_begin="0" length="4" time="0"/>
    <single_mapping origin_block="10" data_block="10" time="0"/>
    <single_mapping origin_block="60" data_block="11" time="0"/>
  </device>
  <device dev_id="2" mapped_blocks="7" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="2" time="0"/>
    <range_mapping origin_begin="2" data_begin="20" length="2" time="1"/>
    <single_mapping origin_block="7" data_block="6" time="1"/>
    <single_mapping origin_block="90" data_block="30" time="1"/>
    <single_mapping origin_block="91" data_block="31" time="1"/>
  </device>
</superblock>
"""
# same 0-1; different 2-3; left_only 10 and 60; right_only 7 and 90-91.


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    d = tmp_path_factory.mktemp("thin")
    (d / "meta.xml").write_text(META_XML)
    out = d / "meta.bin"
    out.write_bytes(b"")
    subprocess.run(["truncate", "-s", "4M", str(out)], check=True)
    subprocess.run(["thin_restore", "-i", str(d / "meta.xml"), "-o", str(out)], check=True,
                   capture_output=True)
    return str(out)


@pytest.fixture(autouse=True)
def fresh_tools_check(monkeypatch):
    """Each test starts with the once-per-process version check not yet made."""
    monkeypatch.setattr(thin, "_tools_verdict", None)


def test_every_tag(meta):
    ext = thin_delta_extents(meta, 1, 2, 128 * MIB, metadata_snap=False)
    assert ext.as_tuples() == [
        (2 * BLOCK, 2 * BLOCK, DATA),    # different
        (7 * BLOCK, BLOCK, DATA),        # right_only
        (10 * BLOCK, BLOCK, ZERO),       # left_only
        (60 * BLOCK, BLOCK, ZERO),       # left_only
        (90 * BLOCK, 2 * BLOCK, DATA),   # right_only
    ]


def test_verbose_output_gives_the_same(meta):
    out = subprocess.run(["thin_delta", "--verbose", "--thin1", "1", "--thin2", "2", meta],
                         capture_output=True, text=True, check=True).stdout
    assert "<range " in out
    plain = thin_delta_extents(meta, 1, 2, 128 * MIB, metadata_snap=False)
    assert parse_thin_delta(out.splitlines(), 128 * MIB, thin1=1, thin2=2) == plain


def test_shrunk_target_clips_left_only(meta):
    # The newer volume is 61 blocks less half a block: block 90 is gone, block 60 is cut.
    size = 61 * BLOCK - 4096
    ext = thin_delta_extents(meta, 1, 2, size, metadata_snap=False)
    assert ext.as_tuples()[-1] == (60 * BLOCK, BLOCK - 4096, ZERO)
    assert ext.end == size


def test_grown_target_keeps_right_only_past_the_old_end(meta):
    # Reverse direction: 2 is older, 1 newer; 90-91 become left_only (zeros) in a larger volume.
    ext = thin_delta_extents(meta, 2, 1, 256 * MIB, metadata_snap=False)
    assert (90 * BLOCK, 2 * BLOCK, ZERO) in ext.as_tuples()
    assert (10 * BLOCK, BLOCK, DATA) in ext.as_tuples()


def test_missing_device_is_a_clear_error(meta):
    with pytest.raises(CommandFailed, match="Unable to find mapping tree.*9.*thin ids"):
        thin_delta_extents(meta, 1, 9, MIB, metadata_snap=False)
    with pytest.raises(BadInput, match="thin device 9 is not in the pool"):
        thin_mapped_extents(meta, 9, MIB, False)


def test_metadata_snap_without_one(meta):
    with pytest.raises(CommandFailed, match="no current metadata snap"):
        thin_delta_extents(meta, 1, 2, MIB, metadata_snap=True)


def test_mapped_extents(meta):
    assert thin_mapped_extents(meta, 2, 128 * MIB, False).as_tuples() == [
        (0, 4 * BLOCK, DATA), (7 * BLOCK, BLOCK, DATA), (90 * BLOCK, 2 * BLOCK, DATA)]
    assert thin_mapped_extents(meta, 1, 11 * BLOCK, False).as_tuples() == [
        (0, 4 * BLOCK, DATA), (10 * BLOCK, BLOCK, DATA)]


def test_version_is_read():
    assert thin_tools_version() >= (0, 9, 0)


@pytest.mark.parametrize("version", ["1.0.0", "1.0.5", "thin_delta 1.0.3"])
def test_broken_versions_refused(monkeypatch, version):
    monkeypatch.setattr(thin, "run", lambda *a, **k: version + "\n")
    with pytest.raises(UnsupportedFormat, match="1.0.0 to 1.0.5.*1.0.6"):
        thin_tools_version()


@pytest.mark.parametrize("version", ["0.9.0", "1.0.6", "1.1.0"])
def test_good_versions_accepted(monkeypatch, version):
    monkeypatch.setattr(thin, "run", lambda *a, **k: version + "\n")
    assert thin_tools_version() == tuple(int(x) for x in version.split("."))


# ---- the version check on the paths that run the tools ----

REAL_THIN_DELTA = shutil.which("thin_delta")
REAL_THIN_DUMP = shutil.which("thin_dump")


def fake_tools(tmp_path: Path, monkeypatch, version: str, *, delegate: bool) -> Path:
    """thin_delta and thin_dump first on PATH, answering -V with ``version``; returns their call log.

    Other calls run the real tool if ``delegate``, else fail loudly.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for name, real in (("thin_delta", REAL_THIN_DELTA), ("thin_dump", REAL_THIN_DUMP)):
        rest = f'exec {real} "$@"' if delegate else 'echo "the real work ran" >&2; exit 99'
        script = bin_dir / name
        script.write_text(f"""#!/bin/sh
echo "{name} $*" >> {log}
case "$1" in -V|--version) echo "{version}"; exit 0;; esac
{rest}
""")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("version", ["1.0.0", "1.0.3", "thin_delta 1.0.5"])
def test_refused_version_stops_every_path_before_the_tool_runs(tmp_path, monkeypatch, meta, version):
    log = fake_tools(tmp_path, monkeypatch, version, delegate=False)
    for _ in range(2):  # refused every time it is asked, with the same error
        with pytest.raises(UnsupportedFormat, match=r"1\.0\.0 to 1\.0\.5.*install 1\.0\.6"):
            thin_delta_extents(meta, 1, 2, 128 * MIB, metadata_snap=False)
        with pytest.raises(UnsupportedFormat, match=r"1\.0\.0 to 1\.0\.5.*install 1\.0\.6"):
            thin_mapped_extents(meta, 2, 128 * MIB, False)
    # Asked once for the whole process; neither tool ever ran for real.
    assert calls(log) == ["thin_delta -V"]


def test_good_version_is_asked_once_then_the_tools_run(tmp_path, monkeypatch, meta):
    log = fake_tools(tmp_path, monkeypatch, "1.0.6", delegate=True)
    delta = thin_delta_extents(meta, 1, 2, 128 * MIB, metadata_snap=False)
    mapped = thin_mapped_extents(meta, 2, 128 * MIB, False)
    again = thin_delta_extents(meta, 1, 2, 128 * MIB, metadata_snap=False)
    assert delta == again
    assert (7 * BLOCK, BLOCK, DATA) in delta.as_tuples()
    assert mapped.as_tuples()[0] == (0, 4 * BLOCK, DATA)
    assert calls(log)[0] == "thin_delta -V"
    assert [c.split()[0] for c in calls(log)[1:]] == ["thin_delta", "thin_dump", "thin_delta"]
    assert "-V" not in " ".join(calls(log)[1:])


def test_installed_tools_pass_the_check(meta):
    assert thin_mapped_extents(meta, 1, 11 * BLOCK, False).as_tuples()[0] == (0, 4 * BLOCK, DATA)
    assert thin._tools_verdict == thin_tools_version() >= (0, 9, 0)


def test_tools_that_cannot_run_are_not_remembered(tmp_path, monkeypatch, meta):
    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(tmp_path))  # no thin tools at all
    with pytest.raises(CommandFailed, match="command not found"):
        thin_delta_extents(meta, 1, 2, MIB, metadata_snap=False)
    assert thin._tools_verdict is None
    monkeypatch.setenv("PATH", path)  # installed now: the next attempt checks again, and runs
    assert thin_delta_extents(meta, 1, 2, 128 * MIB, metadata_snap=False).as_tuples()
    assert thin._tools_verdict == thin_tools_version()


# ---- parsing edge cases from text ----

HEAD = '<superblock uuid="" time="1" transaction="2" data_block_size="8" nr_data_blocks="2048">'


def _delta(*body: str, left: int = 1, right: int = 2) -> list[str]:
    return [HEAD, f'  <diff left="{left}" right="{right}">', *body, "  </diff>", "</superblock>"]


def test_parse_plain_text():
    ext = parse_thin_delta(_delta('<same begin="0" length="16"/>', '<different begin="16" length="4"/>',
                                  '<left_only begin="20" length="2"/>'), 1 << 30, thin1=1, thin2=2)
    assert ext.as_tuples() == [(16 * 4096, 4 * 4096, DATA), (20 * 4096, 2 * 4096, ZERO)]


def test_parse_bytes_lines():
    lines = [x.encode() + b"\n" for x in _delta('<right_only begin="1" length="1"/>')]
    assert parse_thin_delta(lines, 1 << 30, thin1=1, thin2=2).as_tuples() == [(4096, 4096, DATA)]


@pytest.mark.parametrize(("body", "words"), [
    (['<moved begin="1" length="1"/>'], "unknown or misplaced element <moved>"),
    (['<different begin="x1" length="1"/>'], "not a decimal block number"),
    (['<different begin="-1" length="1"/>'], "not a decimal block number"),
    (['<different begin="01" length="1"/>'], "not a decimal block number"),
    (['<different begin="1" length="0"/>'], "length 0"),
    (['<different begin="1"/>'], "'length' is missing"),
    # Never closed: expat finds </diff> where </different> belongs.
    (['<different begin="1" length="1">'], "line 4 column 5 is not understood: mismatched tag"),
    (["<different begin=1 length=2/>"], "not understood"),
    (['<range begin="1" length="1"/>'], "misplaced element <range>"),
    (["garbage"], "not understood"),
])
def test_parse_rejects(body, words):
    with pytest.raises(BadInput, match=words):
        parse_thin_delta(_delta(*body), 1 << 30, thin1=1, thin2=2)


def test_parse_checks_ids():
    with pytest.raises(BadInput, match="between thin devices 1 and 3, but 1 and 2"):
        parse_thin_delta(_delta(right=3), 1 << 30, thin1=1, thin2=2)


def test_parse_rejects_truncated_output():
    with pytest.raises(BadInput, match="ended early"):
        parse_thin_delta(_delta('<different begin="1" length="1"/>')[:-2], 1 << 30, thin1=1, thin2=2)
    with pytest.raises(BadInput, match="ended early"):
        parse_thin_delta([HEAD, "</superblock>"], 1 << 30, thin1=1, thin2=2)


def test_parse_thin_dump_rejects_other_devices():
    lines = [HEAD, '<device dev_id="3" mapped_blocks="1" transaction="0" creation_time="0" snap_time="0">',
             '<single_mapping origin_block="0" data_block="0" time="0"/>', "</device>", "</superblock>"]
    with pytest.raises(BadInput, match="thin device 3 listed, but only 2"):
        parse_thin_dump(lines, 2, 1 << 30)


def test_parse_verbose_text():
    """0.9.0 --verbose: <range>s nested in the groups, with data_begin or left_/right_data_begin."""
    verbose = _delta(
        "<same>", '<range begin="0" data_begin="0" length="16"/>', "</same>",
        "<different>", '<range begin="16" left_data_begin="16" right_data_begin="99" length="4"/>',
        '<range begin="30" left_data_begin="30" right_data_begin="120" length="1"/>', "</different>",
        "<left_only>", '<range begin="20" data_begin="20" length="2"/>', "</left_only>",
        "<right_only>", '<range begin="40" data_begin="7" length="8"/>', "</right_only>")
    plain = _delta('<same begin="0" length="16"/>', '<different begin="16" length="4"/>',
                   '<different begin="30" length="1"/>', '<left_only begin="20" length="2"/>',
                   '<right_only begin="40" length="8"/>')
    ext = parse_thin_delta(verbose, 1 << 30, thin1=1, thin2=2)
    assert ext == parse_thin_delta(plain, 1 << 30, thin1=1, thin2=2)
    assert ext.as_tuples() == [(16 * 4096, 4 * 4096, DATA), (20 * 4096, 2 * 4096, ZERO),
                               (30 * 4096, 4096, DATA), (40 * 4096, 8 * 4096, DATA)]


@pytest.mark.parametrize(("body", "words"), [
    (["<same>", '<different begin="1" length="1"/>', "</same>"], "<different> inside <same>"),
    (["<same>", "<same>", "</same>", "</same>"], "<same> inside <same>"),
    (['<different begin="1" length="1">', '<range begin="1" length="1"/>', "</different>"],
     "misplaced element <range> inside a range"),
    (["<left_only>", '<range begin="1" length="1">', '<range begin="2" length="1"/>', "</range>",
      "</left_only>"], "misplaced element <range> inside a range"),
    (["<different>", '<range begin="1"/>', "</different>"], "'length' is missing"),
    (["<different>", '<range begin="1" length="0"/>', "</different>"], "length 0"),
    (["<different/>"], r"line 3 column \d+: <different> has neither begin and length nor <range>s"),
    (["<right_only>", "</right_only>"], "neither begin and length nor <range>s"),
    (["<different>", '<same begin="1" length="1"/>', "</different>"], "<same> inside <different>"),
])
def test_parse_rejects_bad_verbose_nesting(body, words):
    with pytest.raises(BadInput, match=words):
        parse_thin_delta(_delta(*body), 1 << 30, thin1=1, thin2=2)


@pytest.mark.parametrize(("body", "words"), [
    # What XML allows but the tools never write, refused as the line scanner refused it.
    (["<!-- a comment -->"], "line 3 column 1 is not understood: a comment"),
    (["<?tool data?>"], "not understood: a processing instruction"),
    (["<![CDATA[ ]]>"], "not understood: a CDATA section"),
    (['<different begin="&#49;" length="1"/>'], "line 3 column 1 is not understood: a character reference"),
    (['<different begin="&amp;" length="1"/>'], r"begin='&' is not a decimal block number"),
    (["&amp;"], "not understood: text '&'"),
    (['<different begin="&nbsp;" length="1"/>'], "not understood: undefined entity"),
    # Numbers int() would take but the tools never write.
    (['<different begin="+1" length="1"/>'], "not a decimal block number"),
    (['<different begin=" 1" length="1"/>'], "not a decimal block number"),
    (['<different begin="1_0" length="1"/>'], "not a decimal block number"),
    (['<different begin="\u0661" length="1"/>'], "not a decimal block number"),
    (['<different begin="123456789012345678901" length="1"/>'], "not a decimal block number"),
    # Malformed XML: expat's reason, with line and column.
    (['<different begin="1" length="1" begin="2"/>'],
     "line 3 column 33 is not understood: duplicate attribute"),
    (["<different begin='1' length=1/>"], "line 3 column 29 is not understood: not well-formed"),
    (["</same>"], "line 3 column 3 is not understood: mismatched tag"),
    (["<diff:erent/>"], "unknown or misplaced element <diff:erent>"),
])
def test_parse_refuses_what_the_tools_never_write(body, words):
    with pytest.raises(BadInput, match=words):
        parse_thin_delta(_delta(*body), 1 << 30, thin1=1, thin2=2)


def test_parse_refuses_prologue_and_trailer():
    good = _delta('<different begin="1" length="1"/>')
    with pytest.raises(BadInput, match="line 1 column 1 is not understood: an XML declaration"):
        parse_thin_delta(['<?xml version="1.0"?>', *good], 1 << 30, thin1=1, thin2=2)
    with pytest.raises(BadInput, match="not understood: a DOCTYPE"):
        parse_thin_delta(['<!DOCTYPE superblock [<!ENTITY n "1">]>', *good], 1 << 30, thin1=1, thin2=2)
    with pytest.raises(BadInput, match="line 6 column 1 is not understood: junk after document element"):
        parse_thin_delta([*good, HEAD], 1 << 30, thin1=1, thin2=2)
    with pytest.raises(BadInput, match="line 6 column 1 is not understood: junk after document element"):
        parse_thin_delta([*good, "trailing words"], 1 << 30, thin1=1, thin2=2)


def test_parse_names_the_line_of_stray_text():
    lines = _delta('<different begin="1" length="1"/>', "", "  garbage here  ", "", "")
    with pytest.raises(BadInput, match="thin_delta output line 5 is not understood: text 'garbage here' "):
        parse_thin_delta(lines, 1 << 30, thin1=1, thin2=2)


def test_parse_refuses_bytes_that_are_not_utf8():
    lines = [x.encode() for x in _delta('<different begin="1" length="1"/>')]
    lines.insert(2, b'<same begin="0" length="1" note="\xff"/>')
    with pytest.raises(BadInput, match="line 3 column 34 is not understood: not well-formed"):
        parse_thin_delta(lines, 1 << 30, thin1=1, thin2=2)


def test_parse_takes_elements_however_the_lines_are_broken():
    one_line = "".join(_delta('<same begin="0" length="2"/>', "<right_only>",
                              '<range begin="5" data_begin="9" length="3"/>', "</right_only>"))
    assert parse_thin_delta([one_line], 1 << 30, thin1=1, thin2=2).as_tuples() == [(5 * 4096, 3 * 4096, DATA)]


# Plain and --verbose ranges side by side, which the parser takes as it always did.
DELTA_DOC = "".join(f"{line}\n" for line in _delta(
    '<same begin="0" length="16"/>', '<different begin="16" length="4"/>',
    '<left_only begin="20" length="2"/>',
    "<right_only>", '<range begin="40" data_begin="7" length="8"/>', "</right_only>")).encode()


def test_chunks_split_anywhere_give_the_same():
    want = parse_thin_delta(DELTA_DOC.splitlines(), 1 << 30, thin1=1, thin2=2)
    for cut in range(1, len(DELTA_DOC)):
        chunks = [DELTA_DOC[:cut], DELTA_DOC[cut:]]
        assert thin._delta_from_chunks(chunks, 1 << 30, 1, 2) == want, cut
    one_byte = [DELTA_DOC[i:i + 1] for i in range(len(DELTA_DOC))]
    assert thin._delta_from_chunks(one_byte, 1 << 30, 1, 2) == want


def test_character_reference_split_across_chunks_is_refused():
    doc = DELTA_DOC.replace(b'begin="16"', b'begin="&#49;6"')
    amp = doc.index(b"&#")
    for cut in (amp, amp + 1, amp + 2):
        with pytest.raises(BadInput, match="line 4 column 1 is not understood: a character reference"):
            thin._delta_from_chunks([doc[:cut], doc[cut:]], 1 << 30, 1, 2)


def test_every_truncation_is_refused():
    end = len(DELTA_DOC.rstrip())
    for cut in range(end):
        with pytest.raises(BadInput, match="ended early"):
            thin._delta_from_chunks([DELTA_DOC[:cut]], 1 << 30, 1, 2)


def test_truncated_output_says_where_it_stops():
    lines = _delta('<different begin="1" length="1"/>')[:-2]
    with pytest.raises(BadInput, match=r"ended early \(no complete <diff left=\"1\" right=\"2\">.*\); "
                                       "the XML stops at line 4 column 1: no element found"):
        parse_thin_delta(lines, 1 << 30, thin1=1, thin2=2)


@given(st.one_of(st.text(max_size=24), st.from_regex(r"\A[0-9]{1,22}\Z")))
def test_decimal_is_the_regex_it_replaced(value):
    assert thin._decimal(value) == bool(re.fullmatch(r"0|[1-9][0-9]{0,19}", value))


def test_pipe_path_streams_a_large_output_in_chunks(tmp_path):
    n = 50_000  # several MiB, so the parser gets many pipe reads
    body = [f'<range begin="{3 * i}" left_data_begin="{i}" right_data_begin="{i}" length="2"/>'
            for i in range(n)]
    doc = tmp_path / "delta.xml"
    doc.write_text("\n".join(_delta("<different>", *body, "</different>")) + "\n")
    assert doc.stat().st_size > 20 * thin.CHUNK
    ext = thin._stream(["cat", str(doc)], lambda out: thin._delta_from_chunks(out, 1 << 40, 1, 2), 60, "")
    assert len(ext.as_tuples()) == n
    assert ext.as_tuples()[-1] == (3 * (n - 1) * 4096, 2 * 4096, DATA)


# ---- thin_dump ----

DUMP_HEAD = ('<superblock uuid="" time="1" transaction="1" flags="0" version="1" data_block_size="128" '
             'nr_data_blocks="1024">')
DEVICE = '<device dev_id="2" mapped_blocks="7" transaction="0" creation_time="0" snap_time="1">'


def _dump(*body: str) -> list[str]:
    return [DUMP_HEAD, DEVICE, *body, "</device>", "</superblock>"]


def test_parse_thin_dump_text():
    lines = _dump('<range_mapping origin_begin="0" data_begin="0" length="2" time="0"/>',
                  '<single_mapping origin_block="7" data_block="6" time="1"/>')
    assert parse_thin_dump(lines, 2, 1 << 30).as_tuples() == [(0, 2 * BLOCK, DATA), (7 * BLOCK, BLOCK, DATA)]


@pytest.mark.parametrize(("lines", "words"), [
    (_dump('<range_mapping origin_begin="0" data_begin="0"/>'), "'length' is missing"),
    (_dump('<single_mapping origin_block="x" data_block="6"/>'), "origin_block='x' is not a decimal"),
    (_dump('<def name="0"/>'), "line 3 column 1: unknown or misplaced element <def>"),
    (_dump(DEVICE, "</device>"), "misplaced element <device>"),
    (_dump('<single_mapping origin_block="1" data_block="6">',
           '<single_mapping origin_block="2" data_block="7"/>', "</single_mapping>"),
     "misplaced element <single_mapping> inside a mapping"),
    ([DUMP_HEAD, '<single_mapping origin_block="1" data_block="6"/>', "</superblock>"],
     "misplaced element <single_mapping>"),
    ([DEVICE, "</device>"], "misplaced element <device>"),
    (_dump("<!-- x -->"), "not understood: a comment"),
    (_dump()[:-1], "thin_dump output ended early"),
])
def test_parse_thin_dump_rejects(lines, words):
    with pytest.raises(BadInput, match=words):
        parse_thin_dump(lines, 2, 1 << 30)


# ---- MetadataSnapshot, with dmsetup faked ----

class FakeDmsetup:
    def __init__(self, held: bool = False):
        self.held = held
        self.calls: list[str] = []

    def __call__(self, argv, **kw):
        what = argv[-1]
        self.calls.append(f"{argv[2]} {what}")
        if what == "release_metadata_snap":
            if not self.held:
                raise CommandFailed(argv, 1, f"device-mapper: message ioctl on {argv[2]}  failed: "
                                             "Invalid argument")
            self.held = False
        elif what == "reserve_metadata_snap":
            if self.held:
                raise CommandFailed(argv, 1, "device-mapper: message ioctl failed: Device or resource busy")
            self.held = True
        return ""


def test_metadata_snapshot_releases_stale_and_own(monkeypatch):
    fake = FakeDmsetup(held=True)
    monkeypatch.setattr(thin, "run", fake)
    with thin.MetadataSnapshot("vg-pool") as snap:
        assert fake.held and snap.target == "vg-pool-tpool"
    assert not fake.held
    assert fake.calls == ["vg-pool-tpool release_metadata_snap", "vg-pool-tpool reserve_metadata_snap",
                          "vg-pool-tpool release_metadata_snap"]


def test_metadata_snapshot_released_on_error(monkeypatch):
    fake = FakeDmsetup()
    monkeypatch.setattr(thin, "run", fake)
    with pytest.raises(RuntimeError), thin.MetadataSnapshot("vg-pool-tpool"):
        raise RuntimeError("boom")
    assert not fake.held


def test_metadata_snapshot_released_on_sigterm(monkeypatch):
    import os
    import signal

    fake = FakeDmsetup()
    monkeypatch.setattr(thin, "run", fake)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info, thin.MetadataSnapshot("vg-pool"):
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 0.1)  # let the handler run
    assert info.value.code == 128 + signal.SIGTERM
    assert not fake.held
    assert signal.getsignal(signal.SIGTERM) is before


def test_metadata_snapshot_other_release_failures_surface(monkeypatch):
    def broken(argv, **kw):
        raise CommandFailed(argv, 1, "device-mapper: message ioctl failed: No such device or address")

    monkeypatch.setattr(thin, "run", broken)
    with pytest.raises(CommandFailed, match="No such device"), thin.MetadataSnapshot("vg-pool"):
        pass


def test_metadata_snapshot_is_one_holder_per_pool_at_a_time(tmp_path, monkeypatch):
    """Two holders of one pool take turns, so one's stale-release cannot pull the other's snapshot.

    The dmsetup messages are recorded instead of sent: the host has no
    device-mapper (the VM tests send them for real).
    """
    import threading
    import time

    from lvdeltafs.sources.thin import MetadataSnapshot

    log: list[str] = []
    monkeypatch.setattr(MetadataSnapshot, "_message", lambda self, what: log.append(what))
    first_in = threading.Event()

    def hold(name: str) -> None:
        with MetadataSnapshot("vg-pool", lock_dir=str(tmp_path)):
            log.append(f"{name} in")
            first_in.set()
            time.sleep(0.3)
            log.append(f"{name} out")

    a = threading.Thread(target=hold, args=("a",))
    a.start()
    first_in.wait(5)
    b = threading.Thread(target=hold, args=("b",))
    b.start()
    a.join()
    b.join()
    assert log == ["release_metadata_snap", "reserve_metadata_snap", "a in", "a out", "release_metadata_snap",
                   "release_metadata_snap", "reserve_metadata_snap", "b in", "b out", "release_metadata_snap"]


def test_a_block_number_past_any_device_is_refused_not_an_overflow():
    lines = _delta(f'<different begin="{1 << 64}" length="1"/>')
    with pytest.raises(BadInput, match="past any device's size"):
        parse_thin_delta(lines, 1 << 20, thin1=1, thin2=2)
