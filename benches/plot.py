#!/usr/bin/env python3
"""Plots the medians of a `berth-loadgen compare --json` file, one SVG per workload family,
the table of a `benches/guest-fio.sh` JSON file as guest-fio.svg, the table of a
`benches/guest-block.sh` JSON file as guest-block.svg, or the table of a
`benches/guest-dax.sh` JSON file as guest-dax.svg.

    python3 benches/plot.py benches/results/full.json docs/plots
    python3 benches/plot.py benches/results/guest-fio.json docs/plots
    python3 benches/plot.py benches/results/guest-block.json docs/plots
    python3 benches/plot.py benches/results/guest-dax.json docs/plots

Needs matplotlib (pip install matplotlib).
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("svg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"DAX": "#2ca02c", "no DAX": "#d62728", "berth": "#1f77b4", "virtiofsd": "#ff7f0e", "native": "#7f7f7f",
          "zero-copy": "#1f77b4", "user-copy": "#2ca02c", "copy": "#9467bd", "loop": "#7f7f7f"}
FAMILIES = {
    "read": "Reads (ops/s, log scale)",
    "write": "Writes (ops/s, log scale)",
    "metadata": "Metadata (ops/s, log scale; readdirplus: entries/s)",
}


def main():
    source, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    data = json.loads(source.read_text())
    if data.get("kind") == "guest-block":
        plot_guest_block(data, out_dir)
        return
    if "window_at_exit" in data:
        plot_guest_dax(data, out_dir)
        return
    if "table" in data:
        plot_guest_fio(data, out_dir)
        return
    summary = data["summary"]
    machine = data["machine"]
    for family, title in FAMILIES.items():
        rows = [r for r in summary if r["family"] == family]
        if not rows:
            continue
        workloads = sorted({r["workload"] for r in rows}, key=lambda w: [r["workload"] for r in rows].index(w))
        shapes = sorted({(r["queues"], r["depth"]) for r in rows if r["backend"] != "native"})
        labels, groups = [], []
        for workload in workloads:
            for queues, depth in shapes:
                labels.append(f"{workload}\nq{queues} qd{depth}")
                group = {}
                for r in rows:
                    if r["workload"] != workload or r["queues"] != queues:
                        continue
                    if r["backend"] == "native" or r["depth"] == depth:
                        group[r["backend"]] = r["ops_per_s"]
                groups.append(group)
        bar_chart(
            labels,
            groups,
            f"{title}\n{machine['cpu_model']} x{machine['cpus']}, kernel {machine['kernel']}, "
            f"median of {machine['reps']}; labels: berth/virtiofsd",
            out_dir / f"{family}.svg",
            width=max(8, 0.9 * len(labels)),
        )


def plot_guest_fio(data, out_dir):
    table = data["table"]
    bar_chart(
        [row["job"] for row in table],
        [{"berth": row["berth_iops"], "virtiofsd": row["virtiofsd_iops"]} for row in table],
        f"fio in a QEMU TCG guest (IOPS, log scale), median of {data['repetitions']} boots, "
        f"{data['runtime_s']} s per job; labels: berth/virtiofsd",
        out_dir / "guest-fio.svg",
        width=9,
        rotation=30,
    )


def plot_guest_dax(data, out_dir):
    """DAX against no DAX on one berth, one group of bars per job, the ratio over each."""
    table = data["table"]
    modes = [("DAX", "dax_iops"), ("no DAX", "nodax_iops")]
    bar = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(8, 5))
    for index, (mode, key) in enumerate(modes):
        xs = [i + (index - (len(modes) - 1) / 2) * bar for i in range(len(table))]
        ax.bar(xs, [row[key] for row in table], bar, label=mode, color=COLORS[mode])
    for i, row in enumerate(table):
        ax.annotate(f"{row['ratio']:.2f}x", (i, max(row["dax_iops"], row["nodax_iops"])),
                    ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(table)))
    ax.set_xticklabels([row["job"] for row in table], fontsize=7, rotation=30, ha="right")
    ax.set_title(f"fio in a QEMU TCG guest (IOPS, log scale), berth --dax-window 1G, "
                 f"dax=always vs dax=never alternating on one boot,\nmedian of "
                 f"{data['repetitions']}, {data['runtime_s']} s per job; labels: DAX/no DAX",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "guest-dax.svg", metadata={"Date": None})
    plt.close(fig)


def plot_guest_block(data, out_dir):
    """ublk transports against the loop device, one group of bars per job and queue count,
    with zero-copy/user-copy and zero-copy/loop over each group."""
    table = data["table"]
    backends = ["zero-copy", "user-copy", "copy", "loop"]
    labels = [f"{row['job']}\n{row['queues']} queue(s)" for row in table]
    bar = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(max(9, 0.9 * len(labels)), 5))
    for index, backend in enumerate(backends):
        xs = [i + (index - (len(backends) - 1) / 2) * bar for i in range(len(table))]
        ax.bar(xs, [row["backends"].get(backend, {}).get("iops", 0) for row in table], bar,
               label=backend, color=COLORS[backend])
    for i, row in enumerate(table):
        top = max(b.get("iops", 0) for b in row["backends"].values())
        ax.annotate(f"zc/uc {row['zc_over_uc']:.2f}x\nzc/loop {row['zc_over_loop']:.2f}x", (i, top),
                    ha="center", va="bottom", fontsize=6)
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7, rotation=90)
    ax.set_title(f"ublk in a QEMU TCG guest (IOPS, log scale), fio libaio O_DIRECT, "
                 f"{data['runtime_s']} s per job, one boot", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "guest-block.svg", metadata={"Date": None})
    plt.close(fig)


def bar_chart(labels, groups, title, path, width, rotation=90):
    """One group of bars per label (a dict backend -> value), log scale, with the
    berth/virtiofsd ratio over each group that has both."""
    backends = [b for b in ("berth", "virtiofsd", "native") if any(b in g for g in groups)]
    bar = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(width, 5))
    for index, backend in enumerate(backends):
        xs = [i + (index - (len(backends) - 1) / 2) * bar for i in range(len(labels))]
        ax.bar(xs, [g.get(backend, 0) for g in groups], bar, label=backend, color=COLORS[backend])
    for i, g in enumerate(groups):
        if g.get("berth") and g.get("virtiofsd"):
            top = max(g["berth"], g["virtiofsd"])
            ax.annotate(f"{g['berth'] / g['virtiofsd']:.2f}x", (i, top), ha="center", va="bottom",
                        fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7, rotation=rotation, ha="center" if rotation == 90 else "right")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)


if __name__ == "__main__":
    main()
