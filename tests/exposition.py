"""The Prometheus text exposition format (version 0.0.4), checked line by line: what the metrics tests
read the metrics file back with."""

from __future__ import annotations

import re

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
FLOAT = re.compile(r"[+-]?(Inf|NaN|[0-9]*\.?[0-9]+([eE][+-]?[0-9]+)?|[0-9]+\.)")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def parse_exposition(text: str) -> dict[str, dict]:
    """The families in a text-format file, checked against the format's rules (version 0.0.4).

    Lines end with a line feed; ``# HELP name text`` and ``# TYPE name type`` at most once per
    family, TYPE before its first sample; a family's samples together (never interleaved with
    another's); label values quoted with only \\\\, \\" and \\n escaped; values as Go floats; no
    label set twice.
    """
    assert text.endswith("\n"), "the last line must end with a line feed"
    families: dict[str, dict] = {}
    closed: set[str] = set()
    current = None
    for line in text[:-1].split("\n"):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                assert METRIC_NAME.fullmatch(name), line
                fam = families.setdefault(name, {"help": None, "type": None, "samples": {}})
                key = parts[1].lower()
                assert fam[key] is None, f"second {parts[1]} for {name}"
                assert not fam["samples"], f"{parts[1]} after samples of {name}"
                value = parts[3] if len(parts) > 3 else ""
                if key == "type":
                    assert value in TYPES, line
                else:
                    assert not re.search(r"\\[^\\n]", value), line
                fam[key] = value
            continue
        match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? ([^ ]+)( [0-9-]+)?$", line)
        assert match, f"not a sample line: {line!r}"
        name, labels_text, value = match.group(1), match.group(2) or "", match.group(3)
        assert FLOAT.fullmatch(value), line
        fam = families.get(name)
        assert fam is not None and fam["type"] is not None, f"sample of {name} before its TYPE"
        if current != name:
            assert name not in closed, f"samples of {name} are not together"
            if current:
                closed.add(current)
            current = name
        labels = _labels(labels_text[1:-1]) if labels_text else ()
        assert labels not in fam["samples"], f"{name}{labels} twice"
        fam["samples"][labels] = float(value.replace("Inf", "inf"))
    return families


def _labels(text: str) -> tuple[tuple[str, str], ...]:
    out, i = [], 0
    while i < len(text):
        m = LABEL_NAME.match(text, i)
        assert m and text[m.end():m.end() + 2] == '="', text
        name, i = m.group(), m.end() + 2
        value = []
        while text[i] != '"':
            if text[i] == "\\":
                esc = text[i + 1]
                assert esc in '\\"n', f"bad escape \\{esc} in {text!r}"
                value.append("\n" if esc == "n" else esc)
                i += 2
            else:
                assert text[i] != "\n"
                value.append(text[i])
                i += 1
        out.append((name, "".join(value)))
        i += 1
        if i < len(text):
            assert text[i] == ",", text
            i += 1
    assert len({n for n, _ in out}) == len(out), f"a label twice in {text!r}"
    return tuple(out)
