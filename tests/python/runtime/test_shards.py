"""Shards hosted by Spark tasks (ps_shards): real Spark local[2], real servers and sockets.

The fixture's local[2] has two task slots, so one shard leaves one slot
for training: the partitions train one after the other. The directory's
own tests drive its wire by hand, as a shard task or a worker would.
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import socket
import struct
import threading
import time

import numpy as np
import pytest
from test_session import counting_graph, ones_rdd

from tensorspark import (
    AuthenticationError,
    DeltaCombiner,
    PSTimeoutError,
    SparkSession,
    TensorSparkError,
    TensorSparkValueError,
    generate_secret,
)
from tensorspark.errors import ProtocolError
from tensorspark.runtime import shards
from tensorspark.runtime.spark import Cluster

DIM = 8


def _model(seed: int = 3):
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((DIM,)),
            # Fixed names: the server keys weights by them, and a resumed run must match.
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dense(2, name="logits"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _frame(spark, n: int = 600):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    y = (x @ np.linspace(-1.0, 1.0, DIM) > 0).astype(np.int64)
    rows = [(x[i].tolist(), int(y[i])) for i in range(n)]
    # coalesce, not repartition: a shuffle may reorder the rows.
    return spark.createDataFrame(rows, "features array<float>, label long").coalesce(1)


@pytest.mark.slow
def test_a_shard_in_a_spark_task_trains_the_same_model_as_the_driver(spark, tmp_path, capfd):
    """One partition, no shuffle: the in-driver server and a shard in a task agree exactly.

    The shard runs over TLS (its own certificate, pinned through the
    directory) and snapshots into checkpoint_dir/run-<id>/shard-0.
    """
    from tensorspark.keras import fit

    df = _frame(spark)
    common = dict(epochs=2, batch_size=50, sync_interval=3, shuffle=False, progress=False)
    m_driver, h_driver = fit(_model(), df, **common)
    ckpt = tmp_path / "ckpt"
    m_shard, h_shard = fit(_model(), df, ps_shards=1, tls=True, checkpoint_dir=str(ckpt), **common)
    for a, b in zip(m_driver.get_weights(), m_shard.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert h_shard.history["loss"] == h_driver.history["loss"]
    err = capfd.readouterr().err
    assert "tensorspark: parameter-server shard 0 serving at 127.0.0.1:" in err
    # The baseline, one tagged snapshot per epoch and the final one, in the run's directory.
    (run_dir,) = glob.glob(str(ckpt / "run-*"))
    assert len(glob.glob(os.path.join(run_dir, "shard-0", "snapshot-*.tsnap"))) >= 2
    assert all(w["shard_reconnects"] == 0 for epoch in h_shard.workers for w in epoch)


@pytest.mark.slow
def test_a_sharded_run_resumes_from_its_run_directory(spark, tmp_path):
    """A new run started from an earlier sharded run's directory continues its epochs."""
    from tensorspark.keras import fit

    df = _frame(spark)
    common = dict(batch_size=50, sync_interval=3, shuffle=False, progress=False, name="resumed")
    ckpt = tmp_path / "ckpt"
    first, _ = fit(_model(), df, epochs=1, ps_shards=1, checkpoint_dir=str(ckpt), **common)
    (run_dir,) = glob.glob(str(ckpt / "run-*"))
    again, history = fit(_model(seed=9), df, epochs=2, ps_shards=1, resume_from=run_dir, **common)
    assert len(history.history["loss"]) == 1  # epoch 1 was done: only epoch 2 ran
    # One partition, no shuffle, plain SGD: the same weights as 2 epochs in one run.
    full, _ = fit(_model(), df, epochs=2, **common)
    for a, b in zip(full.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_tf1_session_applies_every_push_to_a_shard_in_a_task(sc, tf1):
    """The TF1 API with ps_shards=1: both partitions' pushes all reach the shard."""
    x, v, train = counting_graph(tf1)
    sess = tf1.Session()
    sess.run(tf1.global_variables_initializer())
    with SparkSession(sc, sess, sync_interval=3, batch_size=4, ps_shards=1) as ss:
        assert len(ss.servers) == 1 and ss.server is None  # not in the driver
        ss.run(
            train,
            feed_rdd=ones_rdd(sc, 24, 2),
            feed_name_list=[x.name],
            weight_combiner=DeltaCombiner(),
        )
        assert ss.stats()["version"] >= 2
    np.testing.assert_array_equal(sess.run(v), [24.0, 24.0])


def test_too_few_slots_fail_before_anything_starts(spark):
    """local[2] has 2 slots: 2 shards leave none for training, so the run is refused."""
    from tensorspark.keras import fit

    before = threading.active_count()
    with pytest.raises(TensorSparkValueError, match=r"ps_shards=2 needs at least 3 task slots"):
        fit(_model(), _frame(spark, 50), ps_shards=2, connect_timeout=1.0, progress=False)
    assert threading.active_count() <= before


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ps_shards": -1}, "ps_shards must be an int >= 0"),
        ({"ps_shards": 1.5}, "ps_shards must be an int >= 0"),
        ({"ps_shards": 1, "servers": ["h:1"], "secret": b"x" * 16}, "cannot go with servers"),
        ({"ps_shards": 1, "server_port": 5000}, "leave server_port at 0"),
        ({"ps_shards": 1, "checkpoint_dir": "hdfs://nn/ckpt"}, "a path every executor reaches"),
        ({"ps_shards": 1, "resume_from": "servers"}, "resume_from='servers' is for servers"),
    ],
)
def test_refused_shard_options(spark, kwargs, match):
    from tensorspark.keras import fit

    with pytest.raises(TensorSparkValueError, match=match):
        fit(_model(), _frame(spark, 50), progress=False, **kwargs)


