"""Typed, nested hyperparameter structs with flat dotted overrides (ORIGINAL §2.2).

A hyperparameter class is a ``@dataclass`` subclass of :class:`HParams`. A field whose type is another
HParams class (possibly ``Optional``) is a nested struct; every other field is a leaf of one of the
supported types: ``int``, ``float``, ``bool``, ``str``, ``Literal[...]`` of strings, or ``Optional`` of
any of these.

Keys are flat and dotted (``ppo.lr``, ``rewards.adaptive_kl.target``). Semantics, as in the original:

* for a nested-struct key, ``'on'`` builds a fresh default instance and ``'off'`` sets it to ``None``;
* setting a sub-key whose parent struct is ``None`` creates the parent with its defaults first;
* keys are applied parents-first (sorted by their dotted path), so the order of a dict never matters;
* strings are parsed to the declared type (``override_from_str_dict``): bool accepts
  ``t/true/True/f/false/False``; ``Optional[X]`` accepts ``None/none/''`` as None (for ``Optional[str]``
  too, unlike the original, which kept the string ``'None'``); int also accepts integral floats like
  ``1e6``.

Unlike the original (typeguard, bare asserts), every user error is an :class:`HParamsError` naming the
key, the value and what is expected; an unknown key lists the closest valid keys. :meth:`HParams.validate`
applies two rules to every leaf before any class's own checks: a float must be finite (NaN passes every
``<``/``>`` comparison a ``_validate`` hook makes, and inf makes any learning rate, coefficient or
temperature meaningless), and an int must fit a 64-bit integer (seeds go to NumPy and torch, counts to
tensors).
"""

import copy
import dataclasses
import difflib
import math
import sys
import types
import typing
import warnings
from functools import lru_cache
from typing import Any, ClassVar, Dict, Literal, Mapping, Optional, TextIO, Tuple, Union

_TRUE_STRINGS = ('t', 'true', 'True')
_FALSE_STRINGS = ('f', 'false', 'False')
_NONE_STRINGS = ('None', 'none', '')
_LEAF_TYPES = (int, float, bool, str)
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1  # every int setting (seeds: torch and NumPy take 64 bits at most)


RESOLVED_KEY = 'resolved'  # the entry of a saved hyperparameter file that records run-time resolutions


def with_resolved(nested: dict, resolved: Mapping[str, Any]) -> dict:
    """A saved hyperparameter file: the settings plus a RESOLVED_KEY record of what 'auto' values became and why."""
    return {**nested, RESOLVED_KEY: dict(resolved)}


class HParamsError(ValueError):
    """A hyperparameter key or value given by the user is invalid."""


class HParams:
    """Base class for hyperparameter structs; subclasses must also be decorated with ``@dataclass``.

    Subclasses may define ``_validate(self, prefix)`` for their own checks (called by :meth:`validate`
    after every field was type-checked) and ``_aliases``, a class-level dict mapping deprecated dotted keys
    (relative to the class) to their replacement.
    """

    _aliases: ClassVar[Dict[str, str]] = {}

    # ---- overriding -------------------------------------------------------------------------------------

    def override_from_str_dict(self, flat: Mapping[str, str]) -> None:
        """Overrides values from ``{'ppo.lr': '1e-5', 'rewards.adaptive_kl': 'on', ...}``, parsing each string
        to the declared type of its key."""
        flat = _resolve_aliases(type(self), flat)
        typemap = _type_map(type(self))
        parsed = {}
        for key, text in flat.items():
            ty = _lookup(type(self), key)
            if not isinstance(text, str):
                raise HParamsError(f"value {text!r} for '{key}' must be a string here "
                                   f"(use override_from_dict for typed values)")
            parsed[key] = _parse_str(key, text, ty)
        self._apply(parsed, typemap)

    def override_from_dict(self, flat: Mapping[str, Any]) -> None:
        """Overrides values from ``{'ppo.lr': 1e-5, 'rewards.adaptive_kl': 'on', ...}`` with typed values.

        A nested-struct key takes ``'on'``, ``'off'``, ``None``, an instance of its class, or a nested dict.
        Each value is type-checked against its key (an int is accepted, and stored as float, for a float)."""
        flat = _resolve_aliases(type(self), flat)
        typemap = _type_map(type(self))
        parsed = {key: _coerce(key, value, _lookup(type(self), key)) for key, value in flat.items()}
        self._apply(parsed, typemap)

    def override_from_nested_dict(self, nested: Mapping[str, Any], *, _prefix: str = '') -> None:
        """Overrides values from a nested dict as written by :meth:`to_nested_dict` (e.g. read from JSON).

        A nested dict updates the existing struct (creating it with defaults when it is None); keys that are
        absent keep their current values."""
        hints = _field_types(type(self))
        for name, value in nested.items():
            key = _prefix + name
            if name not in hints:
                raise _unknown_key_error(key, type(self), _prefix)
            struct_cls, _ = _struct_class(hints[name])
            if struct_cls is not None and isinstance(value, Mapping):
                child = getattr(self, name)
                if child is None:
                    child = struct_cls()
                    setattr(self, name, child)
                child.override_from_nested_dict(value, _prefix=key + '.')
            else:
                setattr(self, name, _coerce(key, value, hints[name]))

    @classmethod
    def from_nested_dict(cls, nested: Mapping[str, Any]):
        """Builds an instance from defaults overridden by a nested dict (see :meth:`override_from_nested_dict`).

        A top-level RESOLVED_KEY entry (what a trainer resolved at run time, e.g. `run.precision auto`; see
        `with_resolved`) is a record, not a setting, and is ignored."""
        hparams = cls()
        hparams.override_from_nested_dict({k: v for k, v in nested.items() if k != RESOLVED_KEY})
        return hparams

    def _apply(self, parsed: Mapping[str, Any], typemap: Mapping[str, Any]) -> None:
        """Sets already-typed values parents-first, creating missing parent structs with their defaults."""
        for key in parsed:
            parts = key.split('.')
            for depth in range(1, len(parts)):
                parent_key = '.'.join(parts[:depth])
                if parent_key in parsed and parsed[parent_key] is None:
                    raise HParamsError(f"cannot set '{key}': '{parent_key}' is set to off in the same "
                                       f"overrides; drop one of the two")
        for key in sorted(parsed, key=lambda k: k.split('.')):
            *parents, leaf = key.split('.')
            node = self
            for depth, name in enumerate(parents):
                child = getattr(node, name)
                if child is None:
                    child = _struct_class(typemap['.'.join(parents[:depth + 1])])[0]()
                    setattr(node, name, child)
                node = child
            setattr(node, leaf, parsed[key])

    # ---- export -----------------------------------------------------------------------------------------

    def to_nested_dict(self) -> Dict[str, Any]:
        """Returns the hyperparameters as a JSON-serializable nested dict (a struct that is off is None)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_nested_dict() if isinstance(value, HParams) else copy.deepcopy(value)
        return out

    def to_flat_dict(self) -> Dict[str, Any]:
        """Returns ``{dotted key: leaf value}``; a struct that is off appears as one key with value None."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, HParams):
                out.update({f'{f.name}.{k}': v for k, v in value.to_flat_dict().items()})
            else:
                out[f.name] = value
        return out

    def dump(self, out: Optional[TextIO] = None) -> None:
        """Prints every dotted key with its value (repr), sorted by key."""
        out = sys.stdout if out is None else out
        for key, value in sorted(self.to_flat_dict().items()):
            out.write(f'{key}: {value!r}\n')

    # ---- validation -------------------------------------------------------------------------------------

    def validate(self, *, prefix: str = '') -> None:
        """Type-checks every field recursively, then runs each class's ``_validate`` hook (children first).

        Raises HParamsError naming the dotted key of the first invalid value."""
        if not dataclasses.is_dataclass(self):
            raise TypeError(f'{type(self).__name__} must be decorated with @dataclass')
        hints = _field_types(type(self))
        for name, ty in hints.items():
            value = getattr(self, name)
            if not _check_type(value, ty):
                raise HParamsError(f"'{prefix}{name}' = {value!r} has the wrong type: expected {_describe(ty)}")
            check_leaf_value(prefix + name, value)
            if isinstance(value, HParams):
                value.validate(prefix=f'{prefix}{name}.')
        self._validate(prefix)

    def _validate(self, prefix: str) -> None:
        """Class-specific checks; ``prefix`` is this struct's dotted path (e.g. ``'rewards.'``) for messages."""

    def _require(self, prefix: str, *names: str) -> None:
        """Raises HParamsError if any of the named fields is None."""
        for name in names:
            if getattr(self, name) is None:
                ty = _field_types(type(self))[name]
                raise HParamsError(f"'{prefix}{name}' is required but not set: pass --{prefix}{name} "
                                   f"<{_short_name(_leaf_type(ty))}> or choose an experiment that sets it")

    def _require_at_least(self, prefix: str, name: str, minimum: float) -> None:
        """Raises HParamsError if the named field is set and smaller than ``minimum``."""
        value = getattr(self, name)
        if value is not None and value < minimum:
            raise HParamsError(f"'{prefix}{name}' must be >= {minimum}, got {value!r}")


def check_leaf_value(key: str, value: Any) -> None:
    """HParamsError naming ``key`` for a float that is NaN or infinite, or an int outside the 64-bit range."""
    if isinstance(value, float) and not math.isfinite(value):
        raise HParamsError(f"'{key}' = {value!r} is not a finite number: pass a finite value")
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        shown = value if value.bit_length() <= 256 else f'<a {value.bit_length()}-bit integer>'
        raise HParamsError(f"'{key}' = {shown} does not fit a 64-bit integer: pass a value in "
                           f"[-2**63, 2**63)")


