"""Snapshots on Hadoop file systems (``hdfs://``, ``s3a://``, ``gs://``, ...).

The parameter server writes snapshots with POSIX calls into a local
staging directory; :class:`SnapshotMirror` copies each finished file to
the Hadoop URI through the Hadoop ``FileSystem`` of the driver's Spark JVM
(whatever connectors its classpath has), as a hidden temporary name
renamed into place, and keeps the newest ``keep`` there.
:func:`fetch_snapshots` brings a URI's snapshots back to a local
directory for ``resume_from``. Files move whole and are checked by the
server's own CRCs when it resumes, so a torn upload is skipped like any
corrupt snapshot.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from typing import Any

from ..errors import TensorSparkValueError

log = logging.getLogger("tensorspark")

_SNAPSHOT = re.compile(r"^snapshot-\d+\.tsnap$")


def is_hadoop_uri(path: str | os.PathLike | None) -> bool:
    """True for ``scheme://...`` (``hdfs://nn/dir``, ``file:///dir``); plain
    paths are written directly."""
    if path is None:
        return False
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", os.fspath(path)) is not None


def _fs(sc: Any, uri: str) -> tuple[Any, Any]:
    jvm = sc._jvm
    path = jvm.org.apache.hadoop.fs.Path(uri)
    try:
        return path.getFileSystem(sc._jsc.hadoopConfiguration()), path
    except Exception as e:  # noqa: BLE001 - a py4j error with the JVM's reason
        raise TensorSparkValueError(
            f"cannot open {uri!r} through Hadoop's FileSystem: {e}. The driver's Spark needs "
            "the connector for this scheme on its classpath (e.g. hadoop-aws for s3a://)"
        ) from e


def _names(fs: Any, path: Any) -> list[str]:
    if not fs.exists(path):
        return []
    return sorted(
        st.getPath().getName()
        for st in fs.listStatus(path)
        if _SNAPSHOT.match(st.getPath().getName())
    )


class SnapshotMirror:
    """Copy the server's snapshots from ``local_dir`` to a Hadoop ``uri``.

    A daemon thread looks every ``interval`` seconds; :meth:`close` copies
    what is left (the final snapshot) and stops it. Upload failures are
    logged and retried at the next look; they never stop training.

    Parameters
    ----------
    sc : pyspark.SparkContext
        The driver's context (its JVM does the I/O).
    uri : str
        Destination directory, e.g. ``hdfs://namenode:8020/ckpt/run1``.
    local_dir : str
        The server's ``snapshot_dir``.
    keep : int
        Snapshots kept at ``uri`` (0 keeps all).
    """

    def __init__(self, sc: Any, uri: str, local_dir: str, keep: int, interval: float = 1.0) -> None:
        self.uri, self.local_dir, self.keep = uri.rstrip("/"), local_dir, keep
        self._sc = sc
        self._fs, self._path = _fs(sc, self.uri)
        try:
            self._fs.mkdirs(self._path)
            self._copied: set[str] = set(_names(self._fs, self._path))
        except Exception as e:  # noqa: BLE001 - a py4j error with the JVM's reason
            raise TensorSparkValueError(
                f"checkpoint_dir {uri!r} cannot be created or listed: {e}"
            ) from e
        self.errors = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one copy pass at a time
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
        self._thread.start()

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sync()

    def sync(self) -> list[str]:
        """Copy the snapshots not copied yet; returns their names."""
        with self._lock:
            jvm = self._sc._jvm
            done = []
            local = sorted(n for n in os.listdir(self.local_dir) if _SNAPSHOT.match(n))
            for name in local:
                if name in self._copied:
                    continue
                src = jvm.org.apache.hadoop.fs.Path("file://" + os.path.join(self.local_dir, name))
                tmp = jvm.org.apache.hadoop.fs.Path(self._path, "." + name + ".tmp")
                dst = jvm.org.apache.hadoop.fs.Path(self._path, name)
                try:
                    self._fs.copyFromLocalFile(False, True, src, tmp)
                    if not self._fs.rename(tmp, dst):
                        raise OSError(f"rename to {dst.toString()} returned false")
                except Exception as e:  # noqa: BLE001 - logged, retried next pass
                    if not os.path.exists(os.path.join(self.local_dir, name)):
                        continue  # rotated away meanwhile
                    self.errors += 1
                    log.warning(
                        "tensorspark: copying snapshot %s to %s failed: %s", name, self.uri, e
                    )
                    continue
                self._copied.add(name)
                done.append(name)
            if self.keep > 0:
                for old in _names(self._fs, self._path)[: -self.keep]:
                    self._fs.delete(jvm.org.apache.hadoop.fs.Path(self._path, old), False)
                    self._copied.discard(old)
            return done

    def close(self) -> None:
        """Stop the thread after a last copy pass."""
        self._stop.set()
        self._thread.join()
        self.sync()


def fetch_snapshots(sc: Any, uri: str) -> str:
    """Copy the snapshots of a Hadoop ``uri`` (a directory or one file) to a
    new local directory, for ``resume_from``; returns that directory."""
    fs, path = _fs(sc, uri.rstrip("/"))
    if not fs.exists(path):
        raise TensorSparkValueError(f"resume_from: {uri!r} does not exist")
    names = [path.getName()] if fs.isFile(path) else _names(fs, path)
    if not names:
        raise TensorSparkValueError(
            f"resume_from: {uri!r} holds no snapshot files (snapshot-<version>.tsnap)"
        )
    local = tempfile.mkdtemp(prefix="tensorspark-resume-")
    jvm = sc._jvm
    for name in names:
        src = path if fs.isFile(path) else jvm.org.apache.hadoop.fs.Path(path, name)
        dst = jvm.org.apache.hadoop.fs.Path("file://" + os.path.join(local, name))
        fs.copyToLocalFile(False, src, dst, True)
    return local
