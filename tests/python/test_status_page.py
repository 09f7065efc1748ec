"""The live status page: real servers, real sockets, a real headless Chromium."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from tensorspark import TensorSparkValueError

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
OUTPUT = os.path.join(os.path.dirname(__file__), "..", "..", "build", "test-output")


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.parametrize("port", [-1, 65536, "8080", 1.5, True])
def test_ui_port_is_validated_by_both_apis(sc, port):
    import tensorspark
    from tensorspark.keras import fit

    with pytest.raises(TensorSparkValueError, match=r"ui_port must be None .* got"):
        fit(None, None, ui_port=port)  # refused before the model or data are looked at
    with pytest.raises(TensorSparkValueError, match=r"ui_port must be None .* got"):
        tensorspark.SparkSession(sc, None, ui_port=port)


def test_a_taken_ui_port_is_a_clear_error_and_releases_the_run(sc, caplog):
    import tensorspark

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with (
            caplog.at_level(logging.INFO, logger="tensorspark"),
            pytest.raises(TensorSparkValueError, match=rf"ui_port={port}: cannot serve"),
        ):
            tensorspark.SparkSession(sc, None, ui_port=port, progress=False)
    # The in-driver server had started; it was stopped with the failed start.
    m = re.search(r"parameter server at 127.0.0.1:(\d+)", caplog.text)
    assert m, caplog.text
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=2).close()


def test_tf1_session_serves_the_page_until_closed(sc):
    import tensorspark
    from tensorspark.runtime.status_page import page_token

    session = tensorspark.SparkSession(sc, None, name="status", ui_port=0, progress=False)
    try:
        url = session.status_url
        assert url.endswith(f"/{page_token(session.secret)}/"), url
        status, body = _get(url)
        assert status == 200 and b"<title>tensorspark status</title>" in body
        state = json.loads(_get(url + "stats.json")[1])
        assert state["run"]["name"] == "/status" and state["run"]["sync_interval"] == 100
    finally:
        session.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


def test_page_serves_the_servers_stats_behind_the_token_and_closes():
    import tensorspark
    from tensorspark.ps import ParameterServer, PSClient, generate_secret
    from tensorspark.runtime.status_page import StatusPage, page_token

    secret = generate_secret()
    with ParameterServer(secret, host="127.0.0.1") as ps:

        def connect(**kw):
            return PSClient("127.0.0.1", ps.port, secret, **kw)

        page = StatusPage(
            connect, secret, bind="127.0.0.1", port=0, url_host="127.0.0.1",
            run={"name": "t", "sync_interval": 3}, interval=0.05,
        )  # fmt: skip
        token = page_token(secret)
        assert page.url == f"http://127.0.0.1:{page.port}/{token}/"
        assert secret.hex() not in page.url
        driver = connect()
        driver.register({"w": np.zeros(4, np.float32)})
        workers = [connect(partition_id=p) for p in (0, 1)]
        for w in workers:
            w.join()
            w.pull(["w"])
        for p, w in enumerate(workers):
            w.push({"w": np.ones(4, np.float32)}, kind="delta")
            w.report_progress(10 * (p + 1), 320 * (p + 1), 0.5 / (p + 1))
            w.heartbeat()
        stats = driver.stats()  # quiet from here on: the page's next poll must agree
        deadline = time.monotonic() + 10
        while True:
            status, body = _get(page.url + "stats.json")
            state = json.loads(body)
            if state["stats"].get("pushes") == stats["pushes"] and len(state["workers"]) == 2:
                break
            assert time.monotonic() < deadline, state
            time.sleep(0.05)
        assert status == 200
        # The page's counters are STATS itself (only the clocks and traffic move).
        moving = re.compile(r"_ms\{|^bytes_|^connections")
        assert set(state["stats"]) == set(stats)
        assert {k: v for k, v in state["stats"].items() if not moving.search(k)} == {
            k: v for k, v in stats.items() if not moving.search(k)
        }
        by_id = {w["id"]: w for w in state["workers"]}
        assert by_id["1-0"]["steps"] == stats['worker_steps{partition="1",attempt="0"}'] == 20
        assert by_id["1-0"]["loss"] == 0.25
        assert by_id["1-0"]["staleness"] == stats['worker_staleness{partition="1",attempt="0"}']
        assert by_id["1-0"]["staleness"] == 1  # worker 0 pushed after its pull
        assert state["run"]["mode"] == "async" and state["run"]["sync_interval"] == 3
        assert state["server"]["refused"]["fenced"] == 0
        assert state["loss_history"]["0-0"][-1][1] == 0.5

        # Server-sent events: the history first, then snapshots.
        with urllib.request.urlopen(page.url + "events", timeout=5) as events:
            lines = [events.readline() for _ in range(4)]
            assert lines[1] == b"event: history\n" and lines[2].startswith(b"data: {")
            assert events.readline().startswith(b"data: {")

        # A wrong, partial or missing token: 403 and an empty body, on every path.
        for path in ("", "stats.json", "events"):
            for bad in ("0" * 64, token[:-1], token + "0", ""):
                assert _get(f"http://127.0.0.1:{page.port}/{bad}/{path}") == (403, b"")
        assert _get(f"http://127.0.0.1:{page.port}/")[0] == 403

        # A straggler: partition 1 barely moves while partition 0 runs on.
        for steps in (100, 200, 300):
            workers[0].report_progress(steps, 32 * steps, 0.4)
            workers[1].report_progress(21, 672, 0.25)
            for w in workers:
                w.heartbeat()
            seq = _state(page)["seq"]
            _wait(page, lambda st, seq=seq: st["seq"] > seq + 1)
        by_id = {w["id"]: w for w in _state(page)["workers"]}
        assert by_id["1-0"]["straggler"] and not by_id["0-0"]["straggler"], by_id
        assert by_id["0-0"]["steps_per_sec"] > 10 * by_id["1-0"]["steps_per_sec"] > 0

        # A retry fences attempt 0 of partition 1; partition 0's connection dies.
        retry = connect(partition_id=1, attempt=1)
        retry.join()
        with pytest.raises(tensorspark.FencedError):
            workers[1].push({"w": np.ones(4, np.float32)}, kind="delta")
        workers[0].close()
        state = _wait(page, lambda st: len(st["workers"]) == 3 and st["stats"]["members"] == 1)
        states = {w["id"]: w["state"] for w in state["workers"]}
        assert states == {"0-0": "lost", "1-0": "fenced", "1-1": "live"}, state["workers"]
        assert state["stats"]["workers_fenced"] == 1
        assert state["server"]["refused"]["fenced"] == 1

        page.close()
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(page.url, timeout=2)
        for w in [*workers, retry, driver]:
            w.close()


def _state(page) -> dict:
    return json.loads(_get(page.url + "stats.json")[1])


def _wait(page, ready, timeout: float = 10.0) -> dict:
    """The page's state once ``ready(state)``; fails naming the last state."""
    deadline = time.monotonic() + timeout
    while not ready(state := _state(page)):
        assert time.monotonic() < deadline, f"the page never got there: {state}"
        time.sleep(0.05)
    return state


