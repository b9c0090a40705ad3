"""Run the server inside this process, on a free port, for tests and notebooks.

The socket is bound before uvicorn starts (port 0, the kernel picks), so there is no race for a
port between picking and binding; ``with running_server(config) as url`` yields once the server
answers and stops it on exit.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Iterator

import httpx
import uvicorn

from serving.app import ServerConfig, create_app
from serving.connections import head_timeout_protocol
from serving.instances import Limits


def running_server(config: ServerConfig, host: str = "127.0.0.1", timeout_s: float = 60.0
                   ) -> contextlib.AbstractContextManager[str]:
    """``http://host:port`` of a live server for ``config``; shut down when the block ends."""
    return serving_app(create_app(config), host, timeout_s, head_timeout_s=config.limits.head_timeout_s)


@contextlib.contextmanager
def serving_app(app: Any, host: str = "127.0.0.1", timeout_s: float = 60.0,
                head_timeout_s: float = Limits.head_timeout_s) -> Iterator[str]:
    """``http://host:port`` of a live server for an ASGI ``app``, with the production server's
    HTTP protocol (:mod:`serving.connections`); shut down when the block ends."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", http=head_timeout_protocol(head_timeout_s)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"serving:{port}", daemon=True)
    thread.start()
    url = f"http://{host}:{port}"
    try:
        wait_until_up(url, timeout_s, path="/__started__", accept_404=True)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_until_up(url: str, timeout_s: float = 60.0, path: str = "/health", accept_404: bool = False) -> None:
    """Poll ``url + path`` until it answers (200, or any answer at all with ``accept_404``)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | str = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url + path, timeout=5)
            if response.status_code == 200 or accept_404:
                return
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"server at {url} did not come up within {timeout_s}s: {last}")
