"""The one exception type the CLI turns into a single clear line (no traceback).

Raise ConfigError for anything the user can fix by changing a config value or a
path: name the key, the value, and what is allowed. Raise it BEFORE expensive
work (model weights, dataset scans) wherever the check can be made earlier.
"""


class ConfigError(ValueError):
    pass


def bad_value(key: str, value, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not allowed: {allowed}")
