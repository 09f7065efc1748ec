"""Chart of bench/results/ps_roundtrip.json: PS vs raw-socket throughput per case.

One panel per tensor size; each bar pair is one case (clients, transport,
wire encoding) against raw two-exchange sockets, labelled with the median
paired ps/raw ratio and its IQR. Figures are GB/s of logical float32 payload (push + pull), so fp16 cases show their speed-up.

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


def _label(c: dict) -> str:
    return f"{c['clients']} cl\n{c.get('transport', 'tcp')}\n{c.get('encoding', 'fp32')}"


def plot(results: Path, out: Path) -> None:
    data = json.loads(results.read_text())
    cases = data["cases"]
    sizes = sorted({c["floats"] for c in cases})
    width_cases = max(len([c for c in cases if c["floats"] == s]) for s in sizes)
    fig, axes = plt.subplots(
        len(sizes), 1, figsize=(max(8, width_cases * 0.8), 3.2 * len(sizes)), squeeze=False
    )
    width = 0.4
    for ax, size in zip(axes[:, 0], sizes, strict=True):
        group = [c for c in cases if c["floats"] == size]
        xs = range(len(group))
        ps = [c["ps_gbps"] for c in group]
        # Headline baseline: raw two-exchange (older results: one-exchange).
        raw = [c.get("raw2_gbps", c["raw_gbps"]) for c in group]
        ax.bar([x - width / 2 for x in xs], ps, width, label="tensorspark PS")
        ax.bar([x + width / 2 for x in xs], raw, width, label="raw socket, two exchanges")
        for x, c, r in zip(xs, group, raw, strict=True):
            ratio = c["ratio"] if "ratio_iqr" in c else (c["ps_gbps"] / r if r else 0.0)
            label = f"{ratio:.2f}x"
            if "ratio_iqr" in c:
                label += "\n[{:.2f}-{:.2f}]".format(*c["ratio_iqr"])
            ax.text(x, max(c["ps_gbps"], r), label, ha="center", va="bottom", fontsize=6)
        ax.set_xticks(list(xs), [_label(c) for c in group], fontsize=7)
        ax.set_ylabel("GB/s (f32 payload)", fontsize=8)
        title = _size(size)
        lat = [c for c in group if "ps_pull_p50_us" in c]
        if lat:
            title += "   pull p50 / raw ping-pong p50: " + ", ".join(
                f"{c['transport']}/{c['encoding']} {c['ps_pull_p50_us']:.0f}/"
                f"{c['raw_pingpong_p50_us']:.0f} us"
                for c in lat
            )
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    machine = data.get("machine", {})
    fig.suptitle(
        f"PS push+pull vs raw socket, one run ({machine.get('cores', '?')} cores, "
        f"{data.get('timestamp', '')})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/ps_roundtrip.json")
    dst = Path(sys.argv[2] if len(sys.argv) > 2 else src.with_suffix(".png"))
    plot(src, dst)
