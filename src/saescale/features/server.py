"""`saescale view`: serve a features folder on localhost (the viewer also works opened from
disk; serving adds live inspection). Read-only: GET serves the folder's files, POST /api/live
answers with `LiveEncoder.run`, nothing is ever written."""

from __future__ import annotations

import json
import os
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

from saescale.features.live import LiveEncoder, LiveInputError

MAX_BODY = 64 * 1024


class ViewerHandler(SimpleHTTPRequestHandler):
    live: LiveEncoder | None = None

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass  # quiet: a page load is dozens of requests

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/api/info":
            return self._json(200, {"live": self.live is not None})
        return super().do_GET()

    def do_POST(self) -> None:
        if self.path.split("?")[0] != "/api/live":
            return self._json(404, {"error": f"no such endpoint {self.path}"})
        if self.live is None:
            return self._json(404, {"error": "live inspection is off: start with saescale view --live"})
        # JSON only: a form on another site cannot post here without a CORS preflight this server refuses
        if self.headers.get_content_type() != "application/json":
            return self._json(415, {"error": 'send the text as JSON: {"text": ...}'})
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            return self._json(400 if length < 0 else 413, {"error": f"a body of 0..{MAX_BODY} bytes, please"})
        try:
            body = json.loads(self.rfile.read(length).decode("utf-8") or "{}")
            text = body.get("text", "") if isinstance(body, dict) else None
            return self._json(200, self.live.run(text))
        except (LiveInputError, ValueError) as exc:  # bad JSON or UTF-8 included
            return self._json(400, {"error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - a failed forward is an answer, not a dead server
            return self._json(500, {"error": f"{type(exc).__name__}: {exc}"})


def make_server(folder: str, host: str = "127.0.0.1", port: int = 8765, live: LiveEncoder | None = None):
    """A ThreadingHTTPServer over `folder` (port 0: any free port); call serve_forever()."""
    if not os.path.isfile(os.path.join(folder, "index.html")):
        raise FileNotFoundError(f"{folder} has no index.html: run jobs/features.py first")
    handler = type("Handler", (ViewerHandler,), {"live": live})
    return ThreadingHTTPServer((host, port), partial(handler, directory=folder))
