"""A real S3-compatible server on 127.0.0.1 for the tests and benchmarks of remote datasets: moto's server app.

`s3_server()` starts moto's WSGI application (the one `moto_server` runs) in a subprocess on a free port and
points the standard client settings at it (AWS_ENDPOINT_URL, fake credentials, a region), so botocore and
s3fs, unchanged, talk to it over HTTP as they would to S3. A thin middleware in front of moto measures and
disturbs what is served, through control paths under `/_gq/` (no bucket name may start with "_"):

- `GET /_gq/stats`: `{"bytes": N, "gets": {"bucket/key": count}, "writes": ["PUT bucket/key", ...]}`, the
  response body bytes of every GET request since the last reset (objects and listings: what clients
  downloaded), the GETs of each path, and every other request (PUT, DELETE, POST) in the order they came;
- `POST /_gq/reset`: zero them and drop every pending fault;
- `POST /_gq/fault` with JSON `{"key": "bucket/key", "mode": MODE, "times": N, "delay": S}`: the next N GETs of
  that object are disturbed: `error` answers 500 InternalError, `truncate` serves the first half of the body
  (with a Content-Length to match), `corrupt` flips one byte in the middle (both without the object's checksum
  headers, so only the client's own checks notice),
  `slow` serves the body in 64 KiB pieces, S seconds apart.

Run alone (`python -m gq.benchmarks.s3_server`) it prints its endpoint and serves until stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

CONTROL = "/_gq/"
PIECE = 64 << 10  # bodies are served (and counted) in pieces of this size
FAULTS = ("error", "truncate", "corrupt", "slow")
CLIENT_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_OVERRIDING = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN")  # would lead clients elsewhere
_ERROR_BODY = b"<Error><Code>InternalError</Code><Message>injected fault</Message></Error>"


@dataclass
class Fault:
    mode: str
    times: int
    delay: float = 0.0


class Meter:
    """WSGI middleware: counts the body bytes of GET responses, answers the control paths, injects faults."""

    def __init__(self, app) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.bytes = 0
        self.gets: Counter[str] = Counter()
        self.writes: list[str] = []
        self.faults: dict[str, Fault] = {}

    def __call__(self, environ: dict, start_response) -> Iterator[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith(CONTROL):
            return self._control(path[len(CONTROL) :], environ, start_response)
        key = path.lstrip("/")
        if environ["REQUEST_METHOD"] != "GET":
            if environ["REQUEST_METHOD"] != "HEAD":
                with self.lock:
                    self.writes.append(f"{environ['REQUEST_METHOD']} {key}")
            return self.app(environ, start_response)
        with self.lock:
            self.gets[key] += 1
            fault = self.faults.get(key)
            if fault is not None:
                fault.times -= 1
                if fault.times <= 0:
                    del self.faults[key]
        if fault is not None and fault.mode == "error":
            start_response("500 Internal Server Error", [("Content-Type", "application/xml")])
            return self._counted([_ERROR_BODY])
        captured: list = []
        chunks = self.app(environ, lambda status, headers, *exc: captured.extend((status, headers)))
        try:
            body = b"".join(chunks)
        finally:
            if hasattr(chunks, "close"):
                chunks.close()
        status, headers = captured
        damaged = fault is not None and fault.mode in ("truncate", "corrupt")
        if damaged and fault.mode == "truncate":
            body = body[: len(body) // 2]
        elif damaged and body:
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
        # A damaged body goes without the object's checksum headers: the damage is then for the client's own
        # checks to find, as it would be behind a proxy that damaged it.
        headers = [
            (k, v)
            for k, v in headers
            if k.lower() != "content-length" and not (damaged and k.lower().startswith("x-amz-checksum-"))
        ] + [("Content-Length", str(len(body)))]
        start_response(status, headers)
        delay = fault.delay if fault is not None and fault.mode == "slow" else 0.0
        return self._counted((body[i : i + PIECE] for i in range(0, len(body), PIECE)), delay)

    def _counted(self, pieces, delay: float = 0.0) -> Iterator[bytes]:
        """The pieces, each counted once the server has sent it (it asks for the next one then): a client that
        hangs up early is not counted for what it did not take."""
        for piece in pieces:
            if delay:
                time.sleep(delay)
            yield piece
            with self.lock:
                self.bytes += len(piece)

    def _control(self, action: str, environ: dict, start_response) -> list[bytes]:
        with self.lock:
            if action == "stats":
                reply = {"bytes": self.bytes, "gets": dict(self.gets), "writes": self.writes}
            elif action == "reset":
                self.bytes, self.gets, self.writes, self.faults = 0, Counter(), [], {}
                reply = {}
            elif action == "fault":
                length = int(environ.get("CONTENT_LENGTH") or 0)
                spec = json.loads(environ["wsgi.input"].read(length))
                if spec["mode"] not in FAULTS:
                    start_response("400 Bad Request", [("Content-Type", "text/plain")])
                    return [f"mode must be one of {FAULTS}".encode()]
                self.faults[spec["key"]] = Fault(spec["mode"], int(spec.get("times", 1)), float(spec.get("delay", 0)))
                reply = {}
            else:
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"unknown control path"]
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(reply).encode()]


class S3Server:
    """A running server: `endpoint_url`, and the meter's readings and faults over its control paths."""

    def __init__(self, endpoint_url: str, process: subprocess.Popen) -> None:
        self.endpoint_url = endpoint_url
        self.process = process

    def _call(self, action: str, payload: dict | None = None) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(f"{self.endpoint_url}{CONTROL}{action}", data=data)
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read())

    def stats(self) -> dict:
        """`{"bytes": N, "gets": {"bucket/key": count}, "writes": ["PUT bucket/key", ...]}` since the last reset."""
        return self._call("stats")

    def bytes_served(self) -> int:
        """Response body bytes of GET requests since the last reset."""
        return self.stats()["bytes"]

    def gets(self, key: str) -> int:
        """GET requests of `bucket/key` since the last reset."""
        return self.stats()["gets"].get(key, 0)

    def writes(self) -> list[str]:
        """ "METHOD bucket/key" of every request other than GET and HEAD since the last reset, in order."""
        return self.stats()["writes"]

    def reset(self) -> None:
        """Zero the counts and drop pending faults."""
        self._call("reset", {})

    def fault(self, key: str, mode: str, *, times: int = 1, delay: float = 0.0) -> None:
        """Disturb the next `times` GETs of `bucket/key` (modes: see the module's docstring)."""
        self._call("fault", {"key": key, "mode": mode, "times": times, "delay": delay})


