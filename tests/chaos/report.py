"""A pytest plugin that writes RELIABILITY.md: every chaos case x backend with its result.

    python -m pytest tests/chaos -p tests.chaos.report --reliability-md RELIABILITY.md

(``scripts/reliability.sh`` runs exactly that). A case's row comes from its
``chaos_case`` marker, its column from the ``backend`` it ran on; a cell is
``pass``, ``FAIL``/``ERROR`` with the first line of the failure (the full messages
follow the table), or ``n/a`` with the marker's reason. The backend limits table
is copied from docs/backend-limits.md, so it is never typed twice.
"""

from __future__ import annotations

import datetime
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.chaos import BACKENDS
from tests.support.servers import ROOT

LIMITS_DOC = ROOT / "docs" / "backend-limits.md"


@dataclass
class Cell:
    outcome: str = "pass"
    message: str = ""
    nodeid: str = ""


@dataclass
class Results:
    rows: dict[str, dict[str, Cell]] = field(default_factory=dict)
    na: dict[str, dict[str, str]] = field(default_factory=dict)


RESULTS = Results()
_KEY = pytest.StashKey[Path]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability-md",
        metavar="PATH",
        default=None,
        help="write the chaos cases' results, one table of case x backend, to PATH",
    )


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--reliability-md")
    if path:
        config.stash[_KEY] = Path(path)


def _backend(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    for value in callspec.params.values():
        # A variant of a backend ("sqlite-held") is its backend's column: its case,
        # a row of its own, says what differs.
        if isinstance(value, str) and value.partition("-")[0] in BACKENDS:
            return value.partition("-")[0]
    return None


def _first_line(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return text.strip()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    marker = item.get_closest_marker("chaos_case")
    backend = _backend(item) or (marker.kwargs.get("backend") if marker is not None else None)
    if marker is None or backend is None:
        return
    case = str(marker.args[0])
    row = RESULTS.rows.setdefault(case, {})
    RESULTS.na.setdefault(case, {}).update(marker.kwargs.get("na") or {})
    cell = row.setdefault(backend, Cell(nodeid=item.nodeid))
    if report.failed and cell.outcome == "pass":
        cell.outcome = "FAIL" if report.when == "call" else "ERROR"
        cell.message = _first_line(report)
        cell.nodeid = item.nodeid
    elif report.skipped and cell.outcome == "pass":
        cell.outcome = "skipped"
        cell.message = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""


def _escape(text: str, limit: int) -> str:
    one_line = re.sub(r"\s+", " ", text).replace("|", "\\|")
    return one_line if len(one_line) <= limit else one_line[: limit - 1] + "…"


def _cell(case: str, backend: str) -> str:
    cell = RESULTS.rows[case].get(backend)
    if cell is None:
        reason = RESULTS.na.get(case, {}).get(backend)
        return f"n/a: {reason}" if reason else "not run"
    if cell.outcome == "pass":
        return "pass"
    return f"**{cell.outcome}**: {_escape(cell.message, 90)}"


def _limits_tables() -> str:
    """Every table of docs/backend-limits.md, each with its caption line (one ending in ":")."""
    if not LIMITS_DOC.exists():
        return f"(missing: {LIMITS_DOC.relative_to(ROOT)} does not exist)\n"
    blocks: list[list[str]] = []
    previous = ""
    for line in LIMITS_DOC.read_text().splitlines():
        if line.lstrip().startswith("|"):
            if not blocks or not blocks[-1][-1].lstrip().startswith("|"):
                intro = [previous, ""] if previous.endswith(":") else []
                blocks.append([*intro])
            blocks[-1].append(line)
        elif line.strip():
            previous = line.strip()
        if blocks and blocks[-1] and not line.lstrip().startswith("|"):
            blocks[-1].append("")  # closes the table
    tables = ["\n".join(b).strip() for b in blocks]
    if not tables:
        return f"(missing: no table in {LIMITS_DOC.relative_to(ROOT)})\n"
    return "\n\n".join(tables) + "\n"


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def render(exitstatus: int) -> str:
    head = ["Case", *BACKENDS]
    out = [
        "# Reliability",
        "",
        "Generated by `bash scripts/reliability.sh` (the chaos suite in `tests/chaos/`, run",
        "through `gunicorn -k gevent`, 2 workers except for the memory backend); do not edit.",
        f"Commit {_commit()}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC,"
        f" pytest exit status {exitstatus}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for case in RESULTS.rows:
        out.append("| " + " | ".join([case, *(_cell(case, b) for b in BACKENDS)]) + " |")
    failures = [
        (case, backend, cell)
        for case, row in RESULTS.rows.items()
        for backend, cell in row.items()
        if cell.outcome != "pass"
    ]
    if failures:
        out += ["", "## Failures", ""]
        for case, backend, cell in failures:
            out.append(f"- {case}, {backend} (`{cell.nodeid}`): {_escape(cell.message, 600)}")
    out += ["", "## Backend limits", "", f"From `{LIMITS_DOC.relative_to(ROOT)}`:", ""]
    out.append(_limits_tables())
    return "\n".join(out)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = session.config.stash.get(_KEY, None)
    if path is not None:
        path.write_text(render(int(exitstatus)))
