"""Checking a config node against the signature of the callable it builds.

A component's config (``method``, ``model``, ``task``, ``pruning``, ``optim``, ...) names its
``_target_``; the target's keyword parameters are the component's schema: their names are
the valid keys, their annotations the types, and ``Annotated[..., Range(...)]`` the allowed
ranges. So a component is validated from one place, its constructor or builder signature,
before anything is built::

    def __init__(self, *, alpha: Annotated[float, Range(ge=0, le=1)] = 0.5, ...)

:func:`check_node` reports unknown keys (with the closest valid one), values of the wrong
type and values out of range as :class:`~kdlab.errors.ConfigError` naming the key, the
value and what is allowed. Rules across keys that a signature cannot state are the
target's ``check_config(cfg)``, which :mod:`kdlab.components` calls: a classmethod of a class,
given to a builder function by :func:`with_config_check`.
"""

import difflib
import inspect
import operator
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdlab.errors import ConfigError

# Keys of a config node that tell Hydra how to build it rather than parametrise it.
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})


@dataclass(frozen=True)
class Range:
    """Bounds of a number, for ``Annotated[float, Range(...)]`` parameters.

    Args:
        ge: the value must be at least this.
        gt: the value must be greater than this.
        le: the value must be at most this.
        lt: the value must be less than this.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def violation(self, value: float) -> str | None:
        """What is wrong with ``value``, or None when it is in range."""
        checks = (
            (self.ge, operator.ge, ">="),
            (self.gt, operator.gt, ">"),
            (self.le, operator.le, "<="),
            (self.lt, operator.lt, "<"),
        )
        bounds = [(bound, op, sign) for bound, op, sign in checks if bound is not None]
        if all(op(value, bound) for bound, op, _ in bounds):
            return None
        return "must be " + " and ".join(f"{sign} {bound:g}" for bound, _, sign in bounds)


# The ranges kdlab's signatures use most.
Probability = Annotated[float, Range(ge=0, le=1)]
Positive = Annotated[float, Range(gt=0)]
NonNegative = Annotated[float, Range(ge=0)]
PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]

Builder = TypeVar("Builder", bound=Callable)


def with_config_check(*checks: Callable[[DictConfig], None]) -> Callable[[Builder], Builder]:
    """Decorator giving a builder function rules across keys: ``checks``, in order, become
    its ``check_config``, where :mod:`kdlab.components` looks for every target's rules (a
    class states them as a ``check_config`` classmethod).

    Args:
        checks: each called with the whole composed config before anything loads; raise
            :class:`~kdlab.errors.ConfigError`.
    """

    def check_config(cfg: DictConfig) -> None:
        for check in checks:
            check(cfg)

    def attach(builder: Builder) -> Builder:
        builder.check_config = check_config
        return builder

    return attach


def _levels(target: Callable) -> list[Callable]:
    if isinstance(target, type):
        return [c.__init__ for c in target.__mro__ if "__init__" in vars(c) and c is not object]
    return [target]


def parameters(target: Callable) -> tuple[dict[str, inspect.Parameter], bool]:
    """The keyword parameters ``target`` accepts, following ``**kwargs`` up the MRO.

    A subclass that forwards ``**base`` to its parent accepts the parent's parameters too;
    the walk stops at the first ``__init__`` without ``**kwargs``. ``**options:
    Unpack[SomeTypedDict]`` accepts exactly the TypedDict's keys.

    Returns:
        The parameters by name, and whether any other key is accepted too (every level
        forwards ``**kwargs``, e.g. a logger passing them on to its client).
    """
    found: dict[str, inspect.Parameter] = {}
    for level in _levels(target):
        forwards = False
        hints = _hints(level)
        for name, param in inspect.signature(level).parameters.items():
            if param.kind is param.VAR_KEYWORD:
                schema = _unpacked(hints.get(name))
                if schema is None:
                    forwards = True
                    continue
                for key in typing.get_type_hints(schema):
                    default = inspect.Parameter.empty if key in schema.__required_keys__ else None
                    found.setdefault(
                        key, inspect.Parameter(key, param.KEYWORD_ONLY, default=default)
                    )
            elif param.kind is not param.VAR_POSITIONAL and name != "self":
                found.setdefault(name, param)
        if not forwards:
            return found, False
    return found, True


def annotations(target: Callable) -> dict[str, Any]:
    """Type hints (with their ``Annotated`` extras) of the levels :func:`parameters` reads."""
    merged: dict[str, Any] = {}
    for level in reversed(_levels(target)):
        for name, hint in _hints(level).items():
            schema = _unpacked(hint)
            if schema is not None:
                merged.update(typing.get_type_hints(schema, include_extras=True))
            else:
                merged[name] = hint
    return merged


def _hints(level: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(level, include_extras=True)
    except (NameError, TypeError):  # a third-party signature with unresolvable hints
        return {}


def _unpacked(hint: Any) -> type | None:
    """The TypedDict of a ``**kwargs: Unpack[TypedDict]`` hint, else None."""
    origin = typing.get_origin(hint)
    if origin is not None and getattr(origin, "_name", repr(origin)).endswith("Unpack"):
        schema = typing.get_args(hint)[0]
        return schema if typing.is_typeddict(schema) else None
    return None


def check_node(
    node: DictConfig,
    key: str,
    target: Callable,
    runtime: Iterable[str] = (),
    *,
    check_files: bool = True,
) -> None:
    """Check the keys and values of one component's config against ``target``'s signature.

    Args:
        node: the component's config (``cfg.method``, ``cfg.model``, ...).
        key: its dotted path in the root config, for messages.
        target: the callable ``node._target_`` names.
        runtime: keyword arguments the run passes itself (the student, the tokenizer, ...):
            the config must not set them.
        check_files: apply the checks that look at the file system (local paths exist).

    Raises:
        ConfigError: naming the first key whose name, type or value is not allowed.
    """
    params, accepts_any = parameters(target)
    hints = annotations(target)
    runtime = set(runtime)
    valid = sorted(set(params) - runtime)
    for name in node:
        if name in HYDRA_KEYS:
            continue
        if name in runtime:
            raise ConfigError(
                f"{key}.{name} cannot be set in the config: the run provides it "
                f"({_qualname(target)})."
            )
        if name not in params:
            if accepts_any:
                continue
            raise ConfigError(
                f"{key}.{name} is not a setting of {_qualname(target)}{_hint(name, valid)}"
            )
        value = _resolved(node, name, key)
        problem = check_value(value, hints.get(name), check_files=check_files)
        if problem:
            source = source_key(node._get_root(), f"{key}.{name}")
            source = f" (from {source})" if source != f"{key}.{name}" else ""
            raise ConfigError(f"{key}.{name}={_show(value)}{source} {problem}.")
    for name, param in params.items():
        required = param.default is inspect.Parameter.empty
        if required and name not in runtime and name not in node:
            raise ConfigError(f"{key}.{name} must be set ({_qualname(target)} needs it).")


def check_value(value: Any, annotation: Any, *, check_files: bool = True) -> str | None:
    """What is wrong with ``value`` for a parameter annotated ``annotation``, or None.

    Understands plain types, ``X | None``, ``Literal``, lists, tuples and mappings
    (``TypedDict`` keys included), and ``Annotated`` extras: :class:`Range` for numbers and
    any marker with a ``violation(value)`` method (one with ``touches_files`` only when
    ``check_files``); anything else is not checked.
    """
    if annotation is None or annotation is Any:
        return None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        problem = check_value(value, args[0], check_files=check_files)
        if problem:
            return problem
        for extra in args[1:]:
            if isinstance(extra, Range):
                applies = isinstance(value, int | float)
            else:
                applies = hasattr(extra, "violation") and value is not None
                applies = applies and (check_files or not getattr(extra, "touches_files", False))
            problem = extra.violation(value) if applies else None
            if problem:
                return problem
        return None
    if origin in (Union, types.UnionType):
        members = [a for a in args if a is not type(None)] if value is not None else args
        if len(members) == 1:  # `X | None` holding a value: say what is wrong with it as X
            return check_value(value, members[0], check_files=check_files)
        problems = [check_value(value, a, check_files=check_files) for a in args]
        if any(p is None for p in problems):
            return None
        return "must be " + " or ".join(_describe(a) for a in args)
    if origin is Literal:
        if value in args:
            return None
        match = closest(str(value), [str(a) for a in args])
        return f"must be one of {list(args)}" + (f": did you mean `{match}`?" if match else "")
    if annotation is type(None):
        return None if value is None else "must be null"
    if annotation is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok else "must be a number"
    if annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else "must be a whole number"
    if annotation is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if annotation is str:
        return None if isinstance(value, str) else "must be a string"
    if typing.is_typeddict(annotation):
        return _check_typed_dict(value, annotation, check_files)
    container = origin or annotation
    if container in (list, tuple, Sequence):
        return _check_sequence(value, container, args, check_files)
    if container in (dict, Mapping):
        return None if isinstance(value, DictConfig | dict) else "must be a mapping"
    return None


def _check_sequence(value: Any, container: Any, args: tuple, check_files: bool) -> str | None:
    if not isinstance(value, ListConfig | list | tuple):
        return "must be a list"
    if container is tuple and args and args[-1] is not ...:
        if len(value) != len(args):
            return f"must be a list of {len(args)} items"
        items = zip(value, args, strict=True)
    else:
        items = ((item, args[0] if args else None) for item in value)
    for item, annotation in items:
        problem = check_value(item, annotation, check_files=check_files)
        if problem:
            return f"has an item {_show(item)} that {problem}"
    return None


def _check_typed_dict(value: Any, schema: type, check_files: bool) -> str | None:
    if not isinstance(value, DictConfig | dict):
        return "must be a mapping"
    hints = typing.get_type_hints(schema, include_extras=True)
    required = getattr(schema, "__required_keys__", frozenset(hints))
    for name in value:
        if name not in hints:
            return f"has an unknown key '{name}'{_hint(str(name), sorted(hints))}"
    for name in sorted(required):
        if name not in value:
            return f"needs the key '{name}'"
    for name, item in value.items():
        problem = check_value(item, hints[name], check_files=check_files)
        if problem:
            return f"has {name}={_show(item)}, which {problem}"
    return None


def missing_keys(cfg: DictConfig) -> list[str]:
    """Dotted keys whose value is ``???`` (required, never set), sorted."""
    return sorted(OmegaConf.missing_keys(cfg))


def closest(name: str, choices: Sequence[str]) -> str | None:
    """The choice most like ``name`` (a likely typo), or None."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return match[0] if match else None


