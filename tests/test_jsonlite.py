"""vaulttmpfs.jsonlite is json: the same values from the same text, the same text from the same values,
the same errors (it runs the stdlib's C scanner and encoder, and hands anything else to json)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from vaulttmpfs import jsonlite

from .vaultserver import REPO

DOCUMENTS = [
    {}, [], "", 0, -1.5e300, 1e-7, True, None, "caf\u00e9 \u2603 \U0001f600 \"q\" \\ \n\t\x00",
    {"a": [1, 2.5, {"b": None, "c": [True, False]}], "d": {}, "e": [], "f": "x"},
    {"request_id": "3f1c", "wrap_info": {"token": "hvs.CAES", "ttl": 300, "creation_time": "2026-12-02T05:00:00Z",
                                         "accessor": "a1", "wrapped_accessor": "a2"}, "metadata": {"pod": "web"}},
    [[[[]]], [{}], [{"": ""}]], float("inf"), float("-inf"),
]


@pytest.mark.parametrize("value", DOCUMENTS, ids=range(len(DOCUMENTS)))
def test_the_same_text_and_values_as_json(value):
    for kwargs in ({}, {"indent": 2}, {"separators": (",", ":")}, {"indent": 4, "separators": (",", ": ")}):
        text = jsonlite.dumps(value, **kwargs)
        assert text == json.dumps(value, **kwargs)
        assert repr(jsonlite.loads(text)) == repr(json.loads(text))
    assert jsonlite.load(io.StringIO(json.dumps(value))) == json.loads(json.dumps(value)) or value != value


def test_nan_and_the_default_hook_as_json():
    assert jsonlite.dumps([float("nan")]) == "[NaN]" and jsonlite.loads("NaN") != jsonlite.loads("NaN")
    assert jsonlite.dumps({"e": ValueError("x")}, default=repr) == json.dumps({"e": ValueError("x")}, default=repr)
    assert jsonlite.dumps({1: "a", None: 2}, indent=2) == json.dumps({1: "a", None: 2}, indent=2)
    with pytest.raises(TypeError, match="Object of type object is not JSON serializable"):
        jsonlite.dumps({"o": object()})


@pytest.mark.parametrize("text", ["", " ", "{", '{"a": 1} x', "[1,]", "\ufeff{}", '{"a" 1}', "nul", '"\\x"', "01"])
def test_the_same_errors_as_json(text):
    with pytest.raises(ValueError) as expected:
        json.loads(text)
    with pytest.raises(type(expected.value)) as got:
        jsonlite.loads(text)
    assert str(got.value) == str(expected.value)


def test_bytes_and_whitespace_around_a_document():
    assert jsonlite.loads(b' {"a": "\xc3\xa9"}\n') == {"a": "\u00e9"}
    assert jsonlite.loads('\n\t {"a": 1} \r\n') == {"a": 1}


def test_loading_it_loads_neither_json_nor_re():
    code = ("import sys; from vaulttmpfs import jsonlite; jsonlite.loads(jsonlite.dumps({'a': [1]}, indent=2)); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('json', 're', 'enum')))")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("text", ['{"a": 1', "{not json", '["\\x"]', "[1] 2"])
def test_an_error_before_json_is_loaded_is_still_json_s(text):
    """Without json.decoder in sys.modules, 3.11's C scanner cannot raise JSONDecodeError (a SystemError):
    the call still gets json's own error."""
    code = ("import sys; from vaulttmpfs import jsonlite\ntry:\n    jsonlite.loads(sys.argv[1])\n"
            "except ValueError as exc:\n    print(type(exc).__name__, exc)")
    got = subprocess.run([sys.executable, "-S", "-c", code, text], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout.strip()
    with pytest.raises(ValueError) as expected:
        json.loads(text)
    assert got == f"{type(expected.value).__name__} {expected.value}"
