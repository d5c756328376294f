"""Refuse to add cells to a results folder whose cells ran on a different smol-moe build.

    python benchmarks/smol_moe/check_model.py [--out benchmarks/results/smol-moe]

smol-moe is carved on the machine that first loads it. Carving computes in float64 so that
machines make the same choices, but a matrix spanning sessions (each on a fresh machine) must not
mix base models without saying so. The first call records the build in ``OUT/model.json``; a
later call passes when this machine's build is the same: bit for bit, or with the same carving
(every expert's neurons), the same fingerprint, and every tensor's norm and a random projection of
it within ``RTOL`` of its norm (values that differ by about ``RTOL`` of themselves or less; it
says which).
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
from flexmoe.models.loading import CARVE_REPORT, fingerprint, load_model, resolve_model_path

OUT = Path(__file__).resolve().parents[1] / "results" / "smol-moe"
MODEL = "smol-moe"
RTOL = 1e-6  # float32 rounding moves a value by 6e-8 of itself at most


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
        "build": folder.name,
        "fingerprint": fingerprint(model),
        "weights_sha256": digest,
        "carving_sha256": hashlib.sha256(carving.encode()).hexdigest(),
        "tensors": {name: summary(tensor) for name, tensor in model.state_dict().items()},
    }


def summary(tensor: torch.Tensor) -> list[float]:
    """Its norm, and its projection on a fixed random sign vector: a change of every value by
    ``d`` of itself moves the projection by about ``d`` of the norm (the norm by far less)."""
    values = tensor.detach().double().flatten()
    signs = torch.randint(0, 2, values.shape, generator=torch.Generator().manual_seed(0))
    return [float(values.norm()), float((values * (2 * signs - 1)).sum())]


def compare(recorded: dict, build: dict) -> tuple[str | None, str]:
    """``(why build is not the recorded one, or None; how it agrees)``."""
    for key in ("build", "carving_sha256", "fingerprint"):
        if recorded.get(key) != build[key]:
            return f"its {key} is {build[key]}, not {recorded.get(key)}", ""
    tensors = recorded.get("tensors", {})
    if set(tensors) != set(build["tensors"]):
        return "it holds other tensors", ""
    if recorded["weights_sha256"] == build["weights_sha256"]:
        return None, "bit for bit"
    name, moved = largest_move(tensors, build["tensors"])
    if moved > RTOL:
        return f"{name} differs by {moved:.1e} of its norm (more than {RTOL:g})", ""
    return None, (
        "up to float rounding (same carving and fingerprint; the largest move, in "
        f"{name}, is {moved:.1e} of its norm)"
    )


def largest_move(first: dict, second: dict) -> tuple[str, float]:
    """The tensor whose ``summary`` moves most from ``first`` to ``second``, and by how much of
    its norm."""
    moves = {
        name: max(abs(a - b) for a, b in zip(second[name], values, strict=True))
        / max(values[0], 1e-30)
        for name, values in first.items()
    }
    name = max(moves, key=moves.get)
    return name, moves[name]


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
    reason, how = compare(recorded, build)
    if reason is not None:
        print(
            f"this machine's smol-moe build is not the one the cells in {record.parent} ran on "
            f"({reason}): finish the matrix on that build, or start a new results folder "
            "(--out) for this one",
            file=sys.stderr,
        )
        return 1
    print(f"smol-moe build {build['fingerprint']} is the one {record} records, {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
