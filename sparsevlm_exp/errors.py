"""The one exception type the CLI turns into a single clear line (no traceback).

Raise ConfigError for anything the user can fix by changing a config value or a
path: name the key, the value, and what is allowed. Raise it BEFORE expensive
work (model weights, dataset scans) wherever the check can be made earlier.
"""
from hydra.errors import InstantiationException
from hydra.utils import instantiate


class ConfigError(ValueError):
    pass


def bad_value(key: str, value, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def build(node, key: str):
    """hydra.utils.instantiate(node) with the constructor's errors turned into one
    ConfigError line naming the config group `key` (a constructor that validates its
    arguments raises ValueError; an unknown keyword is a TypeError).

    Hydra 1.3 wraps a constructor's exception in InstantiationException; Hydra 1.4
    re-raises the exception itself with a 'full_key' note. Both end here the same way.
    """
    check_types(node, key)
    try:
        return instantiate(node, _convert_="all")
    except Exception as err:             # noqa: BLE001 - re-raised as ConfigError, never swallowed
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ is not None else err
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(f"{key}: {cause}") from None


def type_name(hint) -> str | None:
    """'an int', 'a float', ... for the simple annotations we check; None for others."""
    return {bool: "true or false", int: "an int", float: "a number", str: "a string"}.get(hint)


def _simple_types(hint) -> tuple[list, bool] | None:
    """(the plain types an annotation allows, whether None is allowed), or None when the
    annotation is not made only of bool/int/float/str/None (then we do not check it)."""
    import types
    import typing

    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    allowed = [a for a in args if a is not type(None)]
    if not allowed or any(a not in (bool, int, float, str) for a in allowed):
        return None
    return allowed, len(allowed) != len(args)


def _matches(value, allowed: list) -> bool:
    for hint in allowed:
        if hint is bool and isinstance(value, bool):
            return True
        if hint is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if hint is str and isinstance(value, str):
            return True
    return False


def check_types(node, key: str) -> None:
    """Check a config node's plain values against the annotations of its `_target_`'s
    constructor (`decoder.max_new_tokens: int`, `scorer.head_fraction: float`), so that
    `decoder.max_new_tokens=abc` is refused as one line naming the key instead of failing
    later inside the constructor. The constructor's annotations are the schema: there
    is one place to change a type. Annotations other than bool/int/float/str (and
    Optional of them) are not checked here."""
    import inspect
    import typing

    from omegaconf import DictConfig

    target = node.get("_target_") if isinstance(node, (dict, DictConfig)) else None
    obj = _locate(target) if isinstance(target, str) else None
    if obj is None:
        return                           # unknown target: instantiate reports it
    fn = obj.__init__ if isinstance(obj, type) else obj
    try:
        hints = typing.get_type_hints(fn)
    except Exception:                    # noqa: BLE001 - unresolvable annotation: nothing to check
        return
    params = inspect.signature(fn).parameters
    for name, value in node.items():
        if name.startswith("_") or name not in hints or name not in params:
            continue
        simple = _simple_types(hints[name])
        if simple is None:
            continue
        allowed, none_ok = simple
        if value is None:
            if not none_ok:
                raise bad_value(f"{key}.{name}", value, type_name(allowed[0]))
            continue
        if isinstance(value, (dict, list, DictConfig)) or not _matches(value, allowed):
            words = " or ".join(type_name(a) for a in allowed) + (" or null" if none_ok else "")
            raise bad_value(f"{key}.{name}", value, words)


def _locate(path: str):
    """The object a dotted `_target_` names (module attribute, class, or classmethod), or None."""
    import importlib

    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            return None
        return obj
    return None
