"""Command line: ``tensorspark ps ...``, ``tensorspark secret FILE``, ``tensorspark stats``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def ps_binary() -> str:
    """Path of the ``tensorspark-ps`` executable shipped inside the package."""
    path = Path(__file__).parent / "bin" / "tensorspark-ps"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; reinstall tensorspark with `pip install .` so the C++ "
            "server is built"
        )
    return str(path)


def _read_secret(path: str) -> bytes:
    data = Path(path).read_bytes().rstrip(b"\r\n")
    if len(data) < 16:
        sys.exit(f"tensorspark: secret file {path} holds {len(data)} bytes; 16 or more needed")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tensorspark", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "ps", help="run a standalone parameter server (tensorspark-ps --help)", add_help=False
    )
    p_secret = sub.add_parser("secret", help="write a new random run secret to FILE (mode 600)")
    p_secret.add_argument("file")
    p_stats = sub.add_parser("stats", help="print a parameter server's counters")
    p_stats.add_argument("address", help="HOST:PORT")
    p_stats.add_argument("--secret-file", required=True)

    args, rest = parser.parse_known_args(argv)
    if args.command == "ps":
        binary = ps_binary()
        os.execv(binary, [binary, *rest])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "secret":
        from .ps import generate_secret

        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(generate_secret().hex().encode())
        print(f"wrote a new secret to {args.file}")
        return 0
    if args.command == "stats":
        from .ps import PSClient

        host, _, port = args.address.rpartition(":")
        with PSClient(host or "127.0.0.1", int(port), _read_secret(args.secret_file)) as c:
            for key, value in sorted(c.stats().items()):
                print(f"{key:20s} {value}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
