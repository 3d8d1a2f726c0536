#!/usr/bin/env python3
"""Plots the medians of a `berth-loadgen compare --json` file, one SVG per workload family,
the table of a `benches/guest-fio.sh` JSON file as guest-fio.svg, the table of a
`benches/guest-block.sh` JSON file as guest-block.svg, the table of a
`benches/guest-dax.sh` JSON file as guest-dax.svg, the medians of a `benches/blk-compare.sh`
JSON file as blk.svg (blk-volume.svg when it has a volume), the runs of a
`benches/volume-flush.sh` JSON file as volume-flush.svg, or a `benches/fuse-compare.sh` JSON
file as fuse-compare.svg.

    python3 benches/plot.py benches/results/full.json docs/plots
    python3 benches/plot.py benches/results/guest-fio.json docs/plots
    python3 benches/plot.py benches/results/guest-block.json docs/plots
    python3 benches/plot.py benches/results/guest-dax.json docs/plots
    python3 benches/plot.py benches/results/blk-volume.json docs/plots
    python3 benches/plot.py benches/results/volume-flush.json docs/plots
    python3 benches/plot.py benches/results/fuse-compare.json docs/plots

Needs matplotlib (pip install matplotlib).
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("svg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"DAX": "#2ca02c", "no DAX": "#d62728", "berth": "#1f77b4", "virtiofsd": "#ff7f0e", "native": "#7f7f7f",
          "zero-copy": "#1f77b4", "user-copy": "#2ca02c", "copy": "#9467bd", "loop": "#7f7f7f",
          "qsd": "#ff7f0e", "volume": "#2ca02c", "volume-1": "#98df8a", "volume-2": "#2ca02c", "volume-4": "#2ca02c", "put-1": "#7f7f7f", "put-2": "#bcbd22", "put-4": "#9467bd",
          "hp": "#ff7f0e", "hp-pass": "#ffbb78", "hp-uring": "#d62728", "hp-both": "#ff9896",
          "classic": "#1f77b4", "passthrough": "#2ca02c", "uring": "#9467bd", "both": "#17becf"}
FAMILIES = {
    "read": "Reads (ops/s, log scale)",
    "write": "Writes (ops/s, log scale)",
    "metadata": "Metadata (ops/s, log scale; readdirplus: entries/s)",
}


def main():
    source, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    data = json.loads(source.read_text())
    if data.get("kind") == "fuse-compare":
        plot_fuse_compare(data, out_dir)
        return
    if data.get("kind") == "guest-block":
        plot_guest_block(data, out_dir)
        return
    if "window_at_exit" in data:
        plot_guest_dax(data, out_dir)
        return
    if "table" in data:
        plot_guest_fio(data, out_dir)
        return
    if "fractions" in data:
        plot_volume_flush(data, out_dir)
        return
    if "segment_bytes" in data["machine"]:
        plot_blk(data, out_dir)
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
    """berth with DAX against berth without DAX (and virtiofsd, when the file has it), one group
    of bars per job, the ratios over each."""
    table = data["table"]
    key = {"berth DAX": "dax_iops", "berth no DAX": "nodax_iops"}
    colors = {"berth DAX": COLORS["DAX"], "berth no DAX": COLORS["no DAX"], "virtiofsd": COLORS["virtiofsd"]}
    with_virtiofsd = all("virtiofsd_iops" in row for row in table)
    if with_virtiofsd:
        key["virtiofsd"] = "virtiofsd_iops"
    fig, ax = plt.subplots(figsize=(9 if with_virtiofsd else 8, 5))
    draw_bar_groups(ax, list(key), len(table), lambda i, mode: table[i][key[mode]],
                    color=lambda mode: colors[mode])
    for i, row in enumerate(table):
        note = f"{row['ratio']:.2f}x"
        if with_virtiofsd:
            note = f"D/nD {note}\nD/v {row['dax_over_virtiofsd']:.2f}x"
        ax.annotate(note, (i, max(row[k] for k in key.values())), ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(top=ax.get_ylim()[1] * 3)
    ax.set_xticks(range(len(table)))
    ax.set_xticklabels([row["job"] for row in table], fontsize=7, rotation=30, ha="right")
    if with_virtiofsd:
        title = (f"fio in a QEMU TCG guest (IOPS, log scale), berth --dax-window 1G dax=always and "
                 f"dax=never, virtiofsd {data.get('virtiofsd', '')} (no window),\nalternating on one boot, "
                 f"median of {data['repetitions']}, {data['runtime_s']} s per job; "
                 f"labels: DAX/no DAX (D/nD), DAX/virtiofsd (D/v)")
    else:
        title = (f"fio in a QEMU TCG guest (IOPS, log scale), berth --dax-window 1G, "
                 f"dax=always vs dax=never alternating on one boot,\nmedian of "
                 f"{data['repetitions']}, {data['runtime_s']} s per job; labels: DAX/no DAX")
    save_chart(fig, ax, title, out_dir / "guest-dax.svg")


def plot_guest_block(data, out_dir):
    """ublk transports against the loop device, one group of bars per job and queue count,
    with zero-copy/user-copy and zero-copy/loop over each group."""
    table = data["table"]
    backends = ["zero-copy", "user-copy", "copy", "loop"]
    labels = [f"{row['job']}\n{row['queues']} queue(s)" for row in table]
    fig, ax = plt.subplots(figsize=(max(9, 0.9 * len(labels)), 5))
    draw_bar_groups(ax, backends, len(table),
                    lambda i, backend: table[i]["backends"].get(backend, {}).get("iops", 0))
    for i, row in enumerate(table):
        top = max(b.get("iops", 0) for b in row["backends"].values())
        ax.annotate(f"zc/uc {row['zc_over_uc']:.2f}x\nzc/loop {row['zc_over_loop']:.2f}x", (i, top),
                    ha="center", va="bottom", fontsize=6)
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7, rotation=90)
    title = (f"ublk in a QEMU TCG guest (IOPS, log scale), fio libaio O_DIRECT, "
             f"{data['runtime_s']} s per job, one boot")
    save_chart(fig, ax, title, out_dir / "guest-block.svg")


def plot_blk(data, out_dir):
    """vhost-user-blk backends, one group of bars per workload and shape, with berth/qsd and
    volume/berth over each group."""
    summary = data["summary"]
    machine = data["machine"]
    backends = [b for b in ("berth", "qsd", "volume") if any(r["backend"] == b for r in summary)]
    keys = []
    for r in summary:
        key = (r["workload"], r["queues"], r["depth"])
        if key not in keys:
            keys.append(key)
    order = [r["workload"] for r in data["runs"]]  # the order the runs were made in
    keys.sort(key=lambda k: (order.index(k[0]), k[1], k[2]))
    value = {(r["workload"], r["queues"], r["depth"], r["backend"]): r["ops_per_s"] for r in summary}
    fig, ax = plt.subplots(figsize=(max(9, 0.9 * len(keys)), 5))
    draw_bar_groups(ax, backends, len(keys), lambda i, backend: value.get(keys[i] + (backend,), 0))
    for i, k in enumerate(keys):
        got = {b: value.get(k + (b,)) for b in backends}
        notes = []
        if got.get("berth") and got.get("qsd"):
            notes.append(f"b/q {got['berth'] / got['qsd']:.2f}x")
        if got.get("volume") and got.get("berth"):
            notes.append(f"v/b {got['volume'] / got['berth']:.2f}x")
        top = max(v for v in got.values() if v)
        ax.annotate("\n".join(notes), (i, top), ha="center", va="bottom", fontsize=6)
    ax.set_yscale("log")
    ax.set_ylim(top=ax.get_ylim()[1] * 3)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{w}\n{q}q qd{d}" for w, q, d in keys], fontsize=7, rotation=90)
    title = (f"vhost-user-blk on the host (IOPS, log scale), {machine['cpu_model']} x{machine['cpus']}, "
             f"median of {machine['reps']}, {machine['seconds_per_run']} s per run;\n"
             f"labels: berth/qsd (b/q), volume/berth on the raw file (v/b)")
    save_chart(fig, ax, title, out_dir / ("blk-volume.svg" if "volume" in backends else "blk.svg"))


def plot_volume_flush(data, out_dir):
    """MiB/s of the volume's flush and of the raw PUTs, one group of bars per repetition."""
    runs = data["runs"]
    methods = []
    for r in runs:
        if r["method"] not in methods:
            methods.append(r["method"])
    reps = sorted({r["rep"] for r in runs})
    value = {(r["rep"], r["method"]): r["mib_per_s"] for r in runs}
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(reps)), 4.5))
    draw_bar_groups(ax, methods, len(reps), lambda i, method: value.get((reps[i], method), 0),
                    color=lambda method: COLORS.get(method, "#17becf"))
    for i, fraction in enumerate(data["fractions"]):
        top = max(value.get((reps[i], m), 0) for m in methods) if i < len(reps) else 0
        ax.annotate(f"{fraction:.2f}", (i, top), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(reps)))
    ax.set_xticklabels([f"rep {rep + 1}" for rep in reps], fontsize=8)
    ax.set_ylabel("MiB/s")
    title = (f"Volume flush vs raw PUT to {data['server'].split(' (')[0]}, {data['mib']} MiB, "
             f"{data['pack_bytes'] >> 20} MiB packs;\nlabels: volume"
             f"{'-' + str(data['upload_streams']) if 'upload_streams' in data else ''} / best raw PUT "
             f"(median {data['fraction_median']:.2f})")
    save_chart(fig, ax, title, out_dir / "volume-flush.svg")


