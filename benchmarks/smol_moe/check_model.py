"""Refuse to add cells to a results folder whose cells ran on a different smol-moe build.

    python benchmarks/smol_moe/check_model.py [--out benchmarks/results/smol-moe]

smol-moe is carved on the machine that first loads it, and a build on another machine need not
be bit-identical (the carving's least squares and k-means run on that machine's BLAS), so a
matrix spanning sessions could otherwise mix base models without saying so. The first call
records the build in ``OUT/model.json``; a later call passes only when this machine's build has
the same fingerprint and weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

from flexmoe.hardware import Placement
from flexmoe.io import atomic_write_text
from flexmoe.loading import fingerprint, load_model, resolve_model_path

OUT = Path(__file__).resolve().parents[1] / "results" / "smol-moe"
MODEL = "smol-moe"


def this_build() -> dict[str, str]:
    """The smol-moe build on this machine (built now if absent): fingerprint and weights hash."""
    model, _ = load_model(MODEL, Placement(torch.device("cpu"), torch.float32))
    with (resolve_model_path(MODEL) / "model.safetensors").open("rb") as weights:
        digest = hashlib.file_digest(weights, "sha256").hexdigest()
    return {"fingerprint": fingerprint(model), "weights_sha256": digest}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    record = parser.parse_args().out / "model.json"
    build = this_build()
    if not record.is_file():
        atomic_write_text(record, json.dumps({"model": MODEL, **build}, indent=1) + "\n")
        print(f"recorded this smol-moe build in {record}: {build['fingerprint']}")
        return 0
    recorded = json.loads(record.read_text(encoding="utf-8"))
    if all(recorded.get(key) == value for key, value in build.items()):
        print(f"smol-moe build {build['fingerprint']} is the one {record} records")
        return 0
    print(
        f"this machine's smol-moe build ({build['fingerprint']}) is not the one the cells in "
        f"{record.parent} ran on ({recorded.get('fingerprint')}): finish the matrix on that "
        "build, or start a new results folder (--out) for this one",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