def is_hparam_type(ty: Any) -> bool:
    """Whether ``ty`` is an HParams subclass."""
    return isinstance(ty, type) and issubclass(ty, HParams)


# ---- type introspection ---------------------------------------------------------------------------------

def _union_args(ty: Any) -> Optional[Tuple[Any, ...]]:
    """The members of a Union / Optional / ``X | None`` type, or None if ``ty`` is not a union."""
    if typing.get_origin(ty) is Union or isinstance(ty, types.UnionType):
        return typing.get_args(ty)
    return None


def _struct_class(ty: Any) -> Tuple[Optional[type], bool]:
    """(HParams class, is-optional) for a nested-struct type, or (None, False) for a leaf type."""
    if is_hparam_type(ty):
        return ty, False
    args = _union_args(ty)
    if args is not None:
        structs = [a for a in args if is_hparam_type(a)]
        if structs:
            return structs[0], type(None) in args
    return None, False


def _leaf_type(ty: Any) -> Any:
    """The non-None member of ``Optional[X]``, or ``ty`` itself."""
    args = _union_args(ty)
    if args is None:
        return ty
    return next(a for a in args if a is not type(None))


def _check_annotation(cls: type, name: str, ty: Any) -> None:
    """Raises TypeError for a field annotation this module cannot parse or check (a programming error)."""
    args = _union_args(ty)
    if args is not None:
        others = [a for a in args if a is not type(None)]
        if len(others) != 1 or type(None) not in args:
            raise TypeError(f'{cls.__name__}.{name}: only Optional[X] unions are supported, got {ty}')
        ty = others[0]
    if typing.get_origin(ty) is Literal:
        if not all(isinstance(choice, str) for choice in typing.get_args(ty)):
            raise TypeError(f'{cls.__name__}.{name}: only Literal of strings is supported, got {ty}')
    elif ty not in _LEAF_TYPES and not is_hparam_type(ty):
        raise TypeError(f'{cls.__name__}.{name}: unsupported hyperparameter type {ty}')


