"""A fake OpenAI-compatible chat endpoint on 127.0.0.1 for the FMAS prompt tests."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections.abc import Callable, Iterator


def completion(content: str) -> bytes:
    """An OpenAI chat-completion body whose first choice says ``content``."""
    return json.dumps({"choices": [{"message": {"content": content}}]}).encode()


def send(handler: http.server.BaseHTTPRequestHandler, status: int, data: bytes, **headers) -> None:
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name.replace("_", "-"), value)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@contextlib.contextmanager
def serve(
    respond: Callable[[http.server.BaseHTTPRequestHandler], None],
) -> Iterator[tuple[str, list[dict]]]:
    """Runs ``respond`` for every request on 127.0.0.1; yields the base URL and the requests seen.

    Each request is recorded as ``{"method", "path", "authorization"}``.
    """
    seen: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _handle(self):
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            seen.append(
                {
                    "method": self.command,
                    "path": self.path,
                    "authorization": self.headers.get("Authorization"),
                }
            )
            try:
                respond(self)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up, as it should

        do_GET = do_POST = _handle

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True  # a dripping handler must not hold up shutdown
    # A short poll interval: shutdown() waits up to one interval.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1", seen
    finally:
        server.shutdown()
        server.server_close()
