"""Sparse tables over the wire: row optimizers against float64 NumPy, memory
control, sharding over two tensorspark-ps processes, and bad input."""

from __future__ import annotations

import time

import numpy as np
import pytest
from helpers import start_ps

from tensorspark import (
    ParameterServer,
    PSClient,
    ShapeMismatchError,
    ShardedPSClient,
    TensorSparkValueError,
    VariableNotFoundError,
    generate_secret,
)
from tensorspark.tables import (
    RowOptimizer,
    TableSpec,
    hash_strings,
    initial_rows,
    server_of_ids,
    validate_table,
)

M64 = (1 << 64) - 1


@pytest.fixture
def server():
    secret = generate_secret()
    with ParameterServer(secret, host="127.0.0.1") as s:
        s.secret = secret
        yield s


@pytest.fixture
def client(server):
    with PSClient("127.0.0.1", server.port, server.secret) as c:
        yield c


def _mix(x: int) -> int:
    x &= M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


# ---- float64 references of docs/sparse.md, "Row optimizers" ----


class Reference:
    def __init__(self, spec: TableSpec, ids):
        self.spec = spec
        self.rows = {
            int(i): r.astype(np.float64)
            for i, r in zip(ids, initial_rows(spec.name, ids, spec.dim, spec.seed), strict=True)
        }
        o = spec.optimizer
        self.a = {i: np.full(spec.dim, o.initial_accumulator) for i in self.rows}
        self.m = {i: np.zeros(spec.dim) for i in self.rows}
        self.t = dict.fromkeys(self.rows, 0)

    def push(self, ids, grads):
        o = self.spec.optimizer
        lr = o.learning_rate
        for i, g in zip(ids, grads.astype(np.float64), strict=True):
            i = int(i)
            w = self.rows[i]
            if o.kind == "sgd":
                w -= lr * g
            elif o.kind == "adagrad":
                self.a[i] += g * g
                w -= lr * g / np.sqrt(self.a[i] + o.epsilon)
            elif o.kind == "adam":
                self.t[i] += 1
                t = self.t[i]
                self.m[i] += (1 - o.beta1) * (g - self.m[i])
                # `a` holds v for Adam (starts at 0).
                if t == 1:
                    self.a[i] = np.zeros(self.spec.dim)
                self.a[i] += (1 - o.beta2) * (g * g - self.a[i])
                alpha = lr * np.sqrt(1 - o.beta2**t) / (1 - o.beta1**t)
                w -= alpha * self.m[i] / (np.sqrt(self.a[i]) + o.epsilon)
            else:  # ftrl; m holds z
                p = -o.lr_power
                n, z = self.a[i], self.m[i]
                n2 = n + g * g
                z += g - (n2**p - n**p) / lr * w
                self.a[i] = n2
                q = n2**p / lr + 2 * (o.l2 + o.beta / (2 * lr))
                w[:] = (np.clip(z, -o.l1, o.l1) - z) / q


