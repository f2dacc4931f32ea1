"""Where the project's own files are, in a checkout and in an installed wheel.

The Hydra config tree lives at the top of the repository (`conf/`, beside the
package). A wheel carries the same files as package data under `sparsevlm_exp/conf/`
(pyproject maps the one directory into the package; there is no second copy in git).
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _conf_dir() -> Path:
    # A wheel install first: `site-packages/conf` beside the package could belong to
    # any other distribution, so the checkout layout is only trusted when the packaged
    # copy is absent.
    for candidate in (PACKAGE_DIR / "conf", PACKAGE_DIR.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"sparsevlm_exp: no Hydra config tree found at {PACKAGE_DIR / 'conf'} (installed wheel) "
        f"or {PACKAGE_DIR.parent / 'conf'} (checkout): reinstall the package")


CONF_DIR: Path = _conf_dir()   # the config tree the CLI, the bench and the library compose from
