"""tests/support.py `Ahead`, which the families e2e uses to start the next family's vLLM during this one's checks:
what is started when, a failure reported by the test that takes it, and nothing left running that no test took."""

from __future__ import annotations

import threading

import pytest

from tests.support import Ahead


def test_the_next_key_starts_with_this_one_and_its_failure_waits_for_its_own_test() -> None:
    prepared: list[str] = []
    started: list[str] = []
    stopped: list[str] = []
    release = threading.Event()

    def launch(key: str):  # noqa: ANN202
        if key == "broken":
            raise ValueError("cannot make the broken model")
        prepared.append(key)  # in the caller's thread, in order

        def start() -> str:
            started.append(key)
            if key == "slow":
                release.wait(10)
            return key.upper()

        return start

    ahead = Ahead(["a", "broken", "b", "slow"], launch, stopped.append)
    assert ahead.take("a") == "A" and prepared == ["a"]  # "broken" was tried too: its error is kept for later
    with pytest.raises(ValueError, match="broken model"):
        ahead.take("broken")
    assert ahead.take("b") == "B" and prepared == ["a", "b", "slow"]  # "slow" started while "b" was taken
    release.set()
    ahead.close()  # nobody took "slow": it is stopped once its start ends
    assert stopped == ["SLOW"] and sorted(started) == ["a", "b", "slow"]


def test_a_key_outside_the_order_is_started_when_taken() -> None:
    ahead = Ahead([], lambda key: lambda: key * 2, lambda _: None)
    assert ahead.take("x") == "xx"
    ahead.close()
