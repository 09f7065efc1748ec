"""Plot bench/results/sparse.json: samples/s and test AUC per system, memory scaling.

python bench/plot_sparse.py bench/results/sparse.json   # writes sparse.png beside it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen


def label(row: dict) -> str:
    if row["system"] == "tensorspark":
        return f"tensorspark\n{row.get('workers')}w {row.get('servers')}s"
    if row["system"] == "tf_ps":
        return f"TF PS\n{row.get('workers')}w {row.get('servers')}ps"
    return "Keras"


def main(path: str) -> None:
    report = json.loads(Path(path).read_text())
    rows = [r for r in report["systems"] if r.get("samples_per_sec")]
    failed = [r for r in report["systems"] if not r.get("samples_per_sec")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    names = [label(r) for r in rows]
    axes[0].bar(names, [r["samples_per_sec"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("training samples/s")
    axes[0].set_title("throughput")
    axes[1].bar(names, [r["test_auc"] for r in rows], color="tab:green")
    axes[1].axhline(report["planted_auc"], color="k", ls="--", label="planted model (ceiling)")
    lo = min([r["test_auc"] for r in rows] + [report["planted_auc"]]) - 0.05
    axes[1].set_ylim(max(0.5, lo), 1.0)
    axes[1].set_ylabel("test AUC")
    axes[1].set_title("test AUC")
    axes[1].legend(loc="lower right")
    scaling = [s for s in report.get("memory_scaling", []) if s.get("worker_peak_rss_bytes")]
    if scaling:
        axes[2].plot(
            [s["table_rows"] for s in scaling],
            [s["worker_peak_rss_bytes"] / 2**20 for s in scaling],
            "o-",
        )
        axes[2].set_xscale("log")
        axes[2].axhline(1024, color="r", ls="--", label="1 GB")
        axes[2].set_xlabel("table rows (dim 16)")
        axes[2].set_ylabel("worker peak RSS (MiB)")
        axes[2].legend()
    else:
        axes[2].text(0.5, 0.5, "memory scaling not measured", ha="center", va="center")
        axes[2].set_axis_off()
    axes[2].set_title("tensorspark worker memory")
    if failed:
        notes = "; ".join(
            f"{label(r).replace(chr(10), ' ')}: "
            f"{(r.get('skipped') or r.get('error') or 'no result')[:70]}"
            for r in failed
        )
        fig.text(0.01, 0.01, "not run: " + notes, fontsize=7)
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(
        f"sparse CTR benchmark: {report['config']['rows']:,} rows, "
        f"{report['machine']['cores']} cores"
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/sparse.json")
