"""One run, resolved once: its settings, its output folder and the checkpoint it continues.

Every check of a run's folder is here: a run already in it (continued only when asked, and only
as itself), results of an earlier run, a checkpoint's files (read once, whole, so that damage
shows before any process starts). Simulation, deployment and the federation take the ``Run``.
"""

from __future__ import annotations

import contextlib
import functools
import random
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from flwr.serverapp.strategy import Strategy
from safetensors import SafetensorError
from safetensors.numpy import load_file

from flexmoe.client.state import StateStore
from flexmoe.errors import FlexMoEError
from flexmoe.federated.protocol import client_state_dir
from flexmoe.federated.strategies import accountant_of, make_strategy, restore_strategy_state
from flexmoe.io import folder_lock
from flexmoe.methods import Method
from flexmoe.results import (
    CHECKPOINT_FILE,
    CLIENTS_DIR,
    RESULTS_FILE,
    Checkpoint,
    read_checkpoint,
)
from flexmoe.schema import kebab
from flexmoe.settings import ADDED_LATER, RESUMABLE_SETTINGS, Settings, as_saved

# settings of the fixed test pools: a checkpoint without them split its data another way
DATA_SPLIT_SETTINGS = ("categories", "test-per-category")


class Resume(StrEnum):
    """What to do with a run already saved in the output folder."""

    NEVER = "never"  # refuse it: a new run (flexmoe run, deploy-local)
    IF_SAVED = "if-saved"  # continue it if there is one, else start (flwr run)
    REQUIRED = "required"  # continue it; none is an error (flexmoe run --resume)


@dataclass(frozen=True)
class Saved:
    """A run's checkpoint, read once: the server's state, its settings and its arrays."""

    state: Checkpoint
    settings: Settings
    shared: dict[str, np.ndarray]
    strategy: dict[str, np.ndarray]


@dataclass(frozen=True)
class Run:
    """A run to start or continue: what it computes, where it writes, what it resumes."""

    settings: Settings
    out: Path
    strategy: Strategy = field(compare=False, repr=False)  # built once; a resumed run's restored
    saved: Saved | None = None  # the checkpoint a resumed run continues from
    regraft: tuple[int, ...] = ()  # clients of a resumed run that start afresh

    @functools.cached_property
    def method(self) -> Method:
        return self.settings.chosen_method()


def resolve_run(
    out: Path,
    settings: Settings | None = None,
    given: dict[str, Any] | None = None,
    resume: Resume = Resume.NEVER,
    regraft: Sequence[int] = (),
) -> Run:
    """The run in ``out`` with ``settings``, or those of the saved run it continues (or the
    defaults), with the settings ``given`` (flat, dotted or grouped names) over them.

    A resumed run keeps its own settings, but for ``RESUMABLE_SETTINGS``; a folder holding a
    run is refused unless ``resume`` says to continue it, and one holding results always.
    """
    saved = read_saved(out) if (out / CHECKPOINT_FILE).is_file() else None
    if saved is None:
        if resume is Resume.REQUIRED:
            raise FlexMoEError(
                f"{out} holds no run to resume (no {CHECKPOINT_FILE}); give the output folder "
                "of an earlier 'flexmoe run'"
            )
        if (out / RESULTS_FILE).is_file():
            raise FlexMoEError(f"{out} holds the results of an earlier run; give another --out")
        if regraft:
            raise FlexMoEError("--regraft applies to a resumed run; give it with --resume")
    elif resume is Resume.NEVER:
        raise FlexMoEError(f"{describe(out, saved)}; continue it with --resume {out}")
    if settings is None:
        settings = saved.settings if saved is not None else Settings()
    settings = settings.updated(given or {})
    strategy = make_strategy(settings)
    if saved is not None:
        check_resumable(out, saved, settings)
        restore_server_state(out, saved, strategy)
    return Run(settings, out, strategy, saved, tuple(regraft))


def restore_server_state(out: Path, saved: Saved, strategy: Strategy) -> None:
    """Put a checkpoint's strategy state and privacy accountant back into ``strategy``, and
    check its node-sampling state (put back when the rounds start): damage is one error here,
    before any process starts."""
    try:
        restore_strategy_state(strategy, saved.strategy)
        if saved.state.privacy_state is not None and accountant_of(strategy) is not None:
            accountant_of(strategy).load_state_dict(saved.state.privacy_state)
        if saved.state.random_state is not None:
            random.Random().setstate(python_random_state(saved.state.random_state))
    except (KeyError, TypeError, ValueError) as error:
        raise FlexMoEError(
            f"{out / CHECKPOINT_FILE}: the saved server state is damaged ({error}); start the "
            "run again in a new folder"
        ) from None


def python_random_state(saved: list) -> tuple:
    """Python's ``random`` state as a checkpoint's JSON keeps it (lists for tuples)."""
    version, internal, gauss = saved
    return version, tuple(internal), gauss


