"""Does a carving depend on the order of float sums? smol-moe's recipe carved with 1 and 2 torch
threads, side by side, on the first calibration batches (another thread count sums in another
order, as another CPU's BLAS does).

    python benchmarks/smol_moe/carving_threads.py [--batches 2] [--carving FILE]

``--carving`` carves with another version of ``flexmoe/models/carving.py``, e.g. the float32 one
of smol-moe v1: ``git show d6edcb7:src/flexmoe/carving.py > /tmp/carving_v1.py``. Needs the cached
smol-moe build's GGUF (``flexmoe info smol-moe`` makes it); about 4 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from check_model import largest_move, summary  # beside this script

from flexmoe.cache import cache_dir
from flexmoe.data import calibration_texts, text_batches
from flexmoe.models.loading import CALIBRATION_SEQ_LEN, SMOL_CARVING, SMOL_GGUF, load_dense_model


def carve_once(carving_file: str | None, batches: int, out: Path) -> None:
    """Carve on this process's thread count and save the weights and the partition to ``out``."""
    carving = importlib.import_module("flexmoe.models.carving")
    if carving_file:
        spec = importlib.util.spec_from_file_location("other_carving", carving_file)
        carving = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = carving  # its dataclasses look their module up
        spec.loader.exec_module(carving)
    dense, tokenizer = load_dense_model(cache_dir() / "models" / Path(SMOL_GGUF).name)
    texts = calibration_texts().values()
    calibration = text_batches(tokenizer, texts, CALIBRATION_SEQ_LEN, batch_size=8)[:batches]
    model, report = carving.carve(dense, calibration, SMOL_CARVING)
    partition = [(layer.shared, layer.experts) for layer in report.layers]
    torch.save({"weights": model.state_dict(), "partition": partition}, out)


def compare(first: dict, second: dict) -> None:
    a, b = first["weights"], second["weights"]
    total = sum(t.numel() for t in a.values())
    differ = {k: a[k] != b[k] for k in a}
    _, moved = largest_move(
        {k: summary(t) for k, t in a.items()}, {k: summary(t) for k, t in b.items()}
    )
    relative = max(
        (
            float(((a[k] - b[k]).abs() / a[k].abs().clamp_min(1e-30))[d].max())
            for k, d in differ.items()
            if d.any()
        ),
        default=0.0,
    )
    print(f"same partition: {first['partition'] == second['partition']}")
    print(f"values that differ: {sum(int(d.sum()) for d in differ.values()):,} of {total:,}")
    print(f"largest difference of a value, relative to it: {relative:.2e}")
    print(f"largest move of a tensor's norm or projection, relative to its norm: {moved:.2e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--carving", help="another carving.py to carve with")
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)  # one carving, internal
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        carve_once(args.carving, args.batches, args.save)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        saved = []
        for threads in (1, 2):
            saved.append(Path(scratch) / f"threads-{threads}.pt")
            command = [sys.executable, __file__, "--batches", str(args.batches)]
            command += ["--threads", str(threads), "--save", str(saved[-1])]
            subprocess.run(
                command + (["--carving", args.carving] if args.carving else []), check=True
            )
        compare(*(torch.load(path) for path in saved))
    return 0


if __name__ == "__main__":
    sys.exit(main())
