"""Chart of bench/results/ps_roundtrip.json: PS vs raw-socket throughput per case.

python bench/plot_ps_roundtrip.py [results.json] [chart.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _size(floats: int) -> str:
    nbytes = floats * 4
    return f"{nbytes // 1024} KB" if nbytes < 1 << 20 else f"{floats / 1e6:g}M f32"


def plot(results: Path, out: Path) -> None:
    data = json.loads(results.read_text())
    cases = data["cases"]
    labels = [
        f"{_size(c['floats'])}\n{c['clients']} cl\n{c.get('transport', 'tcp')}" for c in cases
    ]
    xs = range(len(cases))
    width = 0.4
    fig, ax = plt.subplots(figsize=(max(8, len(cases) * 0.9), 4.5))
    ps = [c["ps_gbps"] for c in cases]
    raw = [c["raw_gbps"] for c in cases]
    ax.bar([x - width / 2 for x in xs], ps, width, label="tensorspark PS")
    ax.bar([x + width / 2 for x in xs], raw, width, label="raw socket")
    for x, c in zip(xs, cases, strict=True):
        ratio = c["ps_gbps"] / c["raw_gbps"]
        top = max(c["ps_gbps"], c["raw_gbps"])
        ax.text(x, top, f"{ratio:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("GB/s (push + pull payload)")
    machine = data.get("machine", {})
    ax.set_title(
        f"PS round trip vs raw socket, one run ({machine.get('cores', '?')} cores, "
        f"{data.get('timestamp', '')})",
        fontsize=10,
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/ps_roundtrip.json")
    dst = Path(sys.argv[2] if len(sys.argv) > 2 else src.with_suffix(".png"))
    plot(src, dst)
