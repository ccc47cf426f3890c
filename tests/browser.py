"""Headless Chromium driven over the DevTools protocol on a pipe, for tests that must ask a page a
question (its width, its text) rather than only read its first DOM or a screenshot.

Chromium's ``--remote-debugging-pipe`` reads protocol commands from file descriptor 3 and writes
replies and events to descriptor 4, each message one JSON object ended by a NUL byte (the
transport Playwright and Puppeteer use). It needs no websocket client and no port: the pipes are
the child's own. One :class:`Browser` is one Chromium process with one page.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


class Browser:
    """A page of ``width`` x ``height`` CSS pixels; :meth:`open` a URL, :meth:`evaluate` JavaScript in it."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 900) -> None:
        if not CHROMIUM.is_file():
            pytest.fail(f"{CHROMIUM} is missing: the browser test needs Debian's Chromium; run "
                        "`apt-get install -y chromium` (CI's .ci/run installs it)")
        to_child, self._write = os.pipe()  # the child reads commands on its fd 3
        self._read, from_child = os.pipe()  # and writes replies on its fd 4
        # the shell moves them to 3 and 4 (Python's pass_fds keeps fds, it does not renumber them);
        # numbered above 9 first, so that neither is 3 or 4 already
        a, b = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child, from_child))
        self._proc = subprocess.Popen(
            ["/bin/bash", "-c", f'exec "$0" "$@" 3<&{a} 4>&{b} {a}<&- {b}>&-', str(CHROMIUM), *FLAGS,
             f"--user-data-dir={profile}", f"--window-size={width},{height}", "--remote-debugging-pipe",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(a, b),
        )
        for fd in (to_child, from_child, a, b):
            os.close(fd)
        self._buffer = b""
        self._id = 0
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self._call("Emulation.setDeviceMetricsOverride",
                   {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=True)

    def open(self, url: str, ready: str, timeout: float = 60) -> None:
        """Navigate to ``url`` and wait until the JavaScript expression ``ready`` is true (the page
        drew what the test reads; a single-page app draws after its data arrives)."""
        self._call("Page.navigate", {"url": url}, session=True)
        deadline = time.time() + timeout
        while not self._ready(ready):
            if time.time() > deadline:
                text = self.evaluate("document.body ? document.body.innerText.slice(0, 2000) : ''")
                raise AssertionError(f"{url}: not ready ({ready}) within {timeout} s; the page reads: {text!r}")
            time.sleep(0.25)

    def _ready(self, ready: str) -> bool:
        try:  # (while the old page goes and the new one comes, there may be no body, or no page to ask)
            return bool(self.evaluate(f"Boolean(document.body && ({ready}))"))
        except AssertionError:
            return False

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serializable values only)."""
        reply = self._call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True)
        if "exceptionDetails" in reply:
            raise AssertionError(f"{expression}: {reply['exceptionDetails'].get('text')}")
        return reply["result"].get("value")

    def screenshot(self, path: Path) -> None:
        data = self._call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self._send({"id": self._next_id(), "method": "Browser.close"})
            self._proc.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        finally:
            os.close(self._write)
            os.close(self._read)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------- the protocol
    def _next_id(self) -> int:
        self._id += 1
        return self._id

    def _send(self, message: dict[str, Any]) -> None:
        os.write(self._write, json.dumps(message).encode() + b"\0")

    def _call(self, method: str, params: dict[str, Any], session: bool = False, timeout: float = 60) -> dict:
        """Send one command and return its result; events that arrive meanwhile are dropped."""
        message: dict[str, Any] = {"id": self._next_id(), "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        self._send(message)
        deadline = time.time() + timeout
        while time.time() < deadline:
            reply = self._receive(deadline - time.time())
            if reply.get("id") == message["id"]:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply["result"]
        raise AssertionError(f"{method}: no reply within {timeout} s")

    def _receive(self, timeout: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._read], [], [], max(timeout, 0.01))
            if not ready:
                return {}
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise AssertionError(f"Chromium closed the pipe (exit {self._proc.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)
