"""The frozen base model of a client process, loaded once and lent to one client's round at a time.

A process serves many clients and rounds (a Ray actor in simulation, a node-local worker in a
deployment), and a base model of billions of parameters cannot be read from disk for every
message. The base stays loaded; each round puts one client's personal and shared state onto it
and takes them off again (``FlexModel.unload``), so nothing of one client, method or run reaches
the next. A base whose own weights were trained (``fedavg-full``) is dropped after its round and
loaded afresh for the next.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from flexmoe.errors import FlexMoEError
from flexmoe.flex.graft import grafted_blocks
from flexmoe.flex.moe import exact_routers
from flexmoe.hardware import Placement
from flexmoe.models.loading import load_model, resolve_model_path

Stamp = tuple[tuple[str, int, int], ...]  # (file, size, modification time) of a model folder


@dataclass
class _Loaded:
    key: tuple[Path, Stamp, Placement]
    model: nn.Module
    lent: bool = False


class BaseModels:
    """Holds at most one base model (the last one asked for) and counts how often it loads."""

    def __init__(self) -> None:
        self._loaded: _Loaded | None = None
        self.loads = 0

    @contextlib.contextmanager
    def lend(self, name: str, placement: Placement, trains_weights: bool) -> Iterator[nn.Module]:
        """The base model ``name`` on ``placement``, pristine, for the length of the block.

        The borrower must take its surgery off before the block ends (``FlexModel.unload``);
        ``trains_weights`` says that it changes pretrained weights, so the base is dropped.
        """
        loaded = self._get(name, placement)
        if loaded.lent:
            raise FlexMoEError("the base model is already lent to a client in this process")
        loaded.lent = True
        try:
            yield loaded.model
        except BaseException:
            self.drop()  # the failure may have left surgery half done
            raise
        finally:
            loaded.lent = False
        if trains_weights:
            self.drop()
        elif _has_adapters(loaded.model):
            self.drop()
            raise FlexMoEError(
                "a client returned the base model with its adapters still on; call "
                "FlexModel.unload() before the lending block ends"
            )

    def drop(self) -> None:
        """Forget the loaded base model, freeing its memory."""
        self._loaded = None
        gc.collect()

    def _get(self, name: str, placement: Placement) -> _Loaded:
        folder = resolve_model_path(name)
        key = (folder, _stamp(folder), placement)  # files changed on disk: load them afresh
        if self._loaded is None or self._loaded.key != key:
            self.drop()  # before loading the next, so that two never share the memory
            model, _ = load_model(name, placement)
            exact_routers(model)  # routing stays exact under mixed precision
            self._loaded = _Loaded(key, model.requires_grad_(False))
            self.loads += 1
        return self._loaded


def _stamp(folder: Path) -> Stamp:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return tuple((p.name, (s := p.stat()).st_size, s.st_mtime_ns) for p in files)


def _has_adapters(model: nn.Module) -> bool:
    return bool(grafted_blocks(model)) or any(".lora_" in n for n, _ in model.named_parameters())


BASE_MODELS = BaseModels()  # this process's
