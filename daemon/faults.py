"""Test hook: make the model's forward pass fail the way MLX fails mid-generation (a
RuntimeError out of the forward pass, as Metal's allocator raises past its buffer limit),
for the error paths no request can reach on purpose on Linux (there MLX's CPU allocator and
out-of-range gathers crash the process instead of raising).

    KVTIER_FAULT_ON_TOKEN=<token id>  kvtier serve ...

Every forward pass whose input holds that token id raises: a prompt holding it fails in
its prefill; a request that generates it fails at the decode step after (in a batch, the
whole batch's step). Off unless the variable is set; it reads the input on the host, so
it costs a sync per step and is for tests only (tests/test_batching.py).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

log = logging.getLogger("kvtier.faults")

ENV = "KVTIER_FAULT_ON_TOKEN"


class InjectedFault(RuntimeError):
    """The failure KVTIER_FAULT_ON_TOKEN asked for."""


def install_from_env(model: Any) -> None:
    if os.environ.get(ENV):
        fail_on_token(model, int(os.environ[ENV]))


def fail_on_token(model: Any, token: int) -> None:
    """Make `model`'s forward pass raise InjectedFault whenever its input holds `token`."""
    base = type(model)

    def forward(self, inputs, *args, **kwargs):
        if token in np.asarray(inputs):
            raise InjectedFault(f"injected fault: token {token} in the model's input ({ENV})")
        return base.__call__(self, inputs, *args, **kwargs)

    # A subclass, not a wrapper: mlx-lm reads the model's layers, args and make_cache.
    model.__class__ = type(f"Failing{base.__name__}", (base,), {"__call__": forward})
    log.warning("%s=%d: forward passes holding that token fail (a test hook)", ENV, token)