@contextlib.contextmanager
def s3_server(*, set_env: bool = True) -> Iterator[S3Server]:
    """A moto S3 server in a subprocess on 127.0.0.1 (a free port), stopped on exit. With `set_env`, the
    process's client settings (AWS_ENDPOINT_URL, fake credentials, region) point at it until then, and the
    settings that would take precedence (AWS_ENDPOINT_URL_S3, AWS_PROFILE, AWS_SESSION_TOKEN) are set aside."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gq.benchmarks.s3_server", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()  # the server prints its endpoint once it listens
        if not line.startswith("http://"):
            raise RuntimeError(f"the S3 test server did not start (exit status {process.wait(timeout=30)})")
        server = S3Server(line.strip(), process)
        saved = {k: os.environ.get(k) for k in (*CLIENT_ENV, "AWS_ENDPOINT_URL", *_OVERRIDING)}
        if set_env:
            for key in _OVERRIDING:
                os.environ.pop(key, None)
            os.environ.update(CLIENT_ENV, AWS_ENDPOINT_URL=server.endpoint_url)
        try:
            yield server
        finally:
            if set_env:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


def serve(host: str, port: int) -> None:
    """Serve moto's S3 behind the meter on host:port (0: a free one) and print the endpoint when listening."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class QuietHandler(MotoRequestHandler):
        def log_request(self, *args, **kwargs) -> None:  # a line per request would drown the output
            pass

    app = Meter(DomainDispatcherApplication(create_backend_app))
    server = make_server(host, port, app, threaded=True, request_handler=QuietHandler)
    print(f"http://{host}:{server.server_port}", flush=True)
    os.dup2(2, 1)  # anything printed later goes to stderr: a pipe nobody reads would fill and stall the server
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    args = parser.parse_args()
    os.environ.update(CLIENT_ENV)
    serve(args.host, args.port)


if __name__ == "__main__":
    main()