def plot_fuse_compare(data, out_dir):
    """Every FUSE peer's ratio to native, one group of bars per workload, with the lowest and
    highest repetition's ratio as the error bar."""
    summary, meta = data["summary"], data["meta"]
    workloads = list(dict.fromkeys(r["workload"] for r in summary))
    peers = list(dict.fromkeys(r["target"] for r in summary if r["target"] != "native"))
    ratio = {(r["workload"], r["target"]): r["to_native"] for r in summary if r["to_native"]}
    bar = 0.8 / len(peers)
    fig, ax = plt.subplots(figsize=(max(9, 1.1 * len(workloads)), 5))
    for index, peer in enumerate(peers):
        xs, ys, low, high = [], [], [], []
        for i, w in enumerate(workloads):
            r = ratio.get((w, peer))
            if r is None:
                continue
            xs.append(i + (index - (len(peers) - 1) / 2) * bar)
            ys.append(r["median"])
            low.append(r["median"] - r["min"])
            high.append(r["max"] - r["median"])
        ax.bar(xs, ys, bar, yerr=[low, high], label=peer, color=COLORS.get(peer), capsize=1.5,
               error_kw={"elinewidth": 0.6})
    ax.axhline(1.0, color=COLORS["native"], linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels(workloads, fontsize=7, rotation=30, ha="right")
    title = (f"berth fuse and passthrough_hp (libfuse {meta['libfuse']}) against native tmpfs "
             f"(ratio, log scale), Linux {meta['kernel']},\nmedian of {meta['reps']} "
             f"alternating repetitions of {meta['runtime']} s, bars: lowest-highest repetition")
    save_chart(fig, ax, title, out_dir / "fuse-compare.svg", legend_columns=4)


def bar_chart(labels, groups, title, path, width, rotation=90):
    """One group of bars per label (a dict backend -> value), log scale, with the
    berth/virtiofsd ratio over each group that has both."""
    backends = [b for b in ("berth", "virtiofsd", "native") if any(b in g for g in groups)]
    fig, ax = plt.subplots(figsize=(width, 5))
    draw_bar_groups(ax, backends, len(labels), lambda i, backend: groups[i].get(backend, 0))
    for i, g in enumerate(groups):
        if g.get("berth") and g.get("virtiofsd"):
            top = max(g["berth"], g["virtiofsd"])
            ax.annotate(f"{g['berth'] / g['virtiofsd']:.2f}x", (i, top), ha="center", va="bottom",
                        fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7, rotation=rotation, ha="center" if rotation == 90 else "right")
    save_chart(fig, ax, title, path)


def save_chart(fig, ax, title, path, legend_columns=1):
    """Titles the chart, adds its legend and writes it to `path` as an SVG without a date, so
    that the same data makes the same file."""
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncol=legend_columns)
    fig.tight_layout()
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)


def draw_bar_groups(ax, series, group_count, height, color=lambda name: COLORS[name]):
    """group_count groups of bars, one bar of each series side by side in every group, centred
    on the group's index; height(i, name) is the height of that series' bar in group i."""
    bar = 0.8 / len(series)
    for index, name in enumerate(series):
        xs = [i + (index - (len(series) - 1) / 2) * bar for i in range(group_count)]
        ax.bar(xs, [height(i, name) for i in range(group_count)], bar, label=name, color=color(name))


if __name__ == "__main__":
    main()
