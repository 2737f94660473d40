"""Fixtures that spawn real services on 127.0.0.1 and kill every one of them at teardown."""

import pytest
from procs import Spawner


@pytest.fixture
def spawn():
    spawner = Spawner()
    yield spawner
    spawner.close()


@pytest.fixture(scope="module")
def spawn_module():
    """Like spawn, for processes a whole module shares (read-only tests against one server)."""
    spawner = Spawner()
    yield spawner
    spawner.close()
