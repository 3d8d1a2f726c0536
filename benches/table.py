#!/usr/bin/env python3
"""Prints the medians of a `berth-loadgen compare --json` file as the Markdown table of
docs/benchmarks.md, so the document is generated from the run rather than copied by hand.

    python3 benches/table.py benches/results/full.json
"""
import json
import sys

ORDER = [
    "read-4k-rand", "read-4k-seq", "read-1m-rand", "read-1m-seq",
    "write-4k-rand", "write-4k-seq", "write-1m-rand", "write-1m-seq",
    "lookup-getattr", "create-unlink", "readdirplus",
]


def main():
    data = json.load(open(sys.argv[1]))
    rows = {}
    for row in data["summary"]:
        key = (row["workload"], row["queues"], row["depth"] if row["backend"] != "native" else None)
        rows[(row["workload"], row["queues"], row["depth"], row["backend"])] = row
    print("| workload | q | QD | berth ops/s | virtiofsd ops/s | **ratio** | native ops/s | "
          "berth p50 / p99 µs | virtiofsd p50 / p99 µs | CPU µs/op berth / vfsd | "
          "peak RSS MiB berth / vfsd | fds berth / vfsd |")
    print("|---|---|---|---:|---:|---:|---:|---|---|---|---|---|")
    depths = sorted({r["depth"] for r in data["summary"] if r["backend"] != "native"})
    queues = sorted({r["queues"] for r in data["summary"]})
    for workload in ORDER:
        for q in queues:
            native = next((r for (w, qq, _, b), r in rows.items()
                           if w == workload and qq == q and b == "native"), None)
            for qd in depths:
                b = rows.get((workload, q, qd, "berth"))
                v = rows.get((workload, q, qd, "virtiofsd"))
                if b is None:
                    continue
                shape = f"{qd}" if v is None or v["served_queues"] == q else \
                    f"{qd} (vfsd 1q QD{v['served_depth']})"
                ratio = f"**{b['ops_per_s'] / v['ops_per_s']:.2f}×**" if v else "-"

                def both(field, fmt):
                    vs = fmt.format(v[field]) if v else "-"
                    return f"{fmt.format(b[field])} / {vs}"
                print(f"| {workload} | {q} | {shape} | {b['ops_per_s']:.0f} | "
                      f"{v['ops_per_s']:.0f} | {ratio} | "
                      f"{native['ops_per_s']:.0f} | "
                      f"{b['p50_us']:.1f} / {b['p99_us']:.0f} | "
                      + (f"{v['p50_us']:.1f} / {v['p99_us']:.0f}" if v else "-") + " | "
                      f"{both('cpu_us_per_op', '{:.1f}')} | {both('hwm_mib', '{:.1f}')} | "
                      f"{both('fds', '{:.0f}')} |")


if __name__ == "__main__":
    main()
