"""Converting between flexmoe's state dicts and Flower records, and measuring what they weigh."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.serde import recorddict_to_proto


def state_to_arrays(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord of float32 copies (numpy has no bfloat16)."""
    return ArrayRecord({name: Array(t.detach().float().cpu().numpy()) for name, t in state.items()})


def arrays_to_state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.array(a.numpy())) for name, a in arrays.items()}


def wire_bytes(content: RecordDict) -> int:
    """Size of the serialised record as it crosses the wire (its protobuf encoding)."""
    return recorddict_to_proto(content).ByteSize()
