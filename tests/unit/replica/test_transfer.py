"""loop/replica/transfer.py: a group whose connect never returns (gloo can hang past every timeout it was given
when a peer accepts and then stops reading) is given up within the transfer's limit, so the worker's sync reports
a failure instead of holding the replica out of routing for ever; `within` hands back a value or the error."""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch.distributed as dist

from loop.replica import transfer
from tests.support import free_port

RELEASE = threading.Event()


@pytest.fixture
def release() -> Iterator[None]:
    RELEASE.clear()
    yield
    RELEASE.set()  # the abandoned connect ends with the test


def test_within_gives_the_value_or_the_error_or_gives_up() -> None:
    assert transfer.within(lambda: 7, 5, "a sum") == 7
    with pytest.raises(ValueError, match="bad"):
        transfer.within(lambda: (_ for _ in ()).throw(ValueError("bad")), 5, "a failure")
    stop = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="a wait did not end within 0 s"):
        transfer.within(stop.wait, 0.3, "a wait")
    assert time.monotonic() - t0 < 2
    stop.set()


def test_a_connect_that_never_returns_is_given_up_within_the_limit(monkeypatch: pytest.MonkeyPatch,
                                                                   release: None) -> None:
    real = dist.ProcessGroupGloo

    class Hangs:  # the group's constructor (its connect) blocks until the test ends
        _Options = real._Options
        create_device = staticmethod(real.create_device)

        def __new__(cls, *args: Any) -> Any:
            RELEASE.wait()
            raise ConnectionError("released")

    store = dist.TCPStore("127.0.0.1", free_port(), None, True, datetime.timedelta(seconds=10),
                          wait_for_workers=False)
    nonce = "n" * 32
    dist.PrefixStore(f"loop-transfer/{nonce}/", store).set("here-1", "1")  # the other side joined
    monkeypatch.setattr(dist, "ProcessGroupGloo", Hangs)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="connecting transfer nnnnnnnn"):
        transfer.open_group("", 0, nonce, 0, bind="127.0.0.1", store=store, join_s=1.0, timeout_s=1.0)
    assert time.monotonic() - t0 < 1.0 + 1.0 + 2.0
