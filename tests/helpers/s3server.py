"""A real S3 endpoint for tests: moto's S3 server (``moto[server]``) on a given address.

::

    with s3_server("127.0.0.1") as server:          # a free port; stopped on exit
        env = server.env()                           # AWS_* variables pointing at it
        server.make_bucket("ckpt")

Also runnable on its own (for a test host in a network namespace, where a thread of the test
process cannot listen): ``python -m tests.helpers.s3server --host 10.211.0.1 --port 9000 --ready FILE``
serves until killed and writes the endpoint URL into FILE once it accepts connections.

The ``s3`` fixture (import it into a test module) is one server per module on 127.0.0.1 with
the credentials in the environment of the test and of every rank it launches.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from distrain.env import scoped_environ

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


class _Serving:
    """moto's S3 application served by werkzeug on a thread (what ``ThreadedMotoServer`` does),
    plus an outage switch: at the first request matching :attr:`trip`, the server answers it
    503 and closes its socket, so later requests are refused."""

    def __init__(self, host: str, port: int) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self.trip: tuple[str, str] | None = None  # (path fragment, method)
        self.tripped = threading.Event()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request served
        self._app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(host, port, self._wsgi, True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="moto-s3")
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def _wsgi(self, environ: dict[str, Any], start_response: Any) -> Any:
        self.requests.append((str(environ.get("REQUEST_METHOD")), str(environ.get("PATH_INFO"))))
        trip = self.trip
        if (trip is not None and trip[0] in environ.get("PATH_INFO", "")
                and environ.get("REQUEST_METHOD") == trip[1]):
            if not self.tripped.is_set():
                self.tripped.set()
                threading.Thread(target=self.stop, daemon=True).start()
            start_response("503 Service Unavailable", [("Content-Length", "0")])
            return [b""]
        return self._app(environ, start_response)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=30)


@dataclass(slots=True, kw_only=True)
class S3Server:
    """A running moto S3 server; :meth:`stop_at` and :meth:`restart` for outage tests."""

    host: str
    port: int
    _server: _Serving = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables an S3 user sets (``AWS_ENDPOINT_URL``: an S3-compatible store)."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.url}

    def client(self):  # type: ignore[no-untyped-def]  # boto3 is untyped
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"ckpt-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop_at(self, fragment: str, method: str = "PUT") -> threading.Event:
        """Go down at the first ``method`` request whose path contains ``fragment`` (e.g. an
        upload into the checkpoint being saved): that request gets a 503, every later one is
        refused. Returns the event set when it happened."""
        self._server.tripped.clear()
        self._server.trip = (fragment, method)
        return self._server.tripped

    def requests(self, method: str, prefix: str) -> list[str]:
        """The paths of the ``method`` requests served so far (since the last restart) whose
        path starts with ``prefix`` (``/bucket/key...``), in order."""
        return [path for seen, path in list(self._server.requests)
                if seen == method and path.startswith(prefix)]

    def stop(self) -> None:
        self._server.stop()

    def restart(self) -> None:
        """Serve again on the same port; moto keeps the buckets (its state is in this process)."""
        self._server.stop()
        self._server = _Serving(self.host, self.port)


@contextlib.contextmanager
def s3_server(host: str = "127.0.0.1", port: int = 0) -> Iterator[S3Server]:
    """Start moto's S3 server on ``host:port`` (0: a free port); stop it on exit."""
    serving = _Serving(host, port)
    bound_host, bound_port = serving.address
    running = S3Server(host=bound_host, port=bound_port, _server=serving)
    try:
        yield running
    finally:
        running._server.stop()  # the restarted one, if any; stopping twice is harmless


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    """One S3 server per test module; its AWS_* variables set for the module's tests."""
    with s3_server() as server, scoped_environ(server.env()):
        yield server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready", type=Path, help="write the endpoint URL here once serving")
    args = parser.parse_args()
    with s3_server(args.host, args.port) as server:
        if args.ready:
            temp = args.ready.with_name(args.ready.name + ".tmp")
            temp.write_text(server.url + "\n")
            temp.rename(args.ready)
        print(server.url, flush=True)
        threading.Event().wait()  # until killed


if __name__ == "__main__":
    main()
