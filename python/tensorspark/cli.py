"""Command line: ``tensorspark ps ...``, ``tensorspark secret FILE``, ``tensorspark stats``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import TensorSparkError


class PSBinaryNotFoundError(TensorSparkError, FileNotFoundError):
    """The package holds no ``tensorspark-ps`` executable (a broken install)."""


def ps_binary() -> str:
    """Path of the ``tensorspark-ps`` executable shipped inside the package."""
    path = Path(__file__).parent / "bin" / "tensorspark-ps"
    if not path.exists():
        raise PSBinaryNotFoundError(
            f"{path} is missing; reinstall tensorspark with `pip install .` so the C++ "
            "server is built"
        )
    return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tensorspark", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "ps", help="run a standalone parameter server (tensorspark-ps --help)", add_help=False
    )
    p_secret = sub.add_parser("secret", help="write a new random run secret to FILE (mode 600)")
    p_secret.add_argument("file")
    p_stats = sub.add_parser("stats", help="print a parameter server's counters")
    p_stats.add_argument(
        "address",
        help="HOST:PORT (:PORT means 127.0.0.1) or unix:PATH (tensorspark-ps --unix-socket)",
    )
    p_stats.add_argument(
        "--secret-file",
        required=True,
        help="read as tensorspark-ps --secret-file reads it (one trailing newline ignored)",
    )

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
        from ._secret import read_secret_file
        from .ps import PSClient, parse_address

        address = args.address
        if address.startswith(":"):
            address = "127.0.0.1" + address
        try:
            # A Unix-domain socket, "unix:PATH", has no port.
            unix = address.startswith("unix:")
            host, port = (address, 0) if unix else parse_address(address)
            secret = read_secret_file(args.secret_file)
            with PSClient(host, port, secret) as c:
                stats = c.stats()
        except TensorSparkError as e:
            sys.exit(f"tensorspark stats: {e}")
        for key, value in sorted(stats.items()):
            print(f"{key:20s} {value}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
