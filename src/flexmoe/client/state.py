"""A client's personal state on node-local disk: one folder per round, each swapped in atomically.

A round always starts from the state of the latest earlier round, so a run resumed after a crash
redoes an unfinished round from the same state and gets the same result.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from flexmoe.flex.model import FlexModel
from flexmoe.io import atomic_write_text, make_private, private_folder

KEEP_ROUNDS = 2


class StateStore:
    """``root/round-NNNN`` folders of one client (the newest ``keep`` are kept) and its test
    predictions, ``root/predictions/round-NNNN.jsonl`` (all kept)."""

    def __init__(self, root: Path, keep: int = KEEP_ROUNDS) -> None:
        self.root = Path(root)
        self.keep = keep

    def rounds(self) -> list[int]:
        """The rounds saved, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(int(p.name[6:]) for p in self.root.glob("round-[0-9]*"))

    def latest(self, before: int) -> Path | None:
        """The folder of the latest round saved before ``before``, if any."""
        rounds = [r for r in self.rounds() if r < before]
        return self.folder(rounds[-1]) if rounds else None

    def folder(self, round_: int) -> Path:
        return self.root / f"round-{round_:04d}"

    def save(self, model: FlexModel, round_: int, include_shared: bool) -> Path:
        """Write ``model``'s personal state for ``round_``, then prune the rounds before it.

        Only earlier rounds are pruned. A later round left by an interrupted attempt is not read
        by the rounds that redo it (each starts from the latest *earlier* round) and is
        overwritten when redone; with ``fraction-train`` < 1 a client that the resumed run does
        not sample again for that round would read it later (see the README).
        """
        final = self.folder(round_)
        staging = self.private_root() / f".{final.name}.tmp"
        for leftover in self.root.glob(".round-*.tmp"):  # one writer per client: all are stale
            shutil.rmtree(leftover, ignore_errors=True)
        model.save_pretrained(staging, include_shared=include_shared)
        make_private(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        earlier = [r for r in self.rounds() if r < round_]
        for old in earlier[: max(0, len(earlier) - (self.keep - 1))]:
            shutil.rmtree(self.folder(old), ignore_errors=True)
        return final

    def save_predictions(self, round_: int, rows: Sequence[dict]) -> Path:
        """Write the predictions of the evaluation after ``round_``, one JSON object a line."""
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        folder = private_folder(self.private_root() / "predictions")
        return atomic_write_text(folder / f"round-{round_:04d}.jsonl", text, private=True)

    def private_root(self) -> Path:
        """The client's folder, and the run's above it, made its owner's alone: its state and
        predictions quote and are fitted to its private data."""
        private_folder(self.root.parent)
        return private_folder(self.root)