@lru_cache(maxsize=None)
def _field_types(cls: type) -> Dict[str, Any]:
    """{field name: resolved annotation} for an HParams dataclass, in declaration order."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f'{cls.__name__} must be decorated with @dataclass')
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        _check_annotation(cls, f.name, hints[f.name])
        out[f.name] = hints[f.name]
    return out


@lru_cache(maxsize=None)
def _type_map(cls: type) -> Dict[str, Any]:
    """{dotted key: annotation} over every key of ``cls``, nested structs included."""
    out = {}
    for name, ty in _field_types(cls).items():
        out[name] = ty
        struct_cls, _ = _struct_class(ty)
        if struct_cls is not None:
            out.update({f'{name}.{k}': t for k, t in _type_map(struct_cls).items()})
    return out


@lru_cache(maxsize=None)
def _alias_map(cls: type) -> Dict[str, str]:
    """{deprecated dotted key: replacement dotted key} over ``cls`` and its nested structs."""
    out = dict(cls._aliases)
    for name, ty in _field_types(cls).items():
        struct_cls, _ = _struct_class(ty)
        if struct_cls is not None:
            out.update({f'{name}.{k}': f'{name}.{v}' for k, v in _alias_map(struct_cls).items()})
    return out


def _resolve_aliases(cls: type, flat: Mapping[str, Any]) -> Dict[str, Any]:
    """Renames deprecated keys to their replacement, warning once per key."""
    aliases = _alias_map(cls)
    out = {}
    for key, value in flat.items():
        if key in aliases:
            target = aliases[key]
            if target in flat:
                raise HParamsError(f"both '{key}' and '{target}' are given; '{key}' is a deprecated alias of "
                                   f"'{target}', keep only '{target}'")
            warnings.warn(f"hyperparameter '{key}' is a deprecated alias of '{target}'; use '{target}'",
                          DeprecationWarning, stacklevel=3)
            key = target
        out[key] = value
    return out


def _lookup(cls: type, key: str) -> Any:
    """The annotation of a dotted key; HParamsError with the closest valid keys if there is none."""
    typemap = _type_map(cls)
    if key not in typemap:
        raise _unknown_key_error(key, cls, '')
    return typemap[key]


def closest_keys(key: str, valid: typing.Iterable[str], n: int = 4) -> typing.List[str]:
    """The valid keys closest to ``key``: by difflib similarity, then those with a similar last component."""
    valid = sorted(valid)
    matches = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    leaf = key.split('.')[-1]
    leaves = {k.split('.')[-1]: None for k in valid}
    close_leaves = set(difflib.get_close_matches(leaf, list(leaves), n=n, cutoff=0.8))
    for k in valid:
        if k.split('.')[-1] in close_leaves and k not in matches:
            matches.append(k)
    return matches[:n]


def _unknown_key_error(key: str, cls: type, prefix: str) -> HParamsError:
    """HParamsError for an unknown dotted key (full key given; ``prefix`` is where ``cls`` sits)."""
    valid = [prefix + k for k in _type_map(cls)]
    matches = closest_keys(key, valid)
    hint = f"; did you mean {' or '.join(repr(m) for m in matches)}?" if matches else ''
    return HParamsError(f"unknown hyperparameter '{key}'{hint} (valid keys are listed by --dry_run)")


# ---- parsing and checking values ------------------------------------------------------------------------

def _short_name(ty: Any) -> str:
    """A compact name of a type for help text: ``int``, ``float|None``, ``auto|cpu|cuda``, ``on|off``."""
    struct_cls, optional = _struct_class(ty)
    if struct_cls is not None:
        return 'on|off' if optional else 'on'
    args = _union_args(ty)
    if args is not None:
        return '|'.join(_short_name(a) for a in args)
    if typing.get_origin(ty) is Literal:
        return '|'.join(typing.get_args(ty))
    return 'None' if ty is type(None) else ty.__name__


def _describe(ty: Any) -> str:
    """A human description of what a type accepts, for error messages."""
    struct_cls, optional = _struct_class(ty)
    if struct_cls is not None:
        return f"'on' or 'off' (a {struct_cls.__name__})" if optional else f"'on' (a {struct_cls.__name__})"
    args = _union_args(ty)
    if args is not None:
        return ' or '.join(_describe(a) for a in args)
    if typing.get_origin(ty) is Literal:
        return 'one of ' + ', '.join(repr(c) for c in typing.get_args(ty))
    return {
        int: 'an integer (e.g. 64)',
        float: 'a number (e.g. 1e-5)',
        bool: "a boolean ('true'/'t'/'True' or 'false'/'f'/'False')",
        str: 'a string',
        type(None): "None ('None', 'none' or '')",
    }[ty]


def _check_type(value: Any, ty: Any) -> bool:
    """Whether ``value`` is a valid value of type ``ty`` (an int counts as a float; a bool is not an int)."""
    args = _union_args(ty)
    if args is not None:
        return any(_check_type(value, a) for a in args)
    if ty is type(None):
        return value is None
    if typing.get_origin(ty) is Literal:
        return isinstance(value, str) and value in typing.get_args(ty)
    if ty is bool:
        return isinstance(value, bool)
    if ty is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ty is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, ty)


def _parse_str(key: str, text: str, ty: Any) -> Any:
    """Parses a command-line string to the type of ``key``; HParamsError naming key, value and type."""
    struct_cls, optional = _struct_class(ty)
    if struct_cls is not None:
        if text == 'on':
            return struct_cls()
        if text == 'off' and optional:
            return None
    else:
        args = _union_args(ty)
        if args is not None and text in _NONE_STRINGS:
            return None
        try:
            return _parse_leaf(text, _leaf_type(ty))
        except ValueError:
            pass
    raise HParamsError(f"invalid value {text!r} for '{key}': expected {_describe(ty)}")


def _parse_leaf(text: str, ty: Any) -> Any:
    """Parses a string to a leaf type; ValueError if it does not parse."""
    if ty is str:
        return text
    if typing.get_origin(ty) is Literal:
        if text in typing.get_args(ty):
            return text
        raise ValueError(text)
    if ty is bool:
        if text in _TRUE_STRINGS:
            return True
        if text in _FALSE_STRINGS:
            return False
        raise ValueError(text)
    if ty is int:
        try:
            return int(text)
        except ValueError:
            as_float = float(text)
            if not as_float.is_integer():
                raise
            return int(as_float)
    if ty is float:
        return float(text)
    raise ValueError(text)


def _coerce(key: str, value: Any, ty: Any) -> Any:
    """Checks a typed value for ``key`` (building structs from 'on'/'off'/dicts); HParamsError if invalid."""
    struct_cls, optional = _struct_class(ty)
    if struct_cls is not None:
        if isinstance(value, str) and value == 'on':
            return struct_cls()
        if (value is None or (isinstance(value, str) and value == 'off')) and optional:
            return None
        if isinstance(value, struct_cls):
            return copy.deepcopy(value)
        if isinstance(value, Mapping):
            return struct_cls.from_nested_dict(value)
    else:
        if _check_type(value, ty):
            if _leaf_type(ty) is float and isinstance(value, int) and not isinstance(value, bool):
                return float(value)  # an int given for a float field is stored as a float
            return value
    raise HParamsError(f"invalid value {value!r} for '{key}': expected {_describe(ty)}")
