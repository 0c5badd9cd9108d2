"""Node.js clients of the tests: npm packages pinned by lockfiles, and Genkit's own JS client."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

JS = Path(__file__).parent.parent / "js"


def npm_ci(folder: Path, package: str) -> None:
    """Install ``folder``'s locked packages unless ``package`` is already there."""
    if (folder / "node_modules" / package).is_dir():
        return
    assert shutil.which("npm"), f"npm is required to install {package} (apt-get install npm)"
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=folder, check=True, timeout=600)


def genkit_client() -> Path:
    """``tests/js/genkit_client.mjs``, with its ``genkit`` package installed."""
    assert shutil.which("node"), "node is required for Genkit's JS client (apt-get install nodejs)"
    npm_ci(JS, "genkit")
    return JS / "genkit_client.mjs"


def drop_and_resume(client: Path, flow_url: str, chunks: int, abort_after: int) -> Any:
    """Genkit's ``streamFlow`` drops the stream after ``abort_after`` chunks, then resumes it.

    Returns the client's report (see ``genkit_client.mjs``).
    """
    proc = subprocess.run(
        ["node", str(client), flow_url, json.dumps({"chunks": chunks, "delay": 0.03})]
        + [str(abort_after)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(proc.stdout)


def assert_resumed_whole(report: Any, chunks: int, abort_after: int) -> None:
    """The resumed stream is the same one, with every chunk once, in order, and its output."""
    assert len(report["streamId"]) == 32 and report["resumedStreamId"] == report["streamId"]
    assert [c["index"] for c in report["first"]] == list(range(abort_after))
    assert [c["index"] for c in report["resumed"]] == list(range(chunks))
    assert report["output"]["words"] == chunks
    assert "resumedError" not in report
    assert report["unknownError"] == "Error: NOT_FOUND: Stream not found."
    assert report["plain"] == {"echo": {"hello": "world"}}
