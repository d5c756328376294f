"""flexmoe's tests, laid out as the package is: one folder per subpackage."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout
