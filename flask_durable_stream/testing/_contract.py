"""The base class a backend's test module subclasses: fixtures, the clock seam, every case."""

from __future__ import annotations

from typing import ClassVar

import pytest

from ..managers.base import StreamManager
from ._cases_lifecycle import LifecycleCases
from ._cases_streams import StreamCases
from ._support import MakeManager, ManualClock


class StreamManagerContract(StreamCases, LifecycleCases):
    """Every case of the StreamManager contract. Subclass it as ``Test<Backend>``.

    Override the :meth:`make_manager` fixture. Set ``shares_storage = False``
    if two managers made in one test cannot see each other's streams; override
    :meth:`use_clock` if the backend's storage clock is not
    :attr:`StreamManager.clock`.
    """

    #: Two managers made in one test see the same streams (like two processes).
    shares_storage: ClassVar[bool] = True

    @pytest.fixture
    def make_manager(self) -> MakeManager:
        """``make(**options)``: a fresh manager; override it in the subclass."""
        raise NotImplementedError(
            f"{type(self).__name__} must define a make_manager fixture"
            " (see flask_durable_stream.testing)"
        )

    @pytest.fixture
    def manager(self, make_manager: MakeManager) -> StreamManager:
        return make_manager()

    @pytest.fixture
    def clock(self) -> ManualClock:
        return ManualClock()

    def use_clock(self, manager: StreamManager, clock: ManualClock) -> None:
        """Make ``clock`` the manager's storage clock (heartbeats, expiry, ``gc``)."""
        manager.clock = clock


__all__ = ["MakeManager", "ManualClock", "StreamManagerContract"]
