"""One rule for reading a run secret from a file, the same as ``tensorspark-ps``.

``tensorspark-ps --secret-file PATH`` (``cpp/src/tools/ps_main.cc``) reads
the file's bytes exactly, then drops one trailing ``"\\n"`` and after it one
trailing ``"\\r"`` (so a line written by ``echo`` or a Windows editor works),
and needs at least 16 bytes. Nothing else is stripped: spaces, a second
newline or any other byte are part of the secret. :func:`read_secret_file`
does exactly the same, so a driver that reads the file with it proves the
same secret as the server.
"""

from __future__ import annotations

import os

from .errors import TensorSparkValueError

MIN_SECRET_BYTES = 16


def read_secret_file(path: str | os.PathLike[str]) -> bytes:
    """The run secret in ``path``, read as ``tensorspark-ps --secret-file`` does.

    Parameters
    ----------
    path : str or path-like
        The secret file, e.g. written by ``tensorspark secret FILE``.

    Returns
    -------
    bytes
        The file's bytes without one trailing ``"\\n"`` and then one
        trailing ``"\\r"``.

    Raises
    ------
    TensorSparkValueError
        The file cannot be read, or holds fewer than 16 bytes after that.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TensorSparkValueError(
            f"cannot read the secret file '{os.fspath(path)}': {e.strerror or e}"
        ) from e
    if data.endswith(b"\n"):
        data = data[:-1]
    if data.endswith(b"\r"):
        data = data[:-1]
    if len(data) < MIN_SECRET_BYTES:
        raise TensorSparkValueError(
            f"the secret in '{os.fspath(path)}' has {len(data)} bytes; at least "
            f"{MIN_SECRET_BYTES} are required"
        )
    return data
