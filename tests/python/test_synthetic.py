"""The Criteo-like CTR generator (tensorspark.synthetic) on a real Spark local[2]."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tensorspark import synthetic
from tensorspark.errors import TensorSparkError, TensorSparkValueError

# Small vocabularies keep the tests fast; one of 10^7 checks the id range.
VOCAB = (1000, 5000, 50_000, 10_000_000)


def _sorted(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows in a canonical order: sorted by every column (Spark keeps none)."""
    keys = [arrays["dense"][:, j] for j in range(arrays["dense"].shape[1])]
    keys += [v for k, v in sorted(arrays.items()) if k != "dense"]
    order = np.lexsort(tuple(keys[::-1]))
    return {k: v[order] for k, v in arrays.items()}


def _collect(df) -> dict[str, np.ndarray]:
    table = df.toArrow()
    out = {name: table.column(name).to_numpy() for name in table.column_names if name != "dense"}
    out["dense"] = np.stack(table.column("dense").to_pylist()).astype(np.float32)
    return _sorted(out)


def test_schema_and_ranges(spark):
    df = synthetic.ctr_dataframe(spark, 3000, seed=3, partitions=3, with_logit=True)
    fields = {f.name: f.dataType.simpleString() for f in df.schema.fields}
    assert fields["label"] == "bigint"
    assert fields["dense"] == "array<float>"
    assert fields["planted_logit"] == "double"
    assert [f"C{i}" for i in range(1, 27)] == [n for n in df.columns if n.startswith("C")]
    assert all(fields[f"C{i}"] == "bigint" for i in range(1, 27))
    assert df.rdd.getNumPartitions() == 3
    data = _collect(df)
    assert len(data["label"]) == 3000
    assert set(np.unique(data["label"])) == {0, 1}
    assert data["dense"].shape == (3000, 13)
    assert np.all(data["dense"] >= 0) and np.all(np.isfinite(data["dense"]))
    for i, v in enumerate(synthetic.DEFAULT_VOCAB_SIZES):
        ids = data[f"C{i + 1}"]
        assert ids.min() >= 0 and ids.max() < v


def test_default_vocabularies():
    sizes = synthetic.DEFAULT_VOCAB_SIZES
    assert len(sizes) == 26
    assert sizes[0] == 1000 and sizes[-1] == 10_000_000
    assert list(sizes) == sorted(sizes)


def test_deterministic_by_seed_whatever_the_partitions(spark):
    kw = dict(vocab_sizes=VOCAB, seed=11)
    a = _collect(synthetic.ctr_dataframe(spark, 2000, partitions=2, **kw))
    b = _collect(synthetic.ctr_dataframe(spark, 2000, partitions=2, **kw))
    c = _collect(synthetic.ctr_dataframe(spark, 2000, partitions=5, **kw))
    local = _sorted(synthetic.ctr_arrays(2000, **kw))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
        np.testing.assert_array_equal(a[name], c[name])
        np.testing.assert_array_equal(a[name], local[name])
    other = _collect(synthetic.ctr_dataframe(spark, 2000, partitions=2, vocab_sizes=VOCAB, seed=12))
    assert not np.array_equal(a["C3"], other["C3"])
    assert not np.array_equal(a["dense"], other["dense"])


def test_offset_continues_the_same_rows():
    kw = dict(vocab_sizes=VOCAB, seed=5, with_logit=True)
    whole = synthetic.ctr_arrays(300, **kw)
    tail = synthetic.ctr_arrays(100, offset=200, **kw)
    for name in whole:
        np.testing.assert_array_equal(whole[name][200:], tail[name])


def test_generated_in_tasks_of_several_partitions(spark):
    df = synthetic.ctr_dataframe(spark, 4000, vocab_sizes=VOCAB, seed=1, partitions=4)
    assert df.rdd.getNumPartitions() == 4
    per_task = df.rdd.mapPartitions(lambda rows: [sum(1 for _ in rows)]).collect()
    assert per_task == [1000, 1000, 1000, 1000]


