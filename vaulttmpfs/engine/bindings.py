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
give namespace `team` the policies of namespace `team-a`, so it is refused, not guessed at. Across
the whole file, two patterns that read a pod's identity differently may not both produce one name
(`{namespace}.*` and `app.{namespace}.*` both make `app.shop.db`: namespace `app`'s by the first,
`shop`'s by the second): such a file is refused too (_require_no_overlap).

JSON, or YAML read by PyYAML with a strict safe loader: no duplicate keys, no aliases or merge
keys, and no scalar that YAML reads as anything but a string (`yes`, `1.5`, `~`: quote them).
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from dataclasses import dataclass, replace

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
    unnamed = next((p for p in policies if not p or not set(p.lower()) <= _POLICY_CHARS), None)
    if unnamed is not None:  # what _require_no_overlap assumes a `*` can stand for (attributes refuses these first)
        raise DriverError(f"policy bindings ({bindings.source}) are in force but {unnamed!r} is not a policy name")
    covering = [b for b in bindings.rules if b.covers(namespace, service_account)]
    if not covering:
        raise Forbidden(f"no policy binding in {bindings.source} covers {who}: it may not ask for "
                          f"{', '.join(policies)}; nothing was mounted")
    used = []
    for policy in (p.lower() for p in policies):  # as Vault will mint it (it lower-cases policy names)
        allowing = [b for b in covering if b.allows(policy, namespace, service_account)]
        if not allowing:
            rules = "; ".join(b.describe() for b in covering)
            raise Forbidden(f"policy {policy!r} is not bound to {who} by {bindings.source}: {rules}; "
                              "nothing was mounted")
        used.append(allowing[0].number)
    return ", ".join(f"binding #{n}" for n in sorted(set(used)))


def check_without_service_account(bindings: Bindings, namespace: str, policies: list[str]) -> str:
    """`check` for a pod whose service account is not known (a volume record an older vaulttmpfs wrote):
    over the bindings that cover every service account (a pattern of `*` only), with their policy patterns
    that do not name it. What they allow, every service account of the namespace has, so any name stands
    in for the unknown one."""
    every = tuple(replace(rule, policies=kept) for rule in bindings.rules
                  if any(set(p) == {"*"} for p in rule.service_accounts)
                  and (kept := tuple(p for p in rule.policies if "{service_account}" not in p)))
    try:
        check(Bindings(bindings.source, every), namespace, "default", policies)  # any valid name
    except Forbidden:
        raise Forbidden(f"the policy bindings ({bindings.source}) need the pod's service account, which the "
                        f"volume's record does not name (an older vaulttmpfs wrote it): no binding for every "
                        f"service account of namespace {namespace!r} allows {', '.join(policies)}") from None
    return "bindings for every service account"


# --- the file ---------------------------------------------------------------------------------

def load(path: str) -> Bindings:
    return parse(_read_trusted(path), path)


def _read_trusted(path: str) -> str:
    """The file's text, once it has stood still: a file being rewritten in place (`cat >`, an editor saving
    over it, `open(path, "w")`) can be read half-written, and a YAML prefix is often valid: cut before a
    binding's `service_accounts:` line it allows every service account (a list left out is `["*"]`), cut
    mid-line it names a shorter namespace. So a read is kept only if the file did not change during it and
    was last modified at least SETTLE_SECONDS before; else it is read again once it has been still that
    long, and the mount is refused if it is still changing after SETTLE_DEADLINE. A writer that stops for
    longer than SETTLE_SECONDS in the middle of its write is not caught: replace the file atomically."""
    deadline = time.monotonic() + SETTLE_DEADLINE
    while True:
        data, before, after = _read_once(path)
        unchanged = _same_file(before, after)
        age = time.time() - after.st_mtime_ns / 1e9
        # (An mtime further ahead than that, a clock set back, counts as old: it would never settle.)
        if unchanged and not -SETTLE_SECONDS < age < SETTLE_SECONDS:
            break
        # Until it is SETTLE_SECONDS old; changed while read: soon again (that read will see how recent it is).
        wait = SETTLE_SECONDS - age + 0.01 if unchanged else 0.05
        if time.monotonic() + wait > deadline:
            raise DriverError(
                f"policy bindings {path} was still being written {SETTLE_DEADLINE:g} s after this mount first read "
                f"it (it changed while read, or less than {SETTLE_SECONDS:g} s before): refusing this mount rather "
                f"than reading half a file; replace it atomically (write a temporary file in the same directory, "
                f"then rename it over {path})")
        time.sleep(wait)
    if len(data) > MAX_BYTES:
        raise DriverError(f"policy bindings {path} is larger than {MAX_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DriverError(f"policy bindings {path} is not UTF-8 text (byte {exc.start})") from None


SETTLE_SECONDS = 1.0  # a file modified more recently than this may be half-written: read it again later
SETTLE_DEADLINE = 5.0  # and refuse the mount if it is still changing this long after the first read


def _read_once(path: str) -> tuple[bytes, os.stat_result, os.stat_result]:
    """The file's bytes, with its fstat from before and after reading them."""
    fix = f"fix it with: chown root:root {path} && chmod 644 {path}"
    try:
        # Every directory and symlink on the way, as given, like sshd: a writable one lets its owner swap the dir.
        fd = trust.open_file(path, f"policy bindings {path}", os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise DriverError(f"cannot read VAULTTMPFS_POLICY_BINDINGS {path}: {exc.strerror}; "
                          "refusing every mount until it is readable") from None
    with os.fdopen(fd, "rb") as handle:
        before = os.fstat(handle.fileno())
        if not stat.S_ISREG(before.st_mode):
            raise DriverError(f"policy bindings {path} is not a regular file")
        _require_root_only(path, before, fix)
        data = handle.read(MAX_BYTES + 1)
        after = os.fstat(handle.fileno())
    return data, before, after


def _same_file(before: os.stat_result, after: os.stat_result) -> bool:
    return ((before.st_ino, before.st_size, before.st_mtime_ns, before.st_ctime_ns)
            == (after.st_ino, after.st_size, after.st_mtime_ns, after.st_ctime_ns))


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
    rules = tuple(_rule(n, entry, source) for n, entry in enumerate(document["bindings"], 1))
    for rule in rules:
        for pattern in rule.policies:
            _require_unambiguous(pattern, f"{source}: binding #{rule.number}", rule, rules)
    _require_no_overlap(rules, source)
    return rules


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
                   # Vault lower-cases policy names (`App.shop.db` is minted as `app.shop.db`): so are these.
                   tuple(p.lower() for p in _patterns(entry, "policies", _POLICY_PATTERN, where, required=True)))


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


def _require_unambiguous(pattern: str, where: str, rule: Binding | None = None, rules: tuple = ()) -> None:
    """A policy pattern must decide whose policy a name is: `{namespace}-*` gives namespace `team`
    everything of namespace `team-a` (`team-a-db` is `team` + `-a-db`), so it is refused. The spelling
    suggested is one the rest of the file (`rules`, with this pattern in `rule`) would accept too."""
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
            fixed = pattern.replace(part + after, part + _SEPARATORS[part][0] + (after if after in "*{" else ""), 1)
            if rule is not None:
                placed = _placed(rules)
                fixed = next((s for s in [fixed, *_respellings(fixed)] if _fits(s, (rule, pattern), placed)), fixed)
            raise DriverError(
                f"{where}: policy pattern {pattern!r} lets one pod claim another's policies: {part} is "
                f"followed by {after!r}, which could continue a longer name (namespace 'team' would match the "
                f"policies of 'team-a'); end the pattern there or follow {part} with {allowed}, e.g. {fixed!r}")


# --- across the file: whichever patterns could produce a policy name, it is one identity's ----------------

# What a substituted name can be, as automata (state -> [(characters, next state)], accepting "end"): Kubernetes'
# own rules, a namespace a DNS-1123 label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`), a service account a DNS-1123
# subdomain (such labels joined by '.'), the names `check` lets through. Their lengths (63, 253) are left out:
# that can only find more overlaps, never fewer.
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_DASH, _DOT = frozenset("-"), frozenset(".")
_LABEL = {"start": [(_ALNUM, "end")], "end": [(_ALNUM, "end"), (_DASH, "dash")],
          "dash": [(_ALNUM, "end"), (_DASH, "dash")]}
_NAME_AUTOMATA = {"{namespace}": _LABEL,
                  "{service_account}": {**_LABEL, "end": [*_LABEL["end"], (_DOT, "dot")], "dot": [(_ALNUM, "end")]}}
# What a policy name is made of (config.SAFE_NAME_PATTERN; `check` refuses any other): what a `*` stands for.
_PREFERRED = "abcdefghijklmnopqrstuvwxyz0123456789-._"  # in this order in examples (lower case: as Vault keeps them)
_POLICY_CHARS = frozenset(_PREFERRED)


class _AnyName:
    """A binding's stand-in for the coarse comparison: every name of each kind."""

    namespaces = service_accounts = ("*",)


_ANY_NAME = _AnyName()


class _Language:
    """The policy names some patterns, each of a binding, can produce for the pods their binding covers: an
    NFA whose moves are character sets. A placeholder is the union of the binding's own name patterns for it
    (`team-*`), read as names of its kind (a pattern no such name matches adds nothing)."""

    def __init__(self, entries: list[tuple[str, Binding]]):
        self.moves: list[list[tuple[frozenset, int]]] = [[]]
        self.free: list[list[int]] = [[]]  # moves that take no character
        self.finals: set[int] = set()
        self._steps: dict = {}
        for pattern, binding in entries:
            self._add(pattern, binding)

    def _add(self, pattern: str, binding: Binding) -> None:
        at = self._state()
        self.free[0].append(at)
        for part in _TOKENS.split(pattern):
            if part == "*":
                at = self._star(at, _POLICY_CHARS)
            elif part in _NAME_AUTOMATA:
                end = self._state()
                for glob in binding.namespaces if part == "{namespace}" else binding.service_accounts:
                    last = self._glob(at, glob, _NAME_AUTOMATA[part])
                    if last is not None:
                        self.free[last].append(end)
                at = end
            else:
                for char in part:
                    at = self._step(at, frozenset(char))
        self.finals.add(at)

    def closure(self, states) -> frozenset:
        """`states` and every state reached from them without taking a character."""
        found, todo = set(states), list(states)
        while todo:
            for target in self.free[todo.pop()]:
                if target not in found:
                    found.add(target)
                    todo.append(target)
        return frozenset(found)

    def step(self, states: frozenset, char: str) -> frozenset:
        key = (states, char)
        if key not in self._steps:
            self._steps[key] = self.closure([t for s in states for chars, t in self.moves[s] if char in chars])
        return self._steps[key]

    def _state(self) -> int:
        self.moves.append([])
        self.free.append([])
        return len(self.moves) - 1

    def _step(self, at: int, chars: frozenset) -> int:
        target = self._state()
        self.moves[at].append((chars, target))
        return target

    def _star(self, at: int, chars: frozenset) -> int:
        loop = self._state()
        self.free[at].append(loop)
        self.moves[loop].append((chars, loop))
        return loop

    def _glob(self, at: int, glob: str, automaton: dict) -> int | None:
        """The names one of the binding's patterns (`team-*`) matches that are names of this kind: the
        pattern's positions times the automaton's states. The state they end in, or None if there are none."""
        states = {(0, "start"): self._state()}
        self.free[at].append(states[(0, "start")])
        todo = [(0, "start")]
        while todo:
            here = todo.pop()
            i, state = here
            if i == len(glob):
                continue
            steps = ([((i + 1, state), None)] + [((i, after), chars) for chars, after in automaton[state]]
                     if glob[i] == "*" else
                     [((i + 1, after), frozenset(glob[i])) for chars, after in automaton[state] if glob[i] in chars])
            for there, chars in steps:
                if there not in states:
                    states[there] = self._state()
                    todo.append(there)
                (self.free[states[here]].append(states[there]) if chars is None
                 else self.moves[states[here]].append((chars, states[there])))
        return states.get((len(glob), "end"))


class _TooComplex(Exception):
    """Two languages whose side-by-side run passed BUDGET states (many `*...*` globs in one binding)."""


# States visited per comparison (each pair's sets, summed): ~0.1 s; many `*...*` globs in one binding could
# otherwise cost minutes and gigabytes, on every FlexVolume mount.
BUDGET = 100_000


def _shared_name(a: _Language, b: _Language, budget: int = BUDGET) -> str | None:
    """The shortest policy name both languages hold (in readable characters), or None: the two NFAs run
    side by side on sets of states, one character class at a time (characters no move tells apart are one).
    _TooComplex past `budget` states visited."""
    classes = [frozenset(_POLICY_CHARS)]
    for chars in {chars for language in (a, b) for moves in language.moves for chars, _target in moves}:
        classes = [part for c in classes for part in (c & chars, c - chars) if part]
    letters = sorted(min(c, key=_PREFERRED.index) for c in classes)
    start = (a.closure((0,)), b.closure((0,)))
    came_from: dict = {start: None}
    queue, i, visited = [start], 0, 0
    while i < len(queue):
        pair = queue[i]
        i += 1
        if pair[0] & a.finals and pair[1] & b.finals:
            name = []
            while came_from[pair] is not None:
                pair, char = came_from[pair]
                name.append(char)
            return "".join(reversed(name))
        for char in letters:
            visited += len(pair[0]) + len(pair[1])  # what each step costs: its sets' sizes
            if visited > budget:
                raise _TooComplex()
            after = a.step(pair[0], char)
            if after:
                both = (after, b.step(pair[1], char))
                if both[1] and both not in came_from:
                    came_from[both] = (pair, char)
                    queue.append(both)
    return None


def _signature(pattern: str) -> str | None:
    """The pattern up to its last placeholder (None without one). Two patterns that share it read the same
    identity from any name both produce: each placeholder's value is the longest run of its characters
    from a place fixed by what comes before it (what _require_unambiguous makes sure of)."""
    ends = [m.end() for m in _PLACEHOLDER.finditer(pattern)]
    return pattern[:ends[-1]] if ends else None


_PLACEHOLDER = re.compile(r"\{namespace\}|\{service_account\}")
_CLASSES = {"{namespace}": "[a-z0-9-]", "{service_account}": "[a-z0-9.-]"}  # the characters of _NAME_AUTOMATA


def _require_no_overlap(rules: tuple[Binding, ...], source: str) -> None:
    """No policy name two identities can both get from placeholders, across every pattern of every binding:
    `{namespace}.*` and `app.{namespace}.*` both produce `app.shop.db`, the first for namespace `app`, the
    second for `shop`; `{namespace}.*` and `{service_account}_db` both produce `shop.web_db`, for namespace
    `shop` and for a service account `shop.web` in any namespace. Patterns without a placeholder name their
    policies outright and are not compared: they are given to whoever their binding covers."""
    placed = _placed(rules)
    groups: dict[str, list] = {}  # patterns that read the same identity: compared as one language
    for entry in placed:
        groups.setdefault(entry[2], []).append(entry)
    grouped = list(groups.values())
    for i, group in enumerate(grouped):
        for other_group in grouped[i + 1:]:
            if not _may_meet(group, other_group):
                continue
            found = _overlapping(group, other_group)
            if found is not None:
                a, b, name = found
                raise DriverError(_overlap_message(source, placed, a[:2], b[:2], name))


def _may_meet(group: list, other_group: list) -> bool:
    """Cheap first: patterns whose leading text (before any `*` or placeholder) is not one the other's
    begins with produce no name alike (`team1-{service_account}`, `team2-{service_account}`)."""
    heads = {_TOKENS.split(pattern)[0] for _rule, pattern, _s, _n in group}
    return any(h.startswith(o) or o.startswith(h) for h in heads for o in
               {_TOKENS.split(pattern)[0] for _rule, pattern, _s, _n in other_group})


def _overlapping(group: list, other_group: list):
    """(pattern entry, other pattern entry, a name both make), first in the file's order; or None. Placeholders
    stand for the names their bindings' patterns match; where that is too much to work out (BUDGET), for any
    name of their kind (`*`), which can only find more overlaps, never fewer."""
    for coarse in (False, True):
        try:
            if _shared_name(_union(group, coarse), _union(other_group, coarse)) is None:
                return None
            for a, b in sorted((sorted((a, b), key=lambda e: e[3]) for a in group for b in other_group),
                               key=lambda pair: (pair[0][3], pair[1][3])):
                name = _shared_name(_union([a], coarse), _union([b], coarse))
                if name is not None:
                    return a, b, name
            return None  # not reached: some pair of the two shares the name
        except _TooComplex:
            continue
    raise DriverError("policy bindings: the policy patterns are too complex to check for overlaps (many `*` in "
                      "one binding's namespaces or service_accounts): narrow them")


def _union(group: list, coarse: bool) -> _Language:
    return _Language([(pattern, _ANY_NAME if coarse else rule) for rule, pattern, _s, _n in group])


def _placed(rules: tuple[Binding, ...]) -> list:
    placed, seen = [], set()
    for rule in rules:
        for pattern in rule.policies:
            signature = _signature(pattern)
            if signature is not None and (rule.number, pattern) not in seen:
                seen.add((rule.number, pattern))
                placed.append((rule, pattern, signature, len(placed)))
    return placed


def _overlap_message(source: str, placed: list, first: tuple, second: tuple, name: str) -> str:
    (rule, pattern), (other_rule, other_pattern) = first, second
    where = (f"both in {_label(rule)}" if rule.number == other_rule.number
             else f"{_label(rule)} and {_label(other_rule)}")
    # Respell the first if only it has text before its placeholder (`app.{namespace}.*`), else the later one first.
    odd_first = not _starts_with_placeholder(pattern) and _starts_with_placeholder(other_pattern)
    order = [first, second] if odd_first else [second, first]
    fix = next(((target, spelling) for target in order for spelling in _respellings(target[1])
                if _fits(spelling, target, placed)), None)
    advice = (f"respell {fix[0][1]!r}, e.g. {fix[1]!r}" if fix else
              "drop one of them, or narrow their bindings' namespaces/service_accounts so they cannot meet")
    return (f"{source}: policy patterns {pattern!r} and {other_pattern!r} ({where}) overlap, which lets one pod "
            f"claim another's policies: {name!r} matches both, the first giving it to {_owner(pattern, name)}, "
            f"the second to {_owner(other_pattern, name)}. Across the whole file a policy name must say whose it "
            f"is: start each pattern with its placeholder and follow different placeholders with different "
            f"separators; {advice}")


def _label(rule: Binding) -> str:
    return f"binding #{rule.number}" + (f" {rule.name!r}" if rule.name else "")


def _starts_with_placeholder(pattern: str) -> bool:
    return _PLACEHOLDER.match(pattern) is not None


def _owner(pattern: str, name: str) -> str:
    regex, groups = "", []
    for part in _TOKENS.split(pattern):
        if part == "*":
            regex += "[A-Za-z0-9._-]*"
        elif part in _CLASSES:
            group = f"g{len(groups)}"
            groups.append((part, group))
            regex += f"(?P<{group}>{_CLASSES[part]}+)"
        else:
            regex += re.escape(part)
    found = re.fullmatch(regex, name)
    if found is None:  # not expected: the name was produced by this pattern's language
        return "another identity"
    values = {}
    for part, group in groups:
        values.setdefault(part, found.group(group))
    namespace, account = values.get("{namespace}"), values.get("{service_account}")
    if namespace and account:
        return f"service account {account!r} in namespace {namespace!r}"
    if namespace:
        return f"namespace {namespace!r}"
    return f"service account {account!r} (in any namespace its binding covers)"


def _respellings(pattern: str) -> list[str]:
    """Spellings of `pattern` that start with its placeholders, its other text after them."""
    rest = re.sub(r"[._-]*\.[._-]*", ".", _PLACEHOLDER.sub(".", pattern)).strip("._-")
    uses = [p for p in ("{namespace}", "{service_account}") if p in pattern]
    heads = {("{namespace}",): ["{namespace}.", "{namespace}_"],
             ("{service_account}",): ["{service_account}_", "{namespace}.{service_account}_",
                                      "{namespace}_{service_account}_"],
             ("{namespace}", "{service_account}"): ["{namespace}.{service_account}_",
                                                    "{namespace}_{service_account}_"]}[tuple(uses)]
    return [head + rest if rest else head[:-1] for head in heads]


def _fits(spelling: str, target: tuple, placed: list) -> bool:
    """Would the file be accepted with `target` (binding, pattern) spelled so? The advice is checked too."""
    rule, pattern = target
    if not _POLICY_PATTERN.fullmatch(spelling) or spelling == pattern:
        return False
    try:
        _require_unambiguous(spelling, "")
    except DriverError:
        return False
    entry = (rule, spelling, _signature(spelling), -1)
    try:
        return not any(entry[2] != other[2] and _may_meet([entry], [other]) and _overlapping([entry], [other])
                       for other in placed if (other[0].number, other[1]) != (rule.number, pattern))
    except DriverError:  # too complex to tell: not offered
        return False


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
