"""Shared fixtures: a private mosquitto per session and an independent MQTT subscriber."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scanner.sim.localbroker import LocalBroker
from tests.mqtt_helpers import Subscriber


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    b = LocalBroker(tmp_path_factory.mktemp("mosquitto"))
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def subscribe(broker: LocalBroker) -> Iterator[Callable[..., Subscriber]]:
    """Factory: ``subscribe(topic, ..., on=other_broker, persistent=False)``; closed at teardown."""
    made: list[Subscriber] = []

    def make(*topics: str, on: LocalBroker | None = None, persistent: bool = False) -> Subscriber:
        s = Subscriber(on or broker, *topics, persistent=persistent)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def tmp_broker_dir(tmp_path: Path) -> Path:
    d = tmp_path / "broker"
    d.mkdir()
    return d