def _hint(name: str, choices: Sequence[str]) -> str:
    match = closest(name, choices)
    if match:
        return f": did you mean `{match}`?"
    return f" (valid: {', '.join(choices)})" if choices else ""


def _resolved(node: DictConfig, name: str, key: str) -> Any:
    try:
        value = node[name]
    except OmegaConfBaseException as err:
        raise ConfigError(f"{key}.{name} cannot be resolved: {err}") from None
    if isinstance(value, DictConfig | ListConfig):
        try:
            return OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{key}.{name} cannot be resolved: {err}") from None
    return value


def source_key(cfg: DictConfig, key: str) -> str:
    """The key the user sets for the dotted ``key`` of ``cfg``: the end of its chain of
    plain interpolations (``model.tokenizer`` → ``${.path}`` → ``model.path`` →
    ``${teacher.path}`` → ``teacher.path``), or ``key`` itself."""
    seen = {key}
    while True:
        parent, _, name = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig) or not OmegaConf.is_interpolation(node, name):
            return key
        match = re.fullmatch(r"\$\{(\.*)([\w.]+)\}", str(node._get_node(name)._value()))
        if match is None:  # a resolver (${stage:...}) or a string around one: set here
            return key
        dots, target = match.groups()
        # `${.x}` is a sibling of `name`, each further dot one level up (OmegaConf's rule).
        parts = parent.split(".") if parent else []
        base = parts[: len(parts) - (len(dots) - 1)] if dots else []
        key = ".".join([*base, target])
        if key in seen:
            return key
        seen.add(key)


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    names = {float: "a number", int: "a whole number", bool: "true/false", str: "a string"}
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) is Literal:
        return f"one of {list(typing.get_args(annotation))}"
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _qualname(target: Callable) -> str:
    return f"{target.__module__}.{target.__qualname__}"
