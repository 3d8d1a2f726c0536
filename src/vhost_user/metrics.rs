//! `--metrics-file` of the virtio-fs daemon: FUSE requests by opcode and, with a DAX window,
//! the window's use and the VMM's map and unmap round trips, in the Prometheus text format.

use std::fmt::Write as _;

use berth_passthrough::FsServer;

use super::dax::VhostDax;

/// The daemon's metrics now.
pub(super) fn render(server: &FsServer, dax: Option<&VhostDax>) -> String {
    let mut out = String::new();
    let name = "berth_fs_requests_total";
    let _ = writeln!(
        out,
        "# HELP {name} FUSE requests served, by opcode.\n# TYPE {name} counter"
    );
    for (opcode, count) in server.requests_by_opcode() {
        let _ = writeln!(out, "{name}{{opcode=\"{opcode}\"}} {count}");
    }
    if let Some(dax) = dax {
        render_window(&mut out, dax);
    }
    out
}

fn render_window(out: &mut String, dax: &VhostDax) {
    let m = dax.metrics();
    let values: [(&str, &str, &str, u64); 10] = [
        (
            "berth_dax_window_bytes",
            "gauge",
            "Size of the DAX window.",
            dax.size(),
        ),
        (
            "berth_dax_mapped_bytes",
            "gauge",
            "Bytes of the window mapped now.",
            m.mapped_bytes,
        ),
        (
            "berth_dax_live_ranges",
            "gauge",
            "Mappings live in the VMM now.",
            m.live_ranges,
        ),
        (
            "berth_dax_maps_total",
            "counter",
            "SHMEM_MAP requests the VMM carried out.",
            m.maps,
        ),
        (
            "berth_dax_unmaps_total",
            "counter",
            "SHMEM_UNMAP requests the VMM carried out.",
            m.unmaps,
        ),
        (
            "berth_dax_refused_total",
            "counter",
            "SETUPMAPPING and REMOVEMAPPING requests refused before reaching the VMM.",
            m.refused,
        ),
        (
            "berth_dax_vmm_errors_total",
            "counter",
            "Map and unmap requests the VMM failed or that could not reach it.",
            m.frontend_errors,
        ),
        (
            "berth_dax_placeholder_bytes",
            "gauge",
            "Bytes of live ranges shown from the placeholder (past their file's end) now.",
            m.placeholder_bytes,
        ),
        (
            "berth_dax_repoints_total",
            "counter",
            "Ranges re-pointed at the placeholder because their file shrank.",
            m.repoints,
        ),
        (
            "berth_dax_restores_total",
            "counter",
            "Ranges mapped back to their file because it grew again.",
            m.restores,
        ),
    ];
    for (name, kind, help, value) in values {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    for (name, what, nanos, count) in [
        (
            "berth_dax_map_wait_seconds",
            "SHMEM_MAP",
            m.map_nanos,
            m.maps,
        ),
        (
            "berth_dax_unmap_wait_seconds",
            "SHMEM_UNMAP",
            m.unmap_nanos,
            m.unmaps,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} Time waiting for the VMM to acknowledge {what} requests.\n\
             # TYPE {name} summary\n{name}_sum {}\n{name}_count {count}",
            nanos as f64 / 1e9
        );
    }
}
