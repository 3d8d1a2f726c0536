#!/usr/bin/env python3
"""The tables of benches/fuse-compare.sh: medians per workload and peer with their spread,
each peer's ratio to native, and issue 17's goals against their ratios.

    ... | python3 benches/fuse-table.py META_JSON [OUT_JSON]

Reads one JSON object per line ({"workload", "rep", "target", "value"}) from stdin. Ratios
are taken within each repetition (the peers of one repetition ran back to back) and their
median is reported with the lowest and highest repetition in brackets. Writes the runs, the
summary and the goals to OUT_JSON when given (benches/plot.py draws it).
"""
import json
import statistics
import sys

FIO = ("randread-4k-1", "randread-4k-2", "randwrite-4k-1", "randwrite-4k-2", "read-1m-1", "write-1m-1")
NAMES = {
    "randread-4k-1": "4 KiB random read, 1 job",
    "randread-4k-2": "4 KiB random read, 2 jobs",
    "randwrite-4k-1": "4 KiB random write, 1 job",
    "randwrite-4k-2": "4 KiB random write, 2 jobs",
    "read-1m-1": "1 MiB sequential read, 1 job",
    "write-1m-1": "1 MiB sequential write, 1 job",
    "stat-1": "stat storm, 1 worker",
    "stat-2": "stat storm, 2 workers",
    "create-1": "create/unlink storm, 1 worker",
    "create-2": "create/unlink storm, 2 workers",
}
# Each berth mode's passthrough_hp peer in the same mode class, and its counterpart without
# io_uring (for the metadata goal).
HP_PEER = {"classic": "hp", "passthrough": "hp-pass", "uring": "hp-uring", "both": "hp-both"}
URING_OF = {"uring": "classic", "both": "passthrough"}
GOAL_PASSTHROUGH, GOAL_URING, GOAL_HP = 0.8, 1.3, 1.2


def unit(workload, value):
    if workload.endswith("-1m-1"):
        return "%.2f GB/s" % (value / 1e9)
    return "%.1f k/s" % (value / 1e3)


def main():
    meta = json.loads(sys.argv[1])
    out = sys.argv[2] if len(sys.argv) > 2 else ""
    runs = [json.loads(line) for line in sys.stdin if line.strip()]
    workloads = list(dict.fromkeys(r["workload"] for r in runs))
    targets = list(dict.fromkeys(r["target"] for r in runs))
    value = {(r["workload"], r["target"], r["rep"]): r["value"] for r in runs}
    reps = sorted({r["rep"] for r in runs})

    def ratio(workload, target, base):
        """Median, min and max over repetitions of target / base, or None."""
        rs = [value[(workload, target, rep)] / value[(workload, base, rep)]
              for rep in reps
              if (workload, target, rep) in value and value.get((workload, base, rep))]
        if not rs:
            return None
        return {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}

    def fmt(r):
        if r is None:
            return "n/a"
        return "%.2fx (%.2f-%.2f)" % (r["median"], r["min"], r["max"])

    print(f"\nberth {meta['berth']}, Linux {meta['kernel']}, libfuse {meta['libfuse']} passthrough_hp "
          f"{meta['hp_options']}; {meta['runtime']} s per run, {meta['size_mib']} MiB file, "
          f"{meta['files']} files per storm worker; medians of {len(reps)} (lowest-highest)")
    summary = []
    print("\n%-32s" % "workload" + "".join("%24s" % t for t in targets))
    for w in workloads:
        cells = []
        for t in targets:
            vs = [value[(w, t, rep)] for rep in reps if (w, t, rep) in value]
            if not vs:
                cells.append("%24s" % "-")
                continue
            m = statistics.median(vs)
            cells.append("%24s" % ("%s (%s-%s)" % (unit(w, m), unit(w, min(vs)).split()[0], unit(w, max(vs)).split()[0])))
            summary.append({"workload": w, "target": t, "median": m, "min": min(vs), "max": max(vs),
                            "to_native": ratio(w, t, "native") if t != "native" else None})
        print("%-32s" % NAMES.get(w, w) + "".join(cells))

    if "native" in targets:
        print("\nratio to native, per repetition: median (lowest-highest)")
        others = [t for t in targets if t != "native"]
        print("%-32s" % "workload" + "".join("%22s" % t for t in others))
        for w in workloads:
            print("%-32s" % NAMES.get(w, w) + "".join("%22s" % fmt(ratio(w, t, "native")) for t in others))

    goals = []

    def goal(name, w, target, base, want):
        r = ratio(w, target, base) if target in targets and base in targets else None
        met = None if r is None else r["median"] >= want
        goals.append({"goal": name, "workload": w, "target": target, "base": base, "want": want,
                      "ratio": r, "met": met})

    for w in workloads:
        if w in FIO:
            for t in ("passthrough", "both"):
                goal("passthrough data I/O >= 0.8x native", w, t, "native", GOAL_PASSTHROUGH)
        else:
            for t, base in URING_OF.items():
                goal("io_uring metadata >= 1.3x classic", w, t, base, GOAL_URING)
    for w in workloads:
        for t, peer in HP_PEER.items():
            goal("berth >= 1.2x passthrough_hp, same class", w, t, peer, GOAL_HP)

    print("\nissue 17's goals (ratios are medians of per-repetition ratios; never a failure)")
    missing = []
    for g in goals:
        if g["target"] not in targets:
            continue
        if g["base"] not in targets:
            if (g["target"], g["base"]) not in missing:
                missing.append((g["target"], g["base"]))
            continue
        verdict = "met" if g["met"] else "NOT met"
        print("  %-42s %-32s %12s / %-12s %-22s %s" % (g["goal"], NAMES.get(g["workload"], g["workload"]),
                                                     g["target"], g["base"], fmt(g["ratio"]), verdict))
    for target, base in missing:
        print(f"  berth >= 1.2x passthrough_hp, same class: {target} / {base}: no {base} peer in this run "
              f"(libfuse {meta['libfuse']}'s passthrough_hp has no such mode, or it was not selected)")
    if "hp" in targets:
        print("\nfor scale, every berth mode against passthrough_hp's classic mode (not a goal across classes)")
        for w in workloads:
            print("  %-32s" % NAMES.get(w, w) + "".join(
                "%12s %-20s" % (t, fmt(ratio(w, t, "hp"))) for t in HP_PEER if t in targets))

    if out:
        with open(out, "w") as f:
            json.dump({"kind": "fuse-compare", "meta": meta, "runs": runs, "summary": summary,
                       "goals": goals}, f, indent=1)
        print(f"\nraw results: {out}")


if __name__ == "__main__":
    main()
