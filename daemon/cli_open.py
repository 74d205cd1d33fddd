"""`kvtier open`: the daemon's status page (GET /) in the user's browser."""

from __future__ import annotations

import argparse
import sys
import webbrowser

from .serve_options import daemon_port


def add_parser(commands) -> None:
    opener = commands.add_parser("open", help="open the daemon's status page in the browser")
    opener.add_argument("--host", default="127.0.0.1", help="the daemon's address (default 127.0.0.1)")
    opener.add_argument("--port", type=daemon_port, default=8420, help="the daemon's port (default 8420)")


def page_url(host: str, port: int) -> str:
    # A wildcard bind is reached on loopback from this machine; an IPv6 literal needs brackets.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def run(args: argparse.Namespace) -> int:
    url = page_url(args.host, args.port)
    print(url)  # printed first: where no browser opens (ssh), the user copies it
    if not webbrowser.open(url):
        print("kvtier: no browser could be started here; open the URL above yourself", file=sys.stderr)
        return 1
    return 0
