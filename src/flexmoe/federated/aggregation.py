"""A round's training replies taken as they arrive: each checked, recorded and aggregated.

A strategy that averages (FedAvg, and FedProx, FedAvgM, FedAdam, FedYogi and FedAdagrad, whose
server step starts from FedAvg's mean) needs only the example-weighted sum of the updates. Each
checked update is folded into a running sum and freed as it arrives, so the server holds one
model's worth of sums whatever the number of clients. The mean then reaches the strategy as one
update weighted by every example, and its own server step applies unchanged. The robust
aggregations (median, trimmed mean) and differential privacy (which clips each update and counts
them) need every update at once, and keep them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from flexmoe.errors import FlexMoEError
from flexmoe.federated.protocol import ARRAYS, METRICS, NUM_EXAMPLES, TrainReply
from flexmoe.federated.records import WIRE_DTYPE, wire_bytes
from flexmoe.federated.validation import sender, update_problem
from flexmoe.results import ClientRound, RejectedUpdate


class RoundUpdates:
    """The training replies of one round, added one at a time as they arrive."""

    def __init__(
        self,
        expected: ArrayRecord | None,
        max_examples: int,
        bytes_down: Mapping[int, int],
        keep_all: bool,
    ) -> None:
        self.expected, self.max_examples = expected, max_examples
        self.bytes_down, self.keep_all = bytes_down, keep_all
        self.clients: list[ClientRound] = []  # every readable reply, rejected ones included
        self.lrs: list[float] = []
        self.rejected: list[RejectedUpdate] = []
        self.kept: list[Message] = []  # every valid reply, or the one that will carry the mean
        self.sums: dict[str, np.ndarray] = {}
        self.examples = 0
        self.accepted = 0  # valid replies

    def add(self, reply: Message) -> None:
        """Record ``reply`` and, if it is fit to aggregate, fold it in (or keep it); with no
        ``expected`` parameters (nothing is aggregated), only record it."""
        self._record(reply)
        if self.expected is None:
            return
        problem = update_problem(reply, self.expected, self.max_examples)  # unreadable ones too
        if problem is not None:
            self.rejected.append(RejectedUpdate(client_id=sender(reply), reason=problem))
            return
        self.accepted += 1
        if self.keep_all:
            self.kept.append(reply)
            return
        weight = reply.content.metric_records[METRICS][NUM_EXAMPLES]
        for name, array in reply.content.array_records[ARRAYS].items():
            weighted = array.numpy().astype(WIRE_DTYPE) * weight
            if name in self.sums:
                self.sums[name] += weighted
            else:
                self.sums[name] = weighted
        self.examples += weight
        if not self.kept:
            self.kept.append(reply)
        reply.content = RecordDict({METRICS: reply.content.metric_records[METRICS]})  # frees it

    def for_strategy(self) -> list[Message]:
        """What the strategy aggregates: every valid reply, or one carrying their mean with the
        weight of all their examples."""
        if self.keep_all or not self.kept:
            return self.kept
        carrier = self.kept[0]
        mean = {name: Array(total / self.examples) for name, total in self.sums.items()}
        metrics = MetricRecord({NUM_EXAMPLES: self.examples})
        carrier.content = RecordDict({ARRAYS: ArrayRecord(mean), METRICS: metrics})
        self.sums = {}
        return [carrier]

    def _record(self, reply: Message) -> None:
        """Record what ``reply`` measured, if its metrics can be read (``update_problem`` says
        why not)."""
        try:
            update = TrainReply.from_message(reply)
        except FlexMoEError:
            return
        self.lrs.append(update.lr)
        self.clients.append(
            ClientRound(
                client_id=update.client_id,
                bytes_up=wire_bytes(reply.content),
                bytes_down=self.bytes_down[reply.metadata.src_node_id],
                train_loss=update.train_loss,
                proximal_mu=update.proximal_mu,
                seconds=to_the_millisecond(update.seconds),
            )
        )


def to_the_millisecond(seconds: Mapping[str, float]) -> dict[str, float]:
    return {phase: round(value, 3) for phase, value in seconds.items()}


def arriving_replies(
    grid: Grid, messages: Sequence[Message], timeout_s: float
) -> Iterator[Message]:
    """Send ``messages`` and yield each reply as soon as it arrives, waiting at most
    ``timeout_s`` for all (0: no limit); a client's error or a missing reply fails the run."""
    waiting = set(grid.push_messages(messages))
    total = len(waiting)
    interval = getattr(grid, "pull_interval", 0.5)
    deadline = time.monotonic() + timeout_s if timeout_s else None
    while waiting:
        # one at a time: a pull hands over every reply it asks for that has arrived, and the
        # server is to hold one at once, not every reply that came in since the last poll
        for reply in (r for message_id in list(waiting) for r in grid.pull_messages([message_id])):
            waiting.discard(reply.metadata.reply_to_message_id)
            if reply.has_error():
                reason = reply.error.reason.strip().splitlines()
                raise FlexMoEError(
                    f"a client failed: {reason[-1] if reason else 'no reason given'}"
                )
            yield reply
        if waiting and deadline is not None and time.monotonic() > deadline:
            raise FlexMoEError(
                f"{len(waiting)} of {total} clients did not reply within {timeout_s:g} s "
                "(reply-timeout); resume the run with a longer one, or 0 to wait as long as "
                "Flower's messages live (flexmoe run --resume OUT --reply-timeout S; flwr run: "
                "--run-config 'reply-timeout=S')"
            )
        if waiting:
            time.sleep(interval)
