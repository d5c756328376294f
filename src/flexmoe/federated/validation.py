"""What the server checks of every client update before it aggregates it.

A client is not trusted to send what the protocol says: an update whose arrays differ from the
global parameters in names, shapes or dtypes, that holds non-finite values, or that claims an
example count no client of the run can have (FedAvg weights by it, so one huge count would
dominate the average) is left out of the aggregate and recorded with its reason.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message

from flexmoe.errors import FlexMoEError
from flexmoe.federated.protocol import ARRAYS, METRICS, NUM_EXAMPLES, TrainReply


def update_problem(reply: Message, expected: ArrayRecord, max_examples: int) -> str | None:
    """Why ``reply`` cannot be aggregated with global parameters ``expected``, or None."""
    try:
        TrainReply.from_message(reply)
    except FlexMoEError as error:
        return str(error)
    claimed = reply.content.metric_records[METRICS][NUM_EXAMPLES]  # what FedAvg weights by
    if (
        isinstance(claimed, bool)
        or not isinstance(claimed, int)
        or not 1 <= claimed <= max_examples
    ):
        return f"claims {claimed!r} training examples; a client of this run has 1 to {max_examples}"
    arrays = reply.content.array_records.get(ARRAYS)
    if arrays is None:
        return "holds no parameters"
    missing, unknown = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or unknown:
        return (
            f"names other parameters than the global ones ({len(missing)} missing, "
            f"{len(unknown)} unknown, e.g. {(missing or unknown)[0]!r})"
        )
    for name, array in arrays.items():
        want = expected[name]
        if tuple(array.shape) != tuple(want.shape) or array.dtype != want.dtype:
            return (
                f"sends {name!r} as {array.dtype} {tuple(array.shape)}; the global parameter "
                f"is {want.dtype} {tuple(want.shape)}"
            )
        if not np.isfinite(array.numpy()).all():
            return f"holds non-finite values in {name!r}"
    return None


def sender(reply: Message) -> int:
    """The client a reply says it comes from, else -1 (its metrics are unreadable)."""
    try:
        return TrainReply.from_message(reply).client_id
    except FlexMoEError:
        return -1
