"""Snapshots and resume: a driver killed with SIGKILL, then resumed (real Spark, real TF)."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

# The killed driver: a fit that snapshots every few pushes and never ends on
# its own (a callback sleeps after each epoch).
DRIVER = textwrap.dedent(
    """
    import os, sys, time
    os.environ["PYSPARK_PYTHON"] = sys.executable
    sys.path.insert(0, {tests!r})
    from pyspark.sql import SparkSession
    import keras
    from test_keras import _build, _data, _df
    import tensorspark.keras

    spark = SparkSession.builder.master("local[2]").getOrCreate()
    x, y = _data(2000)
    df = _df(spark, x, y)

    class Slow(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            print("epoch done", epoch, flush=True)
            time.sleep(2)

    tensorspark.keras.fit(_build(0.02), df, epochs=1000, batch_size=50, sync_interval=2,
                          checkpoint_dir={ckpt!r}, checkpoint_every_versions=20,
                          checkpoint_every_s=0, checkpoint_keep=3, callbacks=[Slow()],
                          progress=False)
    """
)


def _snapshots(ckpt: str) -> list[str]:
    return sorted(glob.glob(os.path.join(ckpt, "snapshot-*.tsnap")))


def _version(path: str) -> int:
    return int(os.path.basename(path)[len("snapshot-") : -len(".tsnap")])


def test_driver_killed_then_resumed_from_the_snapshot(spark, tmp_path):
    from test_keras import _build, _data, _df

    import tensorspark.keras

    ckpt = str(tmp_path / "ckpt")
    script = tmp_path / "driver.py"
    tests = os.path.dirname(os.path.abspath(__file__))
    script.write_text(DRIVER.format(tests=tests, ckpt=ckpt))
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115 - closed below
    driver = subprocess.Popen([sys.executable, str(script)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        # Wait for three snapshots and a completed epoch, then kill mid-run.
        while time.monotonic() < deadline:
            if driver.poll() is not None:
                pytest.fail(f"the driver exited early:\n{(tmp_path / 'driver.log').read_text()}")
            if (
                len(_snapshots(ckpt)) >= 3
                and "epoch done 1" in (tmp_path / "driver.log").read_text()
            ):
                break
            time.sleep(0.2)
        else:
            pytest.fail("no snapshots within 240 s:\n" + (tmp_path / "driver.log").read_text())
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        log.close()
    snaps = _snapshots(ckpt)
    assert len(snaps) == 3  # keep-K pruning

    x, y = _data(2000)
    df = _df(spark, x, y)
    xv, yv = _data(300, seed=9)
    newest = _version(snaps[-1])
    model, history = tensorspark.keras.fit(
        _build(0.02),
        df,
        epochs=4,
        batch_size=50,
        sync_interval=2,
        resume_from=ckpt,
        checkpoint_dir=ckpt,
        checkpoint_every_versions=0,
        validation_data=(xv, yv),
        progress=False,
    )
    assert history.resumed_version == newest
    assert history.epoch and history.epoch[0] >= 2  # epochs 0 and 1 were done before the kill
    assert history.epoch[-1] == 3
    assert history.history["val_accuracy"][-1] > 0.9


def _small_run(spark, checkpoint_dir: str, every_versions: int, keep: int):
    """A 600-row DataFrame and fit settings for the snapshot tests."""
    from test_keras import _data, _df

    x, y = _data(600)
    settings = dict(
        batch_size=50,
        sync_interval=2,
        progress=False,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every_versions=every_versions,
        checkpoint_every_s=0,
        checkpoint_keep=keep,
    )
    return _df(spark, x, y), settings


def test_corrupt_newest_snapshot_falls_back_to_the_one_before(spark, tmp_path, capfd):
    from test_keras import _build

    import tensorspark.keras

    ckpt = str(tmp_path / "ckpt")
    df, common = _small_run(spark, ckpt, every_versions=0, keep=0)
    # Each fit ends with a final snapshot: after epoch 1, then after epoch 2.
    tensorspark.keras.fit(_build(0.02), df, epochs=1, **common)
    _, second = tensorspark.keras.fit(_build(0.02), df, epochs=2, resume_from=ckpt, **common)
    assert second.epoch == [1]
    snaps = _snapshots(ckpt)
    assert len(snaps) == 2
    with open(snaps[-1], "r+b") as f:  # truncate the newest
        f.truncate(os.path.getsize(snaps[-1]) // 2)
    _, history = tensorspark.keras.fit(_build(0.02), df, epochs=3, resume_from=ckpt, **common)
    assert history.resumed_version == _version(snaps[0])
    err = capfd.readouterr().err
    assert f"skipping {snaps[-1]}: truncated" in err
    assert history.epoch == [1, 2]  # the older snapshot had one completed epoch
    assert np.isfinite(history.history["loss"]).all()


def test_snapshots_through_a_hadoop_uri(spark, tmp_path):
    """``file://`` URIs go through the driver JVM's Hadoop FileSystem, like
    ``hdfs://``: snapshots are copied there, and a resume reads them back."""
    from test_keras import _build

    import tensorspark.keras

    remote = tmp_path / "remote" / "ckpt"
    uri = "file://" + str(remote)
    # The server checks every 100 ms: a snapshot at each check that sees a
    # new version, so a run of seconds writes several and keep=2 has
    # something to rotate (at 10 versions a fast run may finish between two
    # checks and leave only the final snapshot).
    df, common = _small_run(spark, uri, every_versions=1, keep=2)
    tensorspark.keras.fit(_build(0.02), df, epochs=2, **common)
    snaps = _snapshots(str(remote))
    assert len(snaps) == 2, os.listdir(remote)  # keep=2 applies there too
    assert not glob.glob(str(remote / ".*.tmp"))
    _, history = tensorspark.keras.fit(_build(0.02), df, epochs=3, resume_from=uri, **common)
    assert history.resumed_version == _version(snaps[-1])
    assert history.epoch == [2]
    assert len(_snapshots(str(remote))) == 2
    assert _version(_snapshots(str(remote))[-1]) > _version(snaps[-1])


def test_unusable_hadoop_uri_is_a_clear_error(spark):
    from test_keras import _build, _data, _df

    import tensorspark.keras
    from tensorspark import TensorSparkValueError

    x, y = _data(100)
    with pytest.raises(TensorSparkValueError, match="nosuchscheme"):
        tensorspark.keras.fit(
            _build(0.02),
            _df(spark, x, y),
            epochs=1,
            progress=False,
            checkpoint_dir="nosuchscheme://bucket/ckpt",
        )
