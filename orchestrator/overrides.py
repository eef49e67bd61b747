"""``--set a.b.c=value`` overrides: parsing, checking against a schema, and applying onto nested dicts (pure).

Values are parsed as YAML, so ``--set modalities.inputs=[rgb,depth]`` gives a list and ``--set optim.blr=2.0e-4`` a
float. Where the schema says a field is a string, the text after ``=`` is kept as written (``run_name=0042`` stays
``"0042"``). Overrides apply left to right; later ones win.
"""

from __future__ import annotations

import copy
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

__all__ = ["Override", "all_paths", "apply_overrides", "check_path", "field_target", "parse_override"]

_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
_NULL_WORDS = {"null", "Null", "NULL", "~"}


@dataclass(frozen=True)
class Override:
    """One parsed ``KEY=VALUE``."""

    path: tuple[str, ...]
    """Key split at dots: ``("optim", "blr")``."""
    raw: str
    """Text after the first ``=``, unparsed."""
    value: Any
    """The raw text parsed as a YAML value."""

    @property
    def key(self) -> str:
        """Dotted key as the user wrote it."""
        return ".".join(self.path)


def parse_override(text: str) -> Override:
    """Parse ``"a.b.c=value"``; raises ``ValueError`` on bad syntax (no ``=``, empty key segment, bad YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep:
        raise ValueError(f"expected KEY=VALUE (for example optim.blr=2.0e-4), got {text!r}")
    if not key:
        raise ValueError(f"missing key before '=' in {text!r}")
    path = tuple(key.split("."))
    for segment in path:
        if not _SEGMENT.match(segment):
            raise ValueError(f"bad key {key!r}: segments are letters, digits, '_' or '-', joined by single dots")
    if not raw.strip():
        raise ValueError(f"no value after '=' in {text!r}; write {key}=null to unset a field")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"value of {key} is not valid YAML ({problem}): {raw!r}") from None
    return Override(path=path, raw=raw, value=value)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and hasattr(tp, "model_fields")


def _union_args(annotation: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return tuple(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return (annotation,)


def field_target(annotation: Any) -> Any:
    """What a field holds, for walking dotted paths.

    Returns the pydantic model class for a (possibly optional) section, ``("mapping", value_annotation)`` when any
    branch of the annotation is a dict (its keys are free-form), or ``("leaf", annotation)`` otherwise.
    """
    args = _union_args(annotation)
    for arg in args:
        if _is_model(arg):
            return arg
    for arg in args:
        origin = typing.get_origin(arg)
        if arg is dict or origin is dict or (isinstance(origin, type) and issubclass(origin, Mapping)):
            params = typing.get_args(arg)
            return ("mapping", params[1] if len(params) == 2 else Any)
    return ("leaf", annotation)


def all_paths(schema: type, prefix: str = "") -> list[str]:
    """Every dotted path of a pydantic model: sections and their fields, depth first, in declaration order."""
    paths: list[str] = []
    for name, info in schema.model_fields.items():  # type: ignore[attr-defined]
        path = f"{prefix}{name}"
        paths.append(path)
        target = field_target(info.annotation)
        if _is_model(target):
            paths.extend(all_paths(target, prefix=f"{path}."))
    return paths


def _closest(wanted: str, candidates: Sequence[str]) -> str | None:
    matches = difflib.get_close_matches(wanted, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def check_path(schema: type, path: Sequence[str]) -> Any:
    """Check a dotted path against a pydantic model and return the annotation of the value it sets.

    Raises ``ValueError`` naming the closest valid path when a key is unknown, or when the path goes below a value.
    """
    current: Any = schema
    for i, segment in enumerate(path):
        here = ".".join(path[: i + 1])
        if _is_model(current):
            fields = current.model_fields
            if segment not in fields:
                parent = ".".join(path[:i])
                sibling = _closest(segment, list(fields))
                guess = f"{parent}.{sibling}" if sibling and parent else sibling
                completed = ".".join([guess, *path[i + 1 :]]) if guess else None
                if completed and completed in all_paths(schema):
                    guess = completed
                under = f" under '{parent}'" if parent else ""
                hint = f"; did you mean '{guess}'?" if guess else f"; valid keys{under}: {', '.join(fields)}"
                raise ValueError(f"unknown key '{here}'{hint}")
            current = field_target(fields[segment].annotation)
        elif isinstance(current, tuple) and current[0] == "mapping":
            # Free-form key of a dict field, e.g. loss.weights.depth; what it holds is the dict's value type.
            current = ("leaf", current[1])
        else:
            parent = ".".join(path[:i])
            raise ValueError(f"'{parent}' is a value, not a section; cannot set '{here}'")
    if _is_model(current):
        return current
    return current[1] if current[0] == "leaf" else dict


def _wants_text(annotation: Any) -> tuple[bool, bool]:
    """(the field is a plain string, it accepts null)."""
    origin = typing.get_origin(annotation)
    nullable = (origin is typing.Union or origin is types.UnionType) and type(None) in typing.get_args(annotation)
    args = _union_args(annotation)
    return (len(args) == 1 and args[0] is str), nullable


def apply_overrides(
    data: Mapping[str, Any], overrides: Sequence[str | Override], *, schema: type | None = None
) -> dict[str, Any]:
    """Return a deep copy of ``data`` with the overrides applied left to right.

    With a pydantic ``schema``, every path is checked first (``ValueError`` naming the closest valid path), and the
    raw text is kept for string fields. Intermediate sections that are missing, or not mappings, become dicts.
    """
    result: dict[str, Any] = copy.deepcopy(dict(data))
    for item in overrides:
        override = item if isinstance(item, Override) else parse_override(item)
        value = override.value
        if schema is not None:
            annotation = check_path(schema, override.path)
            is_text, nullable = _wants_text(annotation)
            if is_text and not isinstance(value, str) and not (nullable and override.raw.strip() in _NULL_WORDS):
                value = override.raw.strip()
        node = result
        for segment in override.path[:-1]:
            child = node.get(segment)
            if not isinstance(child, dict):
                child = {}
                node[segment] = child
            node = child
        node[override.path[-1]] = value
    return result