# -- the directory, driven by hand ---------------------------------------------------


class _Host:
    """A ShardHost without its Spark job: the test plays the shard tasks."""

    def __init__(self, sc, count: int = 1, heartbeat_timeout: float = 30.0) -> None:
        self.secret = generate_secret()

        def config(directory):
            return shards.ShardConfig(
                directory, self.secret, count, "", 0.0, 0, 3, False, 1, 5.0, 30.0
            )

        self.host = shards.ShardHost(
            Cluster(sc),
            config,
            bind="127.0.0.1",
            advertise="127.0.0.1",
            name="test",
            group="test-shards",
            heartbeat_timeout=heartbeat_timeout,
        )

    def claim(self, index: int, attempt: int) -> tuple[shards.Channel, int, bytes]:
        ch = shards.open_channel(self.host.address, self.secret, 5.0)
        payload = shards.Writer().u32(index).u32(attempt).raw(os.urandom(16))
        ch.send(shards.CLAIM, bytes(payload.buf))
        kind, body = ch.recv(5.0, "the answer to CLAIM")
        return ch, kind, body

    def ready(self, ch: shards.Channel, port: int) -> None:
        ch.send(shards.READY, bytes(shards.Writer().u16(port).text("127.0.0.1").text("").buf))

    def lookup(self, wait: float = 5.0):
        return shards.lookup(self.host.address, self.secret, wait)


def test_a_second_claim_waits_as_standby_and_takes_over_a_silent_owner(sc):
    """Two tasks claim shard 0 (a speculative copy): one serves, one waits without a server.

    The owner stops its heartbeats: after heartbeat_timeout the directory
    counts it lost, drops its connection (so it stops serving), and the
    standby is granted the shard. Lookups see only the serving instance.
    """
    h = _Host(sc, heartbeat_timeout=2.0)
    try:
        owner, kind, _ = h.claim(0, attempt=7)
        assert kind == shards.GRANT
        h.ready(owner, 1111)
        gen, addresses = h.lookup()
        assert [a.port for a in addresses] == [1111]
        standby, kind, body = h.claim(0, attempt=9)
        assert kind == shards.STANDBY
        assert "served by task attempt 7" in shards.Reader(body, "STANDBY").text()

        def beat():  # the standby stays alive; the owner goes quiet
            while not stop.is_set():
                standby.send(shards.BEAT)
                time.sleep(0.3)

        stop = threading.Event()
        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        started = time.monotonic()
        got = None
        while got is None and time.monotonic() - started < 10.0:
            got = standby.recv(0.5, "GRANT")
        stop.set()
        beater.join()
        assert got is not None and got[0] == shards.GRANT
        assert time.monotonic() - started >= 1.5  # not before the heartbeat timeout
        with pytest.raises(TensorSparkError):  # the old owner's connection was dropped
            while True:
                owner.recv(1.0, "the end")
        h.ready(standby, 2222)
        gen2, addresses = h.lookup()
        assert [a.port for a in addresses] == [2222] and gen2 > gen
    finally:
        h.host.close()


def test_lookup_waits_for_missing_shards_and_names_them(sc):
    h = _Host(sc, count=2)
    try:
        ch, kind, _ = h.claim(1, attempt=3)
        h.ready(ch, 3333)
        with pytest.raises(PSTimeoutError, match=r"shard\(s\) 0 of test not serving after 0.5 s"):
            h.lookup(wait=0.5)
        h.host.fail("shard 0 came back without its part of the model")
        with pytest.raises(TensorSparkError, match="came back without its part"):
            h.lookup()
    finally:
        h.host.close()


def test_the_directory_refuses_a_wrong_secret_both_ways(sc):
    h = _Host(sc)
    try:
        with pytest.raises(AuthenticationError, match="the secret is not the run's"):
            shards.open_channel(h.host.address, generate_secret(), 5.0)
        with pytest.raises(AuthenticationError, match="does not hold the run's secret"):
            # A directory that does not know the secret cannot answer the proof.
            fake = socket.create_server(("127.0.0.1", 0))

            def impostor():
                conn, _ = fake.accept()
                shards._send_plain(conn, shards.HELLO, os.urandom(16))
                shards._recv_plain(conn, shards.AUTH, time.monotonic() + 5, "AUTH")
                shards._send_plain(conn, shards.AUTH_OK, os.urandom(32))
                time.sleep(0.5)
                conn.close()

            t = threading.Thread(target=impostor, daemon=True)
            t.start()
            shards.open_channel(fake.getsockname(), h.secret, 5.0)
        t.join()
        fake.close()
    finally:
        h.host.close()