def test_zipf_skew_and_spread_hot_ids():
    data = synthetic.ctr_arrays(20_000, vocab_sizes=VOCAB, seed=2)
    for f, v in enumerate(VOCAB):
        counts = np.bincount(data[f"C{f + 1}"], minlength=v)
        top = np.sort(counts)[::-1]
        expected = synthetic.expected_rank_probability(v, 1.1, 0) * 20_000
        # The hottest id's count is within 5 sigma of its expectation.
        assert abs(top[0] - expected) < 5 * np.sqrt(expected), (v, top[0], expected)
        assert top[0] > 3 * top[9] > 0
        # The ten hottest ids are not 0..9: the rank -> id map spreads them.
        hot = np.argsort(counts)[::-1][:10]
        assert sorted(hot.tolist()) != list(range(10))
    # A 10^7 vocabulary: far fewer distinct ids than rows (a long, thin tail).
    distinct = len(np.unique(data["C4"]))
    assert 1000 < distinct < 20_000


def test_planted_auc_is_high_but_not_perfect(spark):
    df = synthetic.ctr_dataframe(spark, 5000, seed=0, with_logit=True, path=None)
    value = synthetic.planted_auc(df)
    assert 0.75 <= value <= 0.85, value
    rate = df.agg({"label": "mean"}).first()[0]
    assert 0.2 < rate < 0.45, rate


def test_planted_auc_needs_the_logit_column(spark):
    df = synthetic.ctr_dataframe(spark, 10, vocab_sizes=VOCAB)
    with pytest.raises(TensorSparkValueError, match="planted_logit"):
        synthetic.planted_auc(df)


def test_labels_follow_the_planted_model():
    data = synthetic.ctr_arrays(20_000, seed=4, with_logit=True)
    p = 1 / (1 + np.exp(-data["planted_logit"]))
    # Calibrated: the mean label within each decile of p matches the mean p.
    edges = np.quantile(p, np.linspace(0, 1, 11))
    bucket = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, 9)
    for b in range(10):
        sel = bucket == b
        assert abs(data["label"][sel].mean() - p[sel].mean()) < 0.05
    assert synthetic.auc(data["label"], data["planted_logit"]) > 0.75


def test_parquet_round_trip(spark, tmp_path):
    path = str(tmp_path / "ctr.parquet")
    df = synthetic.ctr_dataframe(spark, 1500, vocab_sizes=VOCAB, seed=9, path=path)
    assert (tmp_path / "ctr.parquet" / "_SUCCESS").exists()
    np.testing.assert_array_equal(
        _collect(df)["C2"],
        _collect(synthetic.ctr_dataframe(spark, 1500, vocab_sizes=VOCAB, seed=9))["C2"],
    )


def _brute_auc(labels, scores) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_against_pairwise_reference(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    # Rounded scores: many ties, which count one half.
    scores = np.round(rng.standard_normal(300) + labels * 0.8, 1)
    assert synthetic.auc(labels, scores) == pytest.approx(_brute_auc(labels, scores), abs=1e-12)
    assert synthetic.auc([0, 1], [0.2, 0.9]) == 1.0
    assert synthetic.auc([0, 1], [0.9, 0.2]) == 0.0
    assert synthetic.auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_bad_arguments_raise_tensorspark_errors(spark):
    with pytest.raises(TensorSparkValueError, match="both"):
        synthetic.auc([1, 1], [0.1, 0.2])
    with pytest.raises(TensorSparkValueError, match="length"):
        synthetic.auc([1, 0], [0.1])
    with pytest.raises(TensorSparkError, match="vocabulary"):
        synthetic.ctr_arrays(10, vocab_sizes=[10, 0])
    with pytest.raises(TensorSparkError, match="rows"):
        synthetic.ctr_arrays(-1)
    with pytest.raises(TensorSparkError, match="partitions"):
        synthetic.ctr_dataframe(spark, 10, partitions=0)
