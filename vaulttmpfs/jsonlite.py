"""json.loads/json.dumps for a kubelet call, on the stdlib's own C accelerator (`_json`) without the
`json` package.

`import json` imports re (json.decoder, json.scanner and json.encoder each compile a pattern at import),
and re imports enum and functools: ~5 ms of a brokered mount that has ~6 ms to spend beyond its start-up
(python -X importtime, docs/performance-flexvolume.md). The parsing and the escaping are not ours:
they are the C scanner and encoder `json` itself uses (`json.scanner.c_make_scanner`,
`json.encoder.c_make_encoder`), set up as json's defaults set them up. Anything they do not take as
json would (a document that is not valid JSON, a non-string key with an indent, no `_json` at all)
goes to `json` itself, so every error is json's own, word for word, and `json` loads only then.
"""

from __future__ import annotations

try:
    import _json
except ImportError:  # an interpreter without the accelerator: json's pure-Python code
    _json = None

_WHITESPACE = " \t\n\r"  # json's WHITESPACE pattern


class _Decoding:
    """What `json.JSONDecoder()` hands the C scanner: its defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__


def _not_serializable(value):
    raise TypeError(f"Object of type {value.__class__.__name__} is not JSON serializable")  # json's words


if _json is not None:
    _scan = _json.make_scanner(_Decoding())
    _string = _json.encode_basestring_ascii  # ensure_ascii=True, json's default
    _encoders: dict = {}


def loads(text: str | bytes | bytearray):
    """json.loads(text)."""
    if isinstance(text, (bytes, bytearray)) and b"\x00" not in text[:4] and not text.startswith(b"\xef\xbb\xbf"):
        text = text.decode("utf-8", "surrogatepass")  # what json.detect_encoding finds for such bytes
    if _json is None or not isinstance(text, str):
        import json  # other bytes (UTF-16/32, a BOM: json detects them), or no accelerator

        return json.loads(text)
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except Exception:  # noqa: BLE001 -- StopIteration, ValueError; SystemError when json.decoder is not loaded
        end = -1  # (3.11's scanner then has no JSONDecodeError to raise): json.loads says what it is
    if end < 0 or text[end:].strip(_WHITESPACE):
        import json  # not JSON: json's own error for it

        return json.loads(text)
    return value


def load(handle):
    """json.load(handle)."""
    return loads(handle.read())


def dumps(value, *, indent: int | None = None, separators: tuple[str, str] | None = None, default=None) -> str:
    """json.dumps(value, indent=..., separators=..., default=...); every other argument as json's default."""
    if _json is None or (indent is not None and default is not None):  # json indents what default returns
        import json

        return json.dumps(value, indent=indent, separators=separators, default=default)
    if indent is not None:
        return _indented(value, indent, separators or (",", ": "), default, 0)
    return "".join(_encoder(separators or (", ", ": "), default)(value, 0))


def _encoder(separators: tuple[str, str], default):
    key = (separators, default)
    found = _encoders.get(key)
    if found is None:
        # json.encoder.JSONEncoder.iterencode's c_make_encoder call (check_circular, allow_nan; no sort_keys,
        # no skipkeys), its floats included: the C encoder writes them as float.__repr__ does.
        found = _encoders[key] = _json.make_encoder({}, default or _not_serializable, _string, None, separators[1],
                                                    separators[0], False, False, True)
    return found


def _indented(value, indent: int, separators: tuple[str, str], default, level: int) -> str:
    # json's pure-Python layout for an indent (the C encoder has none), its leaves written by the C encoder.
    item_separator, key_separator = separators
    inner = "\n" + " " * (indent * (level + 1))
    if isinstance(value, dict) and value:
        if not all(isinstance(key, str) for key in value):
            import json  # json's key coercions (numbers, booleans, None)

            return json.dumps(value, indent=indent, separators=separators, default=default)
        items = [_string(key) + key_separator + _indented(item, indent, separators, default, level + 1)
                 for key, item in value.items()]
    elif isinstance(value, (list, tuple)) and value:
        items = [_indented(item, indent, separators, default, level + 1) for item in value]
    else:
        return "".join(_encoder((item_separator, key_separator), default)(value, 0))
    opening, closing = ("{", "}") if isinstance(value, dict) else ("[", "]")
    return opening + inner + (item_separator + inner).join(items) + "\n" + " " * (indent * level) + closing