def _rows(spark, n: int):
    """A two-class problem generated in the JVM (no driver-side rows)."""
    from pyspark.sql import functions as F

    feats = [F.rand(seed=i).cast("float") for i in range(8)]
    return (
        spark.range(n, numPartitions=2)
        .select(F.array(*feats).alias("features"))
        .withColumn("label", (F.col("features")[0] > F.col("features")[1]).cast("long"))
    )


def _model():
    """Wide enough that a step costs milliseconds: the run lasts seconds on any machine."""
    import keras

    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(1024, activation="relu"),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


class _UrlCatcher(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.url: str | None = None
        self.found = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        m = re.search(r"status page at (\S+)", record.getMessage())
        if m:
            self.url = m.group(1)
            self.found.set()


def _watch(catcher: _UrlCatcher, shot: str, seen: dict) -> None:
    """Opens the page in headless Chromium; records each live worker's steps twice."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    assert catcher.found.wait(120), "no status page URL was logged within 120 s"
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,1150"):
        opts.add_argument(arg)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        browser.get(catcher.url)

        def steps(_=None):
            rows = browser.execute_script(
                "return Array.from(document.querySelectorAll('tr.worker[data-state=live]'))"
                ".map(r => [r.dataset.partition, r.dataset.steps])"
            )
            return {p: int(n) for p, n in rows if n}

        wait = WebDriverWait(browser, 300, 0.2)  # the tasks start TensorFlow first
        first = wait.until(lambda _: (s := steps()) and len(s) == 2 and s)
        seen["first"] = first
        seen["later"] = WebDriverWait(browser, 30, 0.2).until(
            lambda _: (s := steps()) and all(s.get(k, 0) > v for k, v in first.items()) and s
        )
        # Read while the workers are still live: the run may end within the
        # few seconds the chart gets below.
        seen["text"] = browser.find_element("id", "workers").text
        # A few loss points on the chart for the screenshot (at most 3 s more).
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and min(_points(browser), default=0) < 4:
            time.sleep(0.2)
        browser.save_screenshot(shot)
    finally:
        browser.quit()


def _points(browser) -> list[int]:
    """Points on each worker's loss curve."""
    # Read in one script: the chart is redrawn with every update.
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('#loss polyline'))"
        ".map(p => p.points.numberOfItems)"
    )


@pytest.mark.slow
def test_chromium_follows_a_keras_fit_live(spark, tmp_path):
    from tensorspark.keras import fit

    catcher = _UrlCatcher()
    logger = logging.getLogger("tensorspark")
    level = logger.level
    logger.addHandler(catcher)
    logger.setLevel(logging.INFO)
    shot, seen, errors = str(tmp_path / "status_page.png"), {}, []

    def watch():
        try:
            _watch(catcher, shot, seen)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        fit(_model(), _rows(spark, 25_600), batch_size=32, sync_interval=20, ui_port=0,
            progress=False, name="status-page-test")  # fmt: skip
    finally:
        logger.removeHandler(catcher)
        logger.setLevel(level)
    watcher.join(60)
    if errors:
        raise errors[0]
    assert not watcher.is_alive()
    assert sorted(seen["first"]) == ["0", "1"], seen  # by partition
    assert all(seen["later"][k] > v for k, v in seen["first"].items()), seen
    assert "live" in seen["text"]
    with open(shot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    os.makedirs(OUTPUT, exist_ok=True)
    shutil.copy(shot, os.path.join(OUTPUT, "status_page.png"))
    # The page is gone with the run, and the job description named it.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(catcher.url, timeout=2)
    jobs = spark.sparkContext._jsc.sc().statusStore().jobsList(None)
    described = [jobs.apply(i).description() for i in range(jobs.size())]
    assert any(d.isDefined() and catcher.url in d.get() for d in described)
