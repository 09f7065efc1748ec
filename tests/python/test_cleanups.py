"""Small contracts: combiner errors, one secret-file rule, predict's session, one version."""

from __future__ import annotations

import itertools
import re
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from helpers import free_port

import tensorspark
from tensorspark import (
    ElasticCombiner,
    MeanCombiner,
    PSClient,
    TensorSparkError,
    TensorSparkValueError,
    read_secret_file,
)
from tensorspark.cli import main as cli_main
from tensorspark.cli import ps_binary

REPO = Path(__file__).resolve().parents[2]
SECRET = b"0123456789abcdef-secret"

# -- combiners ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [lambda: MeanCombiner(n=0), lambda: ElasticCombiner(0.0), lambda: ElasticCombiner(1.5)]
)
def test_combiner_arguments_raise_tensorspark_value_error(make):
    with pytest.raises(TensorSparkValueError):
        make()


# -- one rule for reading a secret file: the one of tensorspark-ps --secret-file ---------------


@pytest.mark.parametrize(
    ("content", "secret"),
    [
        (SECRET, SECRET),
        (SECRET + b"\n", SECRET),
        (SECRET + b"\r\n", SECRET),
        (SECRET + b"\r", SECRET),
        (SECRET + b"\n\n", SECRET + b"\n"),  # one newline only
        (SECRET + b"\n\r", SECRET + b"\n"),  # "\n" is not last: only "\r" goes
        (b" " + SECRET + b" \n", b" " + SECRET + b" "),  # no other stripping
    ],
)
def test_read_secret_file(tmp_path, content, secret):
    path = tmp_path / "secret"
    path.write_bytes(content)
    assert read_secret_file(path) == secret


def test_read_secret_file_errors(tmp_path):
    short = tmp_path / "short"
    short.write_bytes(b"x" * 15 + b"\n")
    with pytest.raises(TensorSparkValueError, match="has 15 bytes; at least 16"):
        read_secret_file(short)
    with pytest.raises(TensorSparkValueError, match="cannot read the secret file"):
        read_secret_file(tmp_path / "missing")


def _start_ps(secret_file: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [ps_binary(), "--port", str(port), "--bind", "127.0.0.1", "--secret-file", secret_file],
        stderr=subprocess.DEVNULL,
    )
    return proc, port


@pytest.mark.parametrize("ending", [b"\r\n", b"\n\n", b" \n"])
def test_python_and_tensorspark_ps_read_the_same_secret(tmp_path, capsys, ending):
    path = tmp_path / "run.secret"
    path.write_bytes(SECRET + ending)
    proc, port = _start_ps(path)
    try:
        # The server accepts the bytes Python read: both applied one rule.
        with PSClient("127.0.0.1", port, read_secret_file(path), connect_timeout=10) as c:
            assert "connections" in " ".join(c.stats())
        assert cli_main(["stats", f":{port}", "--secret-file", str(path)]) == 0
        assert "connections" in capsys.readouterr().out
    finally:
        proc.kill()
        proc.wait()


def test_cli_stats_reports_bad_input_without_a_traceback(tmp_path):
    short = tmp_path / "short"
    short.write_bytes(b"abc\n")
    with pytest.raises(SystemExit, match="has 3 bytes"):
        cli_main(["stats", "127.0.0.1:1", "--secret-file", str(short)])
    with pytest.raises(SystemExit, match="not of the form host:port"):
        cli_main(["stats", "nohost", "--secret-file", str(short)])
    with pytest.raises(SystemExit, match="port must be 1..65535"):
        cli_main(["stats", "127.0.0.1:70000", "--secret-file", str(short)])


# -- keras predict leaves the session's settings as they were ---------------------------------

ARROW_BATCH = "spark.sql.execution.arrow.maxRecordsPerBatch"


def test_predict_leaves_the_session_conf_alone(spark):
    import keras

    from tensorspark.keras import predict

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    df = spark.createDataFrame([([0.1, 0.2, 0.3],), ([0.4, 0.5, 0.6],)], "features array<float>")
    spark.conf.set(ARROW_BATCH, "123")
    try:
        out = predict(model, df, batch_size=7)
        assert spark.conf.get(ARROW_BATCH) == "123"
        spark.conf.unset(ARROW_BATCH)
        predict(model, df, batch_size=7)
        assert spark.conf.get(ARROW_BATCH, None) is None
        assert out.columns == ["features", "prediction"]
    finally:
        spark.conf.unset(ARROW_BATCH)


def test_predict_batches_have_batch_size_rows():
    import numpy as np
    import pyarrow as pa

    from tensorspark.keras._inference import _rebatch

    # Arrow batches of 10, 3, 0 and 12 rows, as the JVM might send them.
    values = np.arange(25)
    cuts = [0, 10, 13, 13, 25]
    batches = [
        pa.record_batch([pa.array(values[a:b])], names=["v"]) for a, b in itertools.pairwise(cuts)
    ]
    got = list(_rebatch(iter(batches), 7))
    assert [b.num_rows for b in got] == [7, 7, 7, 4]
    np.testing.assert_array_equal(np.concatenate([b.column(0).to_numpy() for b in got]), values)


# -- one version -------------------------------------------------------------------------------


def test_one_version_source():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert tensorspark.__version__ == metadata.version("tensorspark") == declared
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert "project(tensorspark VERSION ${TENSORSPARK_VERSION}" in cmake
    assert not re.search(r"project\([^)]*VERSION\s+\d", cmake), "a version number in CMakeLists"


def test_errors_derive_from_tensorspark_error():
    from tensorspark.cli import PSBinaryNotFoundError

    assert issubclass(PSBinaryNotFoundError, TensorSparkError)
    assert issubclass(PSBinaryNotFoundError, FileNotFoundError)
    assert issubclass(tensorspark.SparkDriverError, TensorSparkError)