def test_a_changed_frame_is_detected(sc):
    """One bit flipped in an authenticated frame fails its tag: the directory hangs up
    on that connection and keeps serving the others."""
    h = _Host(sc)
    try:
        owner, _, _ = h.claim(0, attempt=1)
        h.ready(owner, 5555)
        ch = shards.open_channel(h.host.address, h.secret, 5.0)
        header = shards._header(shards.LOOKUP, 4)
        payload = bytearray(struct.pack("<I", 1000))
        tag = shards._mac(ch._key, b"C", struct.pack("<Q", 0), header, bytes(payload))
        payload[0] ^= 1
        ch.sock.sendall(header + bytes(payload) + tag)
        with pytest.raises(TensorSparkError, match="closed the connection"):
            ch.recv(5.0, "an answer")
        ch.close()
        _, addresses = h.lookup()
        assert [a.port for a in addresses] == [5555]
    finally:
        h.host.close()


def test_fuzzed_frames_never_break_the_directory(sc):
    """Random, truncated, oversized and misnumbered frames: each connection is dropped,
    and the directory keeps answering."""
    h = _Host(sc)
    rng = random.Random(0)
    try:
        ch, _, _ = h.claim(0, attempt=1)
        h.ready(ch, 4444)
        headers = [
            b"",
            os.urandom(5),
            shards.HEADER.pack(b"XXXX", 1, shards.HELLO, 16),
            shards.HEADER.pack(shards.MAGIC, 9, shards.AUTH, 48),
            shards.HEADER.pack(shards.MAGIC, 1, shards.AUTH, 1 << 31),
            shards.HEADER.pack(shards.MAGIC, 1, shards.AUTH, 47) + os.urandom(47),
            shards.HEADER.pack(shards.MAGIC, 1, shards.LOOKUP, 4) + os.urandom(4),
        ]
        cases = headers + [os.urandom(rng.randrange(1, 200)) for _ in range(40)]
        for data in cases:
            with socket.create_connection(h.host.address, timeout=5.0) as s:
                s.recv(shards.HEADER.size + shards.NONCE_BYTES)  # HELLO
                try:
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)
                    while s.recv(4096):  # until the directory closes its side
                        pass
                except (ConnectionResetError, BrokenPipeError, OSError) as e:
                    assert not isinstance(e, TimeoutError), "the directory kept a bad peer"
        # Authenticated but malformed requests.
        for kind, body in [
            (shards.LOOKUP, b""),
            (shards.LOOKUP, b"\x00" * 9),
            (shards.CLAIM, b"\x01"),
            (99, b""),
        ]:
            bad = shards.open_channel(h.host.address, h.secret, 5.0)
            bad.send(kind, body)
            with pytest.raises(TensorSparkError):
                bad.recv(5.0, "the end")
            bad.close()
        _, addresses = h.lookup()
        assert [a.port for a in addresses] == [4444]
    finally:
        h.host.close()


def test_address_decoding_checks_every_length():
    payload = shards.encode_addresses(
        3, [shards.Address("10.0.0.1", 1, ""), shards.Address("h", 2, "sha256:ab")]
    )
    assert shards.decode_addresses(payload) == (
        3,
        [shards.Address("10.0.0.1", 1, ""), shards.Address("h", 2, "sha256:ab")],
    )
    for cut in range(len(payload)):
        with pytest.raises(ProtocolError):
            shards.decode_addresses(payload[:cut])
    with pytest.raises(ProtocolError, match="stray bytes"):
        shards.decode_addresses(payload + b"\x00")
    rng = random.Random(1)
    for _ in range(500):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        with contextlib.suppress(ProtocolError):  # anything else fails the test
            shards.decode_addresses(data)


@pytest.mark.slow
def test_a_table_on_a_shard_in_a_task_trains_as_in_the_driver(spark):
    """A ParameterServerEmbedding's rows live on the shard: the run matches the in-driver one."""
    import keras
    import test_sparse_keras as sk

    from tensorspark.keras import fit
    from tensorspark.keras.layers import ParameterServerEmbedding

    ids, dense, label = sk._rows()
    df = sk._df(spark, ids, dense, label)
    runs = []
    for shards_n in (0, 1):
        layer = ParameterServerEmbedding(
            sk.VOCAB, sk.DIM, optimizer=keras.optimizers.SGD(0.5), name="items"
        )  # one name: the server seeds a table's initial rows by it
        model = sk._model(layer, optimizer=keras.optimizers.SGD(0.5))
        common = dict(features_col=None, label_col="label", epochs=2, batch_size=32)
        runs.append(
            fit(
                model,
                df,
                sync_interval=1,
                shuffle=False,
                progress=False,
                ps_shards=shards_n,
                **common,
            )
        )
    (m0, h0), (m1, h1) = runs
    np.testing.assert_allclose(h1.history["loss"], h0.history["loss"], rtol=1e-6)
    for a, b in zip(m0.get_weights(), m1.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert sum(r["rows_pulled"] for epoch in h1.workers for r in epoch) > 0
