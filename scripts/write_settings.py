"""Write the settings' declarations (flexmoe.settings) into the two places that list them:
pyproject.toml's [tool.flwr.app.config] table and the settings table of docs/running.md.

Run it after changing a setting; tests/test_settings.py fails while either is out of date.
"""

from __future__ import annotations

import re
from pathlib import Path

from flexmoe.settings import flower_app_config, settings_table

ROOT = Path(__file__).resolve().parents[1]
APP_CONFIG = re.compile(r"\[tool\.flwr\.app\.config\]\n(#[^\n]*\n)*(?P<table>(.+\n)+?)\n")
SETTINGS_TABLE = re.compile(r"^\| option \| TOML / run config \|.*?\n(?=\n|\Z)", re.M | re.S)


def write_pyproject(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    match = APP_CONFIG.search(text)
    if match is None:
        raise SystemExit(f"{path} has no [tool.flwr.app.config] table to write")
    table = flower_app_config().split("\n", 1)[1] + "\n"
    new = text[: match.start("table")] + table + text[match.end("table") :]
    path.write_text(new, encoding="utf-8")


def write_docs(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    if SETTINGS_TABLE.search(text) is None:
        raise SystemExit(f"{path} has no settings table to write")
    path.write_text(SETTINGS_TABLE.sub(settings_table() + "\n", text, count=1), encoding="utf-8")


if __name__ == "__main__":
    write_pyproject(ROOT / "pyproject.toml")
    write_docs(ROOT / "docs" / "running.md")
    print("wrote pyproject.toml [tool.flwr.app.config] and docs/running.md's settings table")
