"""The hand-written YAML subset vaulttmpfs read bindings files with before it used PyYAML (issue 12),
kept verbatim as the reference for the tests: every document it accepted must read the same
through the strict PyYAML loader that replaced it."""

from __future__ import annotations

import re

from vaulttmpfs.errors import DriverError

_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*):(?: +|$)")
_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_.*-]*(?: +[A-Za-z0-9_.*-]+)*")
_TYPED = {"yes", "no", "true", "false", "on", "off", "null", "y", "n"}  # YAML would not read a string
_FLOW_ITEM = re.compile(r" *(\"[^\"\\]*\"|'[^']*'|[^ ,\[\]{}\"'#]+) *(,|$)")


def parse_yaml_subset(text: str, source: str = "YAML"):
    lines = []
    for number, raw in enumerate(text.split("\n"), 1):
        raw = raw[:-1] if raw.endswith("\r") else raw
        if not raw.isprintable():  # stricter than YAML: tabs and control characters anywhere
            raise _yaml_error(source, number, "tabs and control characters are not supported")
        body = _strip_comment(raw).rstrip(" ")
        indent = len(body) - len(body.lstrip(" "))
        if body.strip() and not (body == "---" and not lines):
            lines.append([indent, body.strip(), number])
    if not lines:
        raise _yaml_error(source, 1, "the document is empty")
    value, pos = _block(lines, 0, lines[0][0], source)
    if pos != len(lines):
        raise _yaml_error(source, lines[pos][2], "unexpected indentation or content")
    return value


def _yaml_error(source: str, number: int, why: str) -> DriverError:
    return DriverError(f"{source} line {number}: {why} (vaulttmpfs reads JSON and a simple YAML subset; "
                       "convert the file to JSON, e.g. with `yq -o json`)")


def _strip_comment(line: str) -> str:
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1] == " "):
            return line[:i]
    return line


def _is_item(text: str) -> bool:
    return text == "-" or text.startswith("- ")


def _block(lines: list, pos: int, indent: int, source: str):
    if _is_item(lines[pos][1]):
        return _sequence(lines, pos, indent, source)
    return _mapping(lines, pos, indent, source)


def _sequence(lines: list, pos: int, indent: int, source: str):
    items = []
    while pos < len(lines) and lines[pos][0] == indent and _is_item(lines[pos][1]):
        _, text, number = lines[pos]
        rest = text[1:].lstrip(" ")
        if not rest:
            pos += 1
            if pos < len(lines) and lines[pos][0] > indent:
                value, pos = _block(lines, pos, lines[pos][0], source)
            else:
                value = None
        elif _KEY.match(rest):  # "- key: value": a mapping whose first key sits after the dash
            lines[pos] = [indent + len(text) - len(rest), rest, number]
            value, pos = _mapping(lines, pos, lines[pos][0], source)
        else:
            value, pos = _value(rest, number, source), pos + 1
        items.append(value)
    return items, pos


def _mapping(lines: list, pos: int, indent: int, source: str):
    result = {}
    while pos < len(lines) and lines[pos][0] == indent:
        _, text, number = lines[pos]
        match = _KEY.match(text)
        if not match:
            raise _yaml_error(source, number, "expected `key: value`")
        key, rest = match.group(1), text[match.end():]
        if key.lower() in _TYPED:
            raise _yaml_error(source, number, f"key {key!r} would not be read as a string")
        if key in result:
            raise _yaml_error(source, number, f"duplicate key {key!r}")
        pos += 1
        if rest:
            result[key] = _value(rest, number, source)
        elif pos < len(lines) and (lines[pos][0] > indent or (lines[pos][0] == indent and _is_item(lines[pos][1]))):
            result[key], pos = _block(lines, pos, lines[pos][0], source)
        else:
            result[key] = None
    return result, pos


def _value(text: str, number: int, source: str):
    if not text.startswith("["):
        return _scalar(text, number, source)
    if not text.endswith("]"):
        raise _yaml_error(source, number, "a [list] must open and close on one line")
    inner, items, pos = text[1:-1], [], 0
    while inner.strip() and pos < len(inner):
        match = _FLOW_ITEM.match(inner, pos)
        if not match or (match.group(2) == "," and match.end() == len(inner)):
            raise _yaml_error(source, number, "unsupported [list] syntax")
        items.append(_scalar(match.group(1), number, source))
        pos = match.end()
    return items


def _scalar(text: str, number: int, source: str) -> str:
    if text[0] in "\"'":
        inner = text[1:-1]
        if len(text) < 2 or text[-1] != text[0] or text[0] in inner or "\\" in inner or not inner.isprintable():
            raise _yaml_error(source, number, f"unsupported quoted string {text!r} (no escapes or inner quotes)")
        return inner
    if not _PLAIN.fullmatch(text) or text.lower() in _TYPED:
        raise _yaml_error(source, number, f"quote the value {text!r}")
    return text
