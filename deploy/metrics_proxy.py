#!/usr/bin/env python3
"""Expose only GET /metrics of a blocktarget whose HTTP server stays on loopback.

blocktarget serves /metrics on the same HTTP address as its JSON-RPC, and JSON-RPC has
no authentication: anyone who can reach it can delete bdevs or subsystems. Where
Prometheus scrapes from another machine (the Kubernetes DaemonSet in deploy/k8s, a remote
Prometheus for a systemd install), binding the target's HTTP server to a routable
address would publish the control plane too. This relay keeps the target on
127.0.0.1 and forwards nothing but `GET /metrics` (and answers `/healthz` itself for a
liveness probe that must not depend on the target). Standard library only, so it runs
from the blocktarget image or any Python 3.11.

    metrics_proxy.py --listen 0.0.0.0:9190 --upstream 127.0.0.1:9009
"""

from __future__ import annotations

import argparse
import http.client
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socket import AF_INET6

# What a scrape may take before the relay gives up; Prometheus's own default is 10 s.
UPSTREAM_TIMEOUT = 8.0


def split_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


class Relay(BaseHTTPRequestHandler):
    upstream: tuple[str, int] = ("127.0.0.1", 9009)
    server_version = "blocktarget-metrics-proxy"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._reply(200, b"ok\n", "text/plain; charset=utf-8")
        elif path == "/metrics":
            self._relay()
        else:
            self._reply(404, b"only /metrics and /healthz are served here\n",
                        "text/plain; charset=utf-8")

    def do_HEAD(self) -> None:
        self._reply(405, b"", "text/plain; charset=utf-8")

    # JSON-RPC is a POST: refusing every other method is the point of the relay.
    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD

    def _relay(self) -> None:
        conn = http.client.HTTPConnection(*self.upstream, timeout=UPSTREAM_TIMEOUT)
        try:
            headers = {}
            if "Accept" in self.headers:  # lets the target pick the exposition format
                headers["Accept"] = self.headers["Accept"]
            conn.request("GET", "/metrics", headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            ctype = resp.getheader("Content-Type", "text/plain")
            self._reply(resp.status, body, ctype)
        except (OSError, http.client.HTTPException) as exc:
            self._reply(502, f"blocktarget at {self.upstream[0]}:{self.upstream[1]} "
                             f"did not answer: {exc}\n".encode(), "text/plain; charset=utf-8")
        finally:
            conn.close()

    def _reply(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if status == 405:
            self.send_header("Allow", "GET")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: a scrape every few seconds would flood the log."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=split_address, default=("0.0.0.0", 9190),
                   help="HOST:PORT to serve /metrics on (default 0.0.0.0:9190)")
    p.add_argument("--upstream", type=split_address, default=("127.0.0.1", 9009),
                   help="the target's HTTP RPC address HOST:PORT (default 127.0.0.1:9009)")
    args = p.parse_args(argv)
    Relay.upstream = args.upstream
    server_class = ThreadingHTTPServer
    if ":" in args.listen[0]:  # an IPv6 listen address needs an AF_INET6 socket
        server_class = type("Server6", (ThreadingHTTPServer,), {"address_family": AF_INET6})
    server = server_class(args.listen, Relay)
    server.daemon_threads = True
    # Kubernetes and Docker stop containers with SIGTERM; leave serve_forever cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"relaying GET /metrics on {args.listen[0]}:{args.listen[1]} "
          f"to {args.upstream[0]}:{args.upstream[1]}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
