"""Converting between flexmoe's state dicts and Flower records, and measuring what they weigh."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

if TYPE_CHECKING:  # a deployed message's process forwards numpy arrays and never imports torch
    import torch

WIRE_DTYPE = np.float32  # what every shared parameter travels as (numpy has no bfloat16)
WireState = dict[str, np.ndarray]  # parameters as they travel: float32 arrays on the host


def state_to_arrays(state: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of float32 copies."""
    return ArrayRecord({name: Array(on_the_wire(t)) for name, t in state.items()})


def on_the_wire(value: torch.Tensor | np.ndarray) -> np.ndarray:
    """A float32 host copy of a tensor (wherever it lives) or an array."""
    if isinstance(value, np.ndarray):
        return value.astype(WIRE_DTYPE)
    return value.detach().float().cpu().numpy()


def arrays_to_numpy(arrays: ArrayRecord) -> WireState:
    """Writable copies of the arrays of a record."""
    return {name: np.array(a.numpy()) for name, a in arrays.items()}


def numpy_to_state(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    import torch

    return {name: torch.from_numpy(array) for name, array in arrays.items()}


def in_wire_dtype(arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` as float32, the dtype the clients send and the server checks updates against."""
    return ArrayRecord(
        {
            name: a if a.dtype == np.dtype(WIRE_DTYPE).name else Array(a.numpy().astype(WIRE_DTYPE))
            for name, a in arrays.items()
        }
    )


def arrays_to_state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return numpy_to_state(arrays_to_numpy(arrays))


def wire_bytes(content: RecordDict) -> int:
    """Size of the serialised record as it crosses the wire (its protobuf encoding)."""
    return recorddict_to_proto(content).ByteSize()