def check_client_states(run: Run) -> None:
    """Refuse to resume ``run`` while a client that took part in it has lost its personal state
    (under ``OUT/clients``, where a simulation keeps it), unless ``run.regraft`` names that
    client; and refuse to regraft a client whose state is there."""
    if run.saved is None:
        return
    state = run.saved.state
    last_round = {c.client_id: r.round for r in state.history for c in r.clients}
    root = run.out / CLIENTS_DIR
    folders = {
        client: StateStore(client_state_dir(root, state.run_id, client)).folder(round_)
        for client, round_ in sorted(last_round.items())
    }
    missing = {client: folder for client, folder in folders.items() if not folder.is_dir()}
    kept = sorted(set(run.regraft) - set(missing))
    if kept:
        raise FlexMoEError(
            f"--regraft names client {', '.join(map(str, kept))}, whose personal state is in "
            f"{root / state.run_id}; name only clients whose state is missing"
        )
    lost = {client: folder for client, folder in missing.items() if client not in run.regraft}
    if lost:
        names = ", ".join(f"{client} ({folder})" for client, folder in lost.items())
        raise FlexMoEError(
            f"{run.out}: the personal state of client {names} is missing, so resuming would "
            f"graft {'it' if len(lost) == 1 else 'them'} afresh; put it back, or accept a fresh "
            f"graft with --regraft {','.join(map(str, lost))} (recorded in the results)"
        )


def check_resumable(out: Path, saved: Saved, settings: Settings) -> None:
    """Refuse to continue the run in ``out`` with other settings than its own, but for
    ``RESUMABLE_SETTINGS`` (the rounds may grow, and the server may wait otherwise)."""
    if settings.federation.rounds < saved.state.round:
        rounds = settings.federation.rounds
        raise FlexMoEError(f"{describe(out, saved)}: it cannot resume to {rounds} rounds")
    changed = [
        f"{name} {before!r} -> {after!r}"
        for name, (before, after) in saved.settings.differences(settings).items()
        if name not in RESUMABLE_SETTINGS
    ]
    if changed:
        raise FlexMoEError(
            f"{describe(out, saved)} with other settings ({'; '.join(changed)}); resume it "
            f"with its own settings (only {' and '.join('--' + n for n in RESUMABLE_SETTINGS)} "
            "may change) or start a run in another folder"
        )


def describe(out: Path, saved: Saved) -> str:
    """``OUT holds run ID (round k of n, method M)``."""
    return (
        f"{out} holds run {saved.state.run_id} (round {saved.state.round} of "
        f"{saved.settings.federation.rounds}, method {saved.settings.method})"
    )


def read_saved(out: Path) -> Saved:
    """The checkpoint in ``out`` with the arrays it names; a missing or damaged part is one
    error naming it."""
    state, settings = read_run_state(out)
    arrays = []
    for kind in ("shared", "strategy"):
        path = state.arrays_path(out, kind)
        try:
            arrays.append(load_file(path))
        except (SafetensorError, OSError) as error:
            raise FlexMoEError(
                f"{str(path)!r} cannot be read ({error}); the checkpoint of {out} is damaged, "
                "so the run cannot resume: start it again in a new folder"
            ) from None
    return Saved(state, settings, arrays[0], arrays[1])


def read_run_state(out: Path) -> tuple[Checkpoint, Settings]:
    """The checkpoint in ``out`` and the settings it ran with, without its arrays."""
    state = read_checkpoint(out)
    state.run_id = state.run_id or out.resolve().name  # a run made before run ids: its old key
    return state, saved_settings(out, state.config)


def saved_settings(out: Path, flat: dict[str, Any]) -> Settings:
    """The settings a checkpoint recorded (flat names); those it predates take the values it
    ran with (``ADDED_LATER``)."""
    known = {kebab(k) for k in flat} | set(ADDED_LATER)
    if not known & set(DATA_SPLIT_SETTINGS):
        raise FlexMoEError(
            f"{out} was made by a flexmoe before fixed test pools, whose clients' data this "
            "one does not rebuild; start a new run instead of resuming it"
        )
    try:
        missing = sorted(set(Settings().to_flat()) - known)
        if missing:
            raise FlexMoEError(f"no {', '.join(missing[:3])}")
        return Settings().updated(as_saved(flat))
    except FlexMoEError as error:
        raise FlexMoEError(
            f"{out / CHECKPOINT_FILE}: the saved settings are damaged ({error})"
        ) from None


@contextlib.contextmanager
def claimed(out: Path) -> Iterator[None]:
    """Hold ``out`` (``folder_lock``) for the block; a folder the block made and left without
    a checkpoint (a bad model or data: nothing to keep) is removed if the block fails."""
    made = not out.exists()
    try:
        with folder_lock(out):
            yield
    except BaseException:
        if made and not (out / CHECKPOINT_FILE).exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
