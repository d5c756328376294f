"""Converting between flexmoe's state dicts and Flower records, and measuring what they weigh."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

WIRE_DTYPE = np.float32  # what every shared parameter travels as (numpy has no bfloat16)


def state_to_arrays(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord of float32 copies."""
    return ArrayRecord({name: Array(t.detach().float().cpu().numpy()) for name, t in state.items()})


def in_wire_dtype(arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` as float32, the dtype the clients send and the server checks updates against."""
    return ArrayRecord(
        {
            name: a if a.dtype == np.dtype(WIRE_DTYPE).name else Array(a.numpy().astype(WIRE_DTYPE))
            for name, a in arrays.items()
        }
    )


def arrays_to_state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.array(a.numpy())) for name, a in arrays.items()}


def wire_bytes(content: RecordDict) -> int:
    """Size of the serialised record as it crosses the wire (its protobuf encoding)."""
    return recorddict_to_proto(content).ByteSize()
