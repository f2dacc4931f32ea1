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
    try:
        return instantiate(node, _convert_="all")
    except Exception as err:             # noqa: BLE001 - re-raised as ConfigError, never swallowed
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ is not None else err
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(f"{key}: {cause}") from None
