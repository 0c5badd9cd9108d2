"""Pytest hooks that say loudly, once per run, that a server some tests need is missing."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest


def missing_server_hooks(
    server: str, tests: str, missing: Callable[[], str | None], skip_env: str
) -> tuple[Callable[..., str | None], Callable[..., None]]:
    """``pytest_report_header`` and ``pytest_terminal_summary`` for a backend plugin module.

    ``missing()`` returns why ``server`` cannot run, or None. The line goes in the header,
    and at the end of the run too when ``-q`` hides the header.
    """

    def warning() -> str | None:
        problem = missing()
        if problem is None:
            return None
        skip = os.environ.get(skip_env) == "1"
        action = "be SKIPPED" if skip else f"FAIL (set {skip_env}=1 to skip)"
        return f"!!! {server} unavailable: {problem}. {tests} tests will {action} !!!"

    def pytest_report_header(config: pytest.Config) -> str | None:
        return warning() if config.get_verbosity() >= 0 else None

    def pytest_terminal_summary(
        terminalreporter: Any, exitstatus: int, config: pytest.Config
    ) -> None:
        line = warning() if config.get_verbosity() < 0 else None
        if line:
            terminalreporter.write_line(line, red=True, bold=True)

    return pytest_report_header, pytest_terminal_summary
