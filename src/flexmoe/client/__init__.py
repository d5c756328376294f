"""A client of a federation, without Flower: its data, its personal state, its round work."""

from flexmoe.client.datasets import client_datasets, truncation_report
from flexmoe.client.state import StateStore
from flexmoe.client.worker import ClientWorker, Evaluation, TrainResult

__all__ = [
    "ClientWorker",
    "Evaluation",
    "StateStore",
    "TrainResult",
    "client_datasets",
    "truncation_report",
]
