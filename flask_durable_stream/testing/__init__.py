"""The StreamManager conformance kit: every contract case, for any backend.

A backend package runs it by subclassing one pytest class and giving it a
fixture that makes a fresh manager::

    import pytest
    from flask_durable_stream.testing import StreamManagerContract

    class TestMyBackend(StreamManagerContract):
        @pytest.fixture
        def make_manager(self, tmp_path):
            made = []

            def make(**options):
                made.append(MyStreamManager(tmp_path / "db", **options))
                return made[-1]

            yield make
            for manager in made:
                manager.close()

``make(**options)`` takes the common manager options (``ttl_seconds``,
``timeout``, ``lease_seconds``, ``heartbeat_interval``). Every call within one
test must return a manager on the *same* storage (a second process's view);
a backend whose managers cannot share storage sets ``shares_storage = False``.
TTL, lease and expiry cases move time on with :class:`ManualClock` through
:meth:`StreamManagerContract.use_clock` instead of sleeping.

pytest is only needed here, not by the package: install the ``test`` extra.
Call ``pytest.register_assert_rewrite("flask_durable_stream.testing")`` in your
``conftest.py`` before importing this module for pytest's detailed assertion
messages.
"""

from __future__ import annotations

try:
    import pytest  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "flask_durable_stream.testing needs pytest: install the 'test' extra"
        " (pip install 'flask_durable_stream[test]')"
    ) from exc

from ._contract import MakeManager, ManualClock, StreamManagerContract

__all__ = ["MakeManager", "ManualClock", "StreamManagerContract"]