OPTIMIZERS = {
    "sgd": RowOptimizer("sgd", learning_rate=0.1),
    "adagrad": RowOptimizer("adagrad", learning_rate=0.1, initial_accumulator=0.1, epsilon=1e-7),
    "adam": RowOptimizer("adam", learning_rate=0.01, beta1=0.9, beta2=0.999, epsilon=1e-7),
    "ftrl": RowOptimizer(
        "ftrl", learning_rate=0.1, initial_accumulator=0.1, l1=0.001, l2=0.01, lr_power=-0.5
    ),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_row_optimizers_match_float64_numpy(client, kind):
    spec = TableSpec("emb", dim=4, seed=3, optimizer=OPTIMIZERS[kind])
    assert client.create_tables([spec]) == [True]
    everything = np.array([1, 2, 3, 5, 9, -4], np.int64)
    ref = Reference(spec, everything)
    rng = np.random.default_rng(0)
    # Repeated rows across pushes; 9 and -4 are never pushed; 3 only once
    # (Adam must leave it alone afterwards).
    for ids in ([1, 2, 3], [2, 5], [1, 2], [5, 1, 2]):
        ids = np.array(ids, np.int64)
        grads = rng.normal(size=(ids.size, 4)).astype(np.float32)
        client.push_rows({"emb": (ids, grads)}, kind="gradient")
        ref.push(ids, grads)
    got = client.pull_rows({"emb": everything})["emb"]
    want = np.stack([ref.rows[int(i)] for i in everything])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    untouched = initial_rows("emb", [9, -4], 4, seed=3)
    np.testing.assert_array_equal(got[4:], untouched)
    assert client.list_tables()["emb"]["rows"] == 4


def test_pull_push_export_list_and_stats(client, server):
    spec = TableSpec("user", dim=3, seed=1, optimizer=RowOptimizer("sgd", learning_rate=0.5))
    assert client.create_tables([spec]) == [True]
    assert client.create_tables([spec]) == [False]
    ids = np.array([4, 8, 4], np.int64)
    rows = client.pull_rows({"user": ids})["user"]
    assert rows.shape == (3, 3) and rows.dtype == np.float32
    np.testing.assert_array_equal(rows, initial_rows("user", ids, 3, seed=1))
    version = client.push_rows({"user": ([4, 8], np.ones((2, 3), np.float32))}, kind="delta")
    assert version == 1
    out = np.empty((2, 3), np.float32)
    assert client.pull_rows_into({"user": (np.array([8, 4]), out)}) == 1
    np.testing.assert_allclose(out, initial_rows("user", [8, 4], 3, seed=1) + 1, rtol=1e-6)
    exp_ids, exp_values = client.export_rows("user", batch_rows=1)
    order = np.argsort(exp_ids)
    assert exp_ids[order].tolist() == [4, 8]
    np.testing.assert_allclose(exp_values[order], initial_rows("user", [4, 8], 3, seed=1) + 1)
    tables = client.list_tables()
    assert tables["user"]["rows"] == 2 and tables["user"]["spec"] == spec
    stats = server.stats()
    assert stats["tables"] == 1
    assert stats['table_rows{table="user"}'] == 2
    assert stats["rows_pulled"] == 5
    assert stats["rows_pushed"] == 2


def test_lru_eviction_keeps_the_recently_used_rows(client, server):
    spec = TableSpec("lru", dim=2, capacity=4, eviction="lru", optimizer=RowOptimizer("sgd"))
    client.create_tables([spec])
    client.push_rows({"lru": ([0, 1, 2, 3], np.ones((4, 2), np.float32))}, kind="delta")
    time.sleep(1.1)  # touch times have a resolution of one second
    client.pull_rows({"lru": [1, 2, 3]})
    client.push_rows({"lru": ([10], np.ones((1, 2), np.float32))}, kind="delta")
    ids, _ = client.export_rows("lru")
    assert sorted(ids.tolist()) == [1, 2, 3, 10]
    np.testing.assert_array_equal(
        client.pull_rows({"lru": [0]})["lru"], initial_rows("lru", [0], 2)
    )
    assert server.stats()['table_evictions{table="lru"}'] == 1


def test_admission_waits_for_enough_sightings(client, server):
    spec = TableSpec("adm", dim=2, admit_after=3, optimizer=RowOptimizer("sgd"))
    client.create_tables([spec])
    first = initial_rows("adm", [7], 2)
    client.push_rows({"adm": ([7], np.ones((1, 2), np.float32))}, kind="delta")  # seen once
    np.testing.assert_array_equal(client.pull_rows({"adm": [7]})["adm"], first)  # twice
    assert server.stats()['table_admissions_refused{table="adm"}'] >= 1
    client.pull_rows({"adm": [7]})  # three times
    client.push_rows({"adm": ([7], np.ones((1, 2), np.float32))}, kind="delta")
    np.testing.assert_allclose(client.pull_rows({"adm": [7]})["adm"], first + 1)


def test_ttl_drops_untouched_rows(client):
    spec = TableSpec("ttl", dim=2, ttl_s=1, optimizer=RowOptimizer("sgd"))
    client.create_tables([spec])
    client.push_rows({"ttl": ([5], np.ones((1, 2), np.float32))}, kind="delta")
    np.testing.assert_allclose(
        client.pull_rows({"ttl": [5]})["ttl"], initial_rows("ttl", [5], 2) + 1
    )
    time.sleep(2.2)
    np.testing.assert_array_equal(
        client.pull_rows({"ttl": [5]})["ttl"], initial_rows("ttl", [5], 2)
    )


def test_sharded_over_two_ps_processes_matches_one_server(tmp_path, server):
    secret = generate_secret().hex().encode()
    procs = [start_ps(tmp_path, secret=secret) for _ in range(2)]
    try:
        ports = [port for _, port, _ in procs]
        spec = TableSpec("item", dim=8, seed=5, optimizer=RowOptimizer("adagrad", 0.05))
        rng = np.random.default_rng(1)
        ids = rng.choice(10_000, size=200, replace=False).astype(np.int64)
        grads = rng.normal(size=(200, 8)).astype(np.float32)
        query = np.concatenate([ids[::3], [123456789, -5], ids[:4]]).astype(np.int64)
        with (
            ShardedPSClient([("127.0.0.1", p) for p in ports], secret) as sharded,
            PSClient("127.0.0.1", server.port, server.secret) as single,
        ):
            assert sharded.create_tables([spec]) == [True]
            single.create_tables([spec])
            for _ in range(2):
                sharded.push_rows({"item": (ids, grads)})
                single.push_rows({"item": (ids, grads)})
            got = sharded.pull_rows({"item": query})["item"]
            np.testing.assert_array_equal(got, single.pull_rows({"item": query})["item"])
            assert sharded.list_tables()["item"]["rows"] == 200
            exported, _ = sharded.export_rows("item", batch_rows=64)
            assert sorted(exported.tolist()) == sorted(ids.tolist())
        where = server_of_ids(ids, 2)
        for s, port in enumerate(ports):
            with PSClient("127.0.0.1", port, secret) as one:
                stored, _ = one.export_rows("item")
                assert sorted(stored.tolist()) == sorted(ids[where == s].tolist())
    finally:
        for proc, _, _ in procs:
            proc.terminate()
            proc.wait(timeout=20)


def test_bad_inputs_name_the_table_and_value(client):
    client.create_tables(
        [
            TableSpec("user", dim=16, optimizer=RowOptimizer("sgd")),
            TableSpec("country", dim=2, vocab=10),
            TableSpec("small", dim=2, capacity=2),
        ]
    )
    with pytest.raises(
        TensorSparkValueError, match="table 'user': ids must be integers, got float64"
    ):
        client.pull_rows({"user": np.array([1.0, 2.0])})
    with pytest.raises(TensorSparkValueError, match="table 'user': ids must be integers"):
        client.push_rows({"user": (np.array([1.5]), np.zeros((1, 16)))})
    with pytest.raises(TensorSparkValueError, match="table 'country': id 10 is out of range"):
        client.pull_rows({"country": [3, 10]})
    with pytest.raises(TensorSparkValueError, match="table 'country': id -1 is out of range"):
        client.push_rows({"country": ([-1], np.zeros((1, 2)))})
    client.push_rows({"small": ([1, 2], np.zeros((2, 2)))}, kind="delta")
    with pytest.raises(TensorSparkValueError, match="table 'small' is full"):
        client.push_rows({"small": ([3], np.zeros((1, 2)))}, kind="delta")
    with pytest.raises(
        ShapeMismatchError, match="table 'user' has dim 16 on the server, the push carries 32"
    ):
        client.push_rows({"user": ([1], np.zeros((1, 32)))})
    with pytest.raises(ShapeMismatchError, match="table 'user' has dim 16"):
        client.pull_rows_into({"user": ([1], np.zeros((1, 8), np.float32))})
    with pytest.raises(ShapeMismatchError, match="table 'user'"):
        client.push_rows({"user": ([1, 2], np.zeros((1, 16)))})
    with pytest.raises(VariableNotFoundError, match="'ghost'"):
        client.pull_rows({"ghost": [1]})
    with pytest.raises(TensorSparkValueError, match="push_rows: kind"):
        client.push_rows({"user": ([1], np.zeros((1, 16)))}, kind="parameters")
    # Nothing was changed by the refused requests.
    tables = client.list_tables()
    assert [tables[t]["rows"] for t in ("user", "country", "small")] == [0, 0, 2]


def test_spec_validation_names_table_and_field():
    with pytest.raises(TensorSparkValueError, match="table 'u': dim must be in"):
        validate_table(TableSpec("u", dim=0))
    with pytest.raises(TensorSparkValueError, match="table 'u': optimizer.kind must be one of"):
        validate_table(TableSpec("u", dim=4, optimizer=RowOptimizer("rmsprop")))
    with pytest.raises(TensorSparkValueError, match="table 'u': optimizer.learning_rate"):
        validate_table(TableSpec("u", dim=4, optimizer=RowOptimizer("sgd", learning_rate=0)))
    with pytest.raises(TensorSparkValueError, match="table 'u': eviction must be one of"):
        validate_table(TableSpec("u", dim=4, eviction="fifo"))
    with pytest.raises(TensorSparkValueError, match="table 'u': optimizer.beta1"):
        validate_table(TableSpec("u", dim=4, optimizer=RowOptimizer("adam", beta1=1.0)))


def test_hashes_follow_the_documented_formulas():
    ids = np.array([0, 1, -1, 2**62, 123456789], np.int64)
    want = [_mix(int(i)) % 3 for i in ids]
    assert server_of_ids(ids, 3).tolist() == want
    words = ["", "a", "user-42", "日本"]

    def fnv(s: str) -> int:
        h = 0xCBF29CE484222325
        for b in s.encode("utf-8"):
            h = ((h ^ b) * 0x100000001B3) & M64
        return _mix(h) & ((1 << 63) - 1)

    got = hash_strings(words)
    assert got.dtype == np.int64
    assert got.tolist() == [fnv(w) for w in words]
    assert hash_strings(np.array(words)).tolist() == got.tolist()
    with pytest.raises(TensorSparkValueError, match="hash_strings takes str"):
        hash_strings([1, 2])
