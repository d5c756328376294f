"""Refuse to add cells to a results folder whose cells ran on a different smol-moe build.

    python benchmarks/smol_moe/check_model.py [--out benchmarks/results/smol-moe]

smol-moe is carved on the machine that first loads it. Carving computes in float64 so that every
machine carves the same model, but a matrix spanning sessions (each on a fresh machine) must not
mix base models without saying so. The first call records the build in ``OUT/model.json``; a
later call passes when this machine's build is the same: bit for bit, or with the same carving
(every expert's neurons), the same fingerprint and every tensor's norm within ``NORM_RTOL`` (a
difference in float rounding only, which says so).
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
from flexmoe.loading import CARVE_REPORT, fingerprint, load_model, resolve_model_path

OUT = Path(__file__).resolve().parents[1] / "results" / "smol-moe"
MODEL = "smol-moe"
NORM_RTOL = 1e-6  # float32 rounding moves a norm by about 1e-7


def this_build() -> dict:
    """The smol-moe build on this machine (built now if absent): what tells builds apart."""
    model, _ = load_model(MODEL, Placement(torch.device("cpu"), torch.float32))
    folder = resolve_model_path(MODEL)
    with (folder / "model.safetensors").open("rb") as weights:
        digest = hashlib.file_digest(weights, "sha256").hexdigest()
    layers = json.loads((folder / CARVE_REPORT).read_text(encoding="utf-8"))["layers"]
    carving = json.dumps([[layer["shared"], layer["experts"]] for layer in layers])
    return {
        "model": MODEL,
        "folder": str(folder).replace(str(Path.home()), "~", 1),
        "fingerprint": fingerprint(model),
        "weights_sha256": digest,
        "carving_sha256": hashlib.sha256(carving.encode()).hexdigest(),
        "norms": {name: float(p.double().norm()) for name, p in model.state_dict().items()},
    }


def difference(recorded: dict, build: dict) -> str | None:
    """Why ``build`` is not the recorded one, or None when it is."""
    for key in ("folder", "carving_sha256", "fingerprint"):
        if recorded.get(key) != build[key]:
            return f"its {key} is {build[key]}, not {recorded.get(key)}"
    norms = recorded.get("norms", {})
    if set(norms) != set(build["norms"]):
        return "it holds other tensors"
    worst = max(abs(build["norms"][k] - v) / max(v, 1e-30) for k, v in norms.items())
    if worst > NORM_RTOL:
        return f"a tensor's norm differs by {worst:.1e} of itself (more than {NORM_RTOL:g})"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    record = parser.parse_args().out / "model.json"
    build = this_build()
    if not record.is_file():
        atomic_write_text(record, json.dumps(build, indent=1) + "\n")
        print(f"recorded this smol-moe build in {record}: {build['fingerprint']}")
        return 0
    recorded = json.loads(record.read_text(encoding="utf-8"))
    reason = difference(recorded, build)
    if reason is not None:
        print(
            f"this machine's smol-moe build is not the one the cells in {record.parent} ran on "
            f"({reason}): finish the matrix on that build, or start a new results folder "
            "(--out) for this one",
            file=sys.stderr,
        )
        return 1
    exact = recorded["weights_sha256"] == build["weights_sha256"]
    how = "bit for bit" if exact else "up to float rounding (same carving and fingerprint)"
    print(f"smol-moe build {build['fingerprint']} is the one {record} records, {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
