"""Shared pytest set-up for the rmge test suite."""

from __future__ import annotations

import logging
import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Keep the suite fast and quiet on small, shared CPU machines.

    Small models run far faster on one torch thread: with several threads on a machine whose cores
    are busy, torch's thread pool waits on the other threads and a minibatch step can take 50× longer.
    ``RMGE_TEST_THREADS`` overrides the number of threads.
    """
    import torch

    torch.set_num_threads(int(os.environ.get("RMGE_TEST_THREADS", "1")))
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
