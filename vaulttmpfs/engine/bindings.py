"""Which policies a pod may ask for, by namespace and service account (VAULTTMPFS_POLICY_BINDINGS).

Without a bindings file any pod may ask for any policy the token role allows (the original
driver's behaviour). With one, a request outside it is refused before anything is mounted or
minted. `check` is pure; `load` reads the file the way sshd reads its config: root-owned,
writable by root only, or refused.

    {"bindings": [
      {"name": "shop apps",                 # optional, shown in refusals
       "namespaces": ["shop", "team-*"],    # default ["*"]; at least one of these two lists
       "service_accounts": ["*"],           # default ["*"]
       "policies": ["{namespace}-*", "common"]}]}

Patterns: `*` matches any run of characters, everything else is literal; in `policies`,
`{namespace}` and `{service_account}` stand for the pod's own. A pod gets a policy when some
binding covering its namespace and service account has a pattern matching it.

JSON always. YAML needs a parser vaulttmpfs does not ship (hvac/click/structlog bring none), so
only a small, strict subset is read: block mappings and sequences, one-line `[a, "b"]` lists,
quoted or plain scalars, comments. Anything beyond it (anchors, tags, multi-line strings,
`{...}`) is refused with the line number, never guessed at.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass

from ..errors import DriverError, Forbidden

MAX_BYTES = 256 * 1024
NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a DNS-1123 label
SERVICE_ACCOUNT = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_NAME_PATTERN = re.compile(r"[a-z0-9.*-]{1,253}")
_POLICY_PATTERN = re.compile(r"(?:[A-Za-z0-9._*-]|\{namespace\}|\{service_account\}){1,256}")
_TOKENS = re.compile(r"(\*|\{namespace\}|\{service_account\})")
_KEYS = {"name", "namespaces", "service_accounts", "policies"}


@dataclass(frozen=True)
class Binding:
    number: int
    name: str
    namespaces: tuple[str, ...]
    service_accounts: tuple[str, ...]
    policies: tuple[str, ...]

    def covers(self, namespace: str, service_account: str) -> bool:
        return (any(_match(p, namespace, {}) for p in self.namespaces)
                and any(_match(p, service_account, {}) for p in self.service_accounts))

    def allows(self, policy: str, namespace: str, service_account: str) -> bool:
        values = {"{namespace}": namespace, "{service_account}": service_account}
        return any(_match(p, policy, values) for p in self.policies)

    def describe(self) -> str:
        label = f"binding #{self.number}" + (f" {self.name!r}" if self.name else "")
        return (f"{label} (namespaces {', '.join(self.namespaces)}; service accounts "
                f"{', '.join(self.service_accounts)}) allows {', '.join(self.policies)}")


@dataclass(frozen=True)
class Bindings:
    source: str
    rules: tuple[Binding, ...]


def _match(pattern: str, value: str, values: dict[str, str]) -> bool:
    # Placeholders become their escaped value: a `*` can only ever come from the file itself.
    parts = _TOKENS.split(pattern)
    regex = "".join(".*" if p == "*" else re.escape(values.get(p, p)) for p in parts)
    return re.fullmatch(regex, value, re.DOTALL) is not None


def check(bindings: Bindings, namespace: str, service_account: str, policies: list[str]) -> str:
    """The binding(s) that allow the request, described; or a DriverError naming the rule."""
    who = f"service account {service_account!r} in namespace {namespace!r}"
    if not NAMESPACE.fullmatch(namespace or ""):
        raise DriverError(f"policy bindings ({bindings.source}) are in force but the pod's namespace "
                          f"{namespace!r} (option kubernetes.io/pod.namespace) is missing or not a namespace name")
    if not SERVICE_ACCOUNT.fullmatch(service_account or ""):
        raise DriverError(f"policy bindings ({bindings.source}) are in force but the pod's service account "
                          f"{service_account!r} (option kubernetes.io/serviceAccount.name) is missing or invalid")
    covering = [b for b in bindings.rules if b.covers(namespace, service_account)]
    if not covering:
        raise Forbidden(f"no policy binding in {bindings.source} covers {who}: it may not ask for "
                          f"{', '.join(policies)}; nothing was mounted")
    used = []
    for policy in policies:
        allowing = [b for b in covering if b.allows(policy, namespace, service_account)]
        if not allowing:
            rules = "; ".join(b.describe() for b in covering)
            raise Forbidden(f"policy {policy!r} is not bound to {who} by {bindings.source}: {rules}; "
                              "nothing was mounted")
        used.append(allowing[0].number)
    return ", ".join(f"binding #{n}" for n in sorted(set(used)))


# --- the file ---------------------------------------------------------------------------------

def load(path: str) -> Bindings:
    return parse(_read_trusted(path), path)


def _read_trusted(path: str) -> str:
    fix = f"fix it with: chown root:root {path} && chmod 644 {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise DriverError(f"cannot read VAULTTMPFS_POLICY_BINDINGS {path}: {exc.strerror}; "
                          "refusing every mount until it is readable") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise DriverError(f"policy bindings {path} is not a regular file")
        _require_root_only(path, info, fix)
        parent = os.path.dirname(os.path.realpath(path))
        _require_root_only(parent, os.stat(parent), f"fix it with: chown root {parent} && chmod go-w {parent}")
        data = handle.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise DriverError(f"policy bindings {path} is larger than {MAX_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DriverError(f"policy bindings {path} is not UTF-8 text (byte {exc.start})") from None


def _require_root_only(path: str, info: os.stat_result, fix: str) -> None:
    # Whoever can write this file decides which pod gets which policy: root only.
    if info.st_uid != 0 or info.st_mode & 0o022:
        raise DriverError(f"policy bindings {path} must be owned by root and not group/world-writable "
                          f"(owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}); {fix}")


def parse(text: str, source: str = "policy bindings") -> Bindings:
    if text.lstrip()[:1] in ("{", "["):  # JSON (any JSON document; YAML files start otherwise)
        try:
            document = json.loads(text, object_pairs_hook=_no_duplicates)
        except ValueError as exc:
            raise DriverError(f"{source}: not valid JSON: {exc}") from None
    else:
        document = parse_yaml_subset(text, source)
    return Bindings(source, _rules(document, source))


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    if duplicated:
        raise ValueError(f"duplicate key {duplicated[0]!r}")
    return dict(pairs)


def _rules(document, source: str) -> tuple[Binding, ...]:
    if not isinstance(document, dict) or set(document) != {"bindings"} or not isinstance(document["bindings"], list):
        raise DriverError(f'{source}: expected an object with exactly one key, "bindings", holding a list')
    return tuple(_rule(n, entry, source) for n, entry in enumerate(document["bindings"], 1))


def _rule(number: int, entry, source: str) -> Binding:
    where = f"{source}: binding #{number}"
    if not isinstance(entry, dict):
        raise DriverError(f"{where} is not an object")
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise DriverError(f"{where} has unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
    if "namespaces" not in entry and "service_accounts" not in entry:
        raise DriverError(f'{where} names neither "namespaces" nor "service_accounts" (use ["*"] to mean all)')
    name = entry.get("name", "")
    if not isinstance(name, str):
        raise DriverError(f'{where}: "name" must be a string')
    return Binding(number, name, _patterns(entry, "namespaces", _NAME_PATTERN, where),
                   _patterns(entry, "service_accounts", _NAME_PATTERN, where),
                   _patterns(entry, "policies", _POLICY_PATTERN, where, required=True))


def _patterns(entry: dict, key: str, shape: re.Pattern, where: str, required: bool = False) -> tuple[str, ...]:
    if key not in entry and not required:
        return ("*",)
    value = entry.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise DriverError(f'{where}: "{key}" must be a non-empty list of strings')
    for pattern in value:
        if not shape.fullmatch(pattern):
            raise DriverError(f'{where}: "{key}" has an invalid pattern {pattern!r}')
    return tuple(value)


# --- the YAML subset ----------------------------------------------------------------------------

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
