"""Which policies a pod may ask for, by namespace and service account (VAULTTMPFS_POLICY_BINDINGS).

Without a bindings file any pod may ask for any policy the token role allows (the original
driver's behaviour). With one, a request outside it is refused before anything is mounted or
minted. `check` is pure; `load` reads the file the way sshd reads its config: root-owned,
writable by root only, in directories only root can change, or refused.

    {"bindings": [
      {"name": "shop apps",                 # optional, shown in refusals
       "namespaces": ["shop", "team-*"],    # default ["*"]; at least one of these two lists
       "service_accounts": ["*"],           # default ["*"]
       "policies": ["{namespace}.*", "common"]}]}

Patterns: `*` matches any run of characters, everything else is literal; in `policies`,
`{namespace}` and `{service_account}` stand for the pod's own. A pod gets a policy when some
binding covering its namespace and service account has a pattern matching it. A placeholder must
end the pattern or be followed by a character its names never contain ('.' or '_' after
{namespace}, '_' after {service_account}), and no `*` may come before it: `{namespace}-*` would
give namespace `team` the policies of namespace `team-a`, so it is refused, not guessed at.

JSON, or YAML read by PyYAML with a strict safe loader: no duplicate keys, no aliases or merge
keys, and no scalar that YAML reads as anything but a string (`yes`, `1.5`, `~`: quote them).
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass

from .. import trust
from ..errors import DriverError, Forbidden

MAX_BYTES = 256 * 1024
NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a DNS-1123 label
SERVICE_ACCOUNT = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_NAME_PATTERN = re.compile(r"[a-z0-9.*-]{1,253}")
_POLICY_PATTERN = re.compile(r"(?:[A-Za-z0-9._*-]|\{namespace\}|\{service_account\}){1,256}")
_TOKENS = re.compile(r"(\*|\{namespace\}|\{service_account\})")
# What may follow a placeholder: a character no substituted name can hold, so the name's end is certain.
_SEPARATORS = {"{namespace}": "._", "{service_account}": "_"}
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
        # Every directory and symlink on the way, as given, like sshd: a writable one lets its owner swap the dir.
        fd = trust.open_file(path, f"policy bindings {path}", os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise DriverError(f"cannot read VAULTTMPFS_POLICY_BINDINGS {path}: {exc.strerror}; "
                          "refusing every mount until it is readable") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise DriverError(f"policy bindings {path} is not a regular file")
        _require_root_only(path, info, fix)
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
        document = load_yaml(text, source)
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
        if key == "policies":
            _require_unambiguous(pattern, where)
    return tuple(value)


def _require_unambiguous(pattern: str, where: str) -> None:
    """A policy pattern must decide whose policy a name is: `{namespace}-*` gives namespace `team`
    everything of namespace `team-a` (`team-a-db` is `team` + `-a-db`), so it is refused."""
    parts = [p for p in _TOKENS.split(pattern) if p]
    for i, part in enumerate(parts):
        if part not in _SEPARATORS:
            continue
        if "*" in parts[:i]:
            raise DriverError(f"{where}: policy pattern {pattern!r} has a `*` before {part}: the `*` could "
                              f"take in part of another name; put {part} before any `*`")
        after = parts[i + 1][:1] if i + 1 < len(parts) else ""
        if after and after not in _SEPARATORS[part]:
            allowed = " or ".join(repr(c) for c in _SEPARATORS[part])
            fixed = part + _SEPARATORS[part][0] + (after if after in "*{" else "")
            raise DriverError(
                f"{where}: policy pattern {pattern!r} lets one pod claim another's policies: {part} is "
                f"followed by {after!r}, which could continue a longer name (namespace 'team' would match the "
                f"policies of 'team-a'); end the pattern there or follow {part} with {allowed}, e.g. "
                f"{pattern.replace(part + after, fixed, 1)!r}")


# --- YAML ------------------------------------------------------------------------------------

def load_yaml(text: str, source: str = "YAML"):
    """One YAML document through the strict loader; errors name the line."""
    import yaml

    loader = _strict_loader()(text)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        raise DriverError(f"{source}: not valid bindings YAML: {_yaml_message(exc)}") from None
    except yaml.YAMLError as exc:
        raise DriverError(f"{source}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def _yaml_message(exc) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + " ".join(p for p in (exc.context, exc.problem) if p)


_LOADER = None


def _strict_loader():
    """yaml.SafeLoader, minus what lets a file mean two things: duplicate keys (YAML keeps the last,
    hiding a line), scalars that are not strings, aliases and merge keys. Built once, on first use (PyYAML is
    imported only when a bindings file is YAML)."""
    global _LOADER
    if _LOADER is not None:
        return _LOADER
    import yaml
    from yaml.constructor import ConstructorError

    class StrictLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise ConstructorError(None, None, "aliases (*name) are not supported", event.start_mark)
            return super().compose_node(parent, index)

        def construct_object(self, node, deep=False):
            # Every scalar of a bindings file is a name or a pattern: `yes`, `on`, `1.5`, `~` would
            # silently become something else.
            value = super().construct_object(node, deep=deep)
            # (An empty value, `key:` with nothing after it, stays None: the checks below name the key.)
            if isinstance(node, yaml.ScalarNode) and not isinstance(value, str) and node.value != "":
                raise ConstructorError(None, None, f"{node.value!r} is read by YAML as {type(value).__name__} "
                                       f"{value!r}, not a string: quote it", node.start_mark)
            return value

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _value in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise ConstructorError(None, None, "merge keys (<<) are not supported", key_node.start_mark)
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    _LOADER = StrictLoader
    return _LOADER
