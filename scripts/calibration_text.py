"""Write the packaged calibration text: a seeded sample of each corpus domain's train documents.

``flexmoe carve`` fits its neuron partition and routers on this text. It comes from the same
seven domains as the packaged held-out text (``assets/heldout``) but only from their train split,
so carving never sees the text that perplexity is measured on.

    python scripts/calibration_text.py [--chars 20000] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from corpus import DOMAINS, load_corpus

SPLIT_SEED = 0  # the train/held-out split of assets/heldout: never change it here
TARGET = Path(__file__).resolve().parents[1] / "src" / "flexmoe" / "assets" / "calibration"


def sample_documents(documents: list[str], chars: int, seed: int) -> str:
    """Whole documents in a seeded random order until about ``chars`` characters."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for index in order:
        if total >= chars:
            break
        chosen.append(documents[index].strip())
        total += len(chosen[-1])
    return "\n\n".join(chosen) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=20_000, help="per domain")
    parser.add_argument("--seed", type=int, default=0, help="of the document sample")
    args = parser.parse_args()
    TARGET.mkdir(parents=True, exist_ok=True)
    for domain, split in load_corpus(DOMAINS, seed=SPLIT_SEED).items():
        text = sample_documents(split.train, args.chars, args.seed)
        (TARGET / f"{domain}.txt").write_text(text, encoding="utf-8")
        print(f"{domain:<12} {len(text):>7,} chars")


if __name__ == "__main__":
    main()
