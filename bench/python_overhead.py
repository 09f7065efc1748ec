"""Python binding overhead on 10M floats, written into ps_roundtrip.json.

Times PSClient.push + pull_into of one 10M-float variable (TCP, fp32, one
client, server in the same process, as in the C++ benchmark) and compares
it with the C++ client doing the same (``ps_roundtrip --single``), then
adds ``"python_overhead"`` to the JSON:

python bench/python_overhead.py PS_ROUNDTRIP_BINARY [results.json]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tensorspark import ParameterServer, PSClient, generate_secret

FLOATS = 10_000_000


def python_seconds_per_iter(n: int) -> float:
    secret = generate_secret()
    zeros = np.zeros(n, dtype=np.float32)
    out = np.empty(n, dtype=np.float32)
    with (
        ParameterServer(secret, host="127.0.0.1") as server,
        PSClient("127.0.0.1", server.port, secret) as c,
    ):
        c.register({"single": zeros})

        def once() -> None:
            c.push({"single": zeros}, kind="delta")
            c.pull_into({"single": out})

        for _ in range(3):
            once()
        runs = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(3):
                once()
            runs.append((time.perf_counter() - t0) / 3)
    return statistics.median(runs)


def main() -> None:
    binary = sys.argv[1]
    path = Path(sys.argv[2] if len(sys.argv) > 2 else "bench/results/ps_roundtrip.json")
    # Alternate the two so drift on a busy machine hits both alike.
    cpp, py = [], []
    for _ in range(3):
        single = subprocess.run(
            [binary, "--single", str(FLOATS)], check=True, capture_output=True, text=True
        )
        cpp.append(json.loads(single.stdout)["seconds_per_iter"])
        py.append(python_seconds_per_iter(FLOATS))
    cpp_s, py_s = statistics.median(cpp), statistics.median(py)
    result = {
        "floats": FLOATS,
        "what": "push(delta) + pull_into, 1 client, TCP, fp32, in-process server",
        "cpp_seconds_per_iter": round(cpp_s, 6),
        "python_seconds_per_iter": round(py_s, 6),
        "overhead": round(py_s / cpp_s - 1.0, 4),
    }
    data = json.loads(path.read_text())
    data["python_overhead"] = result
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"python_overhead: {result}")


if __name__ == "__main__":
    main()
