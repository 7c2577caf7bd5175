"""pytest plugin of the dsr1 conformance kit (registered through the ``pytest11`` entry point).

Loaded by every pytest run in an environment that has dsr1-sdk, so it stays cheap: it
imports neither torch nor the kit. It adds

* ``--dsr1-device TYPE``: the torch device type the kits run behaviour checks on (sets
  ``DSR1_TEST_DEVICE``; a test class's own ``device`` attribute wins);
* the ``conformance`` marker, put on every test of a kit subclass, so ``-m conformance``
  selects (or ``-m 'not conformance'`` deselects) them.
"""
from __future__ import annotations

import os

import pytest

_PREVIOUS = pytest.StashKey[str | None]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dsr1", "dsr1 plugin conformance kit")
    group.addoption(
        "--dsr1-device",
        default=None,
        metavar="TYPE",
        help="torch device type the conformance kits run on (default: $DSR1_TEST_DEVICE or cpu)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "conformance: a test inherited from a dsr1_sdk conformance kit")
    device = config.getoption("--dsr1-device", default=None)
    if device:
        config.stash[_PREVIOUS] = os.environ.get("DSR1_TEST_DEVICE")
        os.environ["DSR1_TEST_DEVICE"] = device


def pytest_unconfigure(config: pytest.Config) -> None:
    if _PREVIOUS in config.stash:  # restore what --dsr1-device replaced
        previous = config.stash[_PREVIOUS]
        if previous is None:
            os.environ.pop("DSR1_TEST_DEVICE", None)
        else:
            os.environ["DSR1_TEST_DEVICE"] = previous


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        cls = getattr(item, "cls", None)
        if cls is not None and any(
            base.__module__.startswith("dsr1_sdk.testing") for base in cls.__mro__[1:]
        ):
            item.add_marker(pytest.mark.conformance)
