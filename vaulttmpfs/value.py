"""`Value`: the base of the typed, immutable value classes a kubelet call builds (Config, MountRequest,
VolumeRecord, Minted, Layout), at a fraction of a dataclass's cost.

`dataclasses` imports inspect (and ast, dis, tokenize, linecache, enum, re under it: ~6 ms), and every
@dataclass then builds its methods from source at import (~0.5 ms a class): together ~10 ms of a
brokered mount that has ~6 ms to spend beyond its start-up (docs/performance-flexvolume.md). A Value
subclass is declared as a frozen dataclass is (annotated fields, a default as the class attribute, so
`Config.plugin_dir` is still the default), and gets a keyword/positional __init__, ==, hash, a repr
(without the fields named in `_hidden`), `replace()` and `asdict()`: read from the class's annotations
once, nothing compiled. Type checkers see a frozen dataclass (`dataclass_transform`).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2.5 ms on the exec path)
if TYPE_CHECKING:
    from typing import Any, ClassVar, TypeVar, dataclass_transform

    V = TypeVar("V", bound="Value")
else:
    def dataclass_transform(**_kwargs):
        return lambda cls: cls

_NO_DEFAULT = object()


@dataclass_transform(frozen_default=True)
class Value:
    _fields: ClassVar[tuple[str, ...]] = ()
    _defaults: ClassVar[dict[str, object]] = {}
    _hidden: ClassVar[tuple[str, ...]] = ()  # fields left out of repr() (a token, a JWT)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # With `from __future__ import annotations` these are the annotation strings: nothing evaluated.
        names = [name for name in cls.__dict__.get("__annotations__", {}) if not name.startswith("_")]
        cls._fields = tuple(names)
        cls._defaults = {name: cls.__dict__[name] for name in names if name in cls.__dict__}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        fields = self._fields
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__}() takes {len(fields)} positional arguments, got {len(args)}")
        values = dict(zip(fields, args, strict=False))
        for name, value in kwargs.items():
            if name not in self._defaults and name not in fields:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {name!r}")
            if name in values:
                raise TypeError(f"{type(self).__name__}() got multiple values for argument {name!r}")
            values[name] = value
        state = self.__dict__
        for name in fields:
            value = values.get(name, _NO_DEFAULT)
            if value is _NO_DEFAULT:
                value = self._defaults.get(name, _NO_DEFAULT)
                if value is _NO_DEFAULT:
                    raise TypeError(f"{type(self).__name__}() missing required argument {name!r}")
            state[name] = value

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: {type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: {type(self).__name__} is immutable")

    def _values(self) -> tuple:
        state = self.__dict__
        return tuple(state[name] for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields if name not in self._hidden)
        return f"{type(self).__name__}({shown})"

    def replace(self: V, **changes: Any) -> V:
        """A copy with `changes` (dataclasses.replace)."""
        return type(self)(**{**self.__dict__, **changes})

    def asdict(self) -> dict[str, Any]:
        """Field name -> value (dataclasses.asdict, one level: the fields are plain values)."""
        return dict(zip(self._fields, self._values(), strict=True))
