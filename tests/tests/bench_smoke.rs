//! The benchmark with tiny sizes, so that it cannot rot: every part runs
//! end to end (nginx pods, ab, kube-proxy's rulesets loaded, per-packet
//! runs, the control plane against the test API server) and the report has
//! every section. Nothing here is a timing assertion.
use kpr_testbed::bench::{self, BenchConfig};

#[test]
fn the_benchmark_runs_end_to_end_with_tiny_sizes() {
    let cfg = BenchConfig::smoke();
    let report = bench::run(&cfg, &|step| eprintln!("{step}")).expect("benchmark");
    let md = report.to_markdown(&cfg, "cargo xtask bench --smoke", "today");
    for section in [
        "## Targets",
        "## Connection rate and latency",
        "## Per-packet cost by path",
        "## Control plane",
    ] {
        assert!(md.contains(section), "missing {section}:\n{md}");
    }
    // Each rate part reports its own noise beside its targets.
    assert_eq!(
        md.matches("direct runs against the direct runs around them").count(),
        2,
        "{md}"
    );
    for row in &report.external.rates {
        assert_eq!(row.failed, 0, "{row:?}");
        assert!(row.ratio_ci.0 <= row.ratio && row.ratio <= row.ratio_ci.1, "{row:?}");
    }
    // Every dataplane answered every request.
    for row in &report.datapath.rows {
        assert_eq!(row.failed, 0, "{row:?}");
        assert!(row.requests_per_s > 0.0, "{row:?}");
    }
    assert!(report.datapath.rows.iter().any(|r| r.config.starts_with("iptables")));
    assert!(report.datapath.rows.iter().any(|r| r.config.starts_with("nftables")));
    assert!(
        report.datapath.rows.iter().any(|r| r.ns_per_packet.is_some()),
        "kernel run-time accounting"
    );
    assert_eq!(
        report.packets.len(),
        cfg.packet_services.len() * bench::packets::PATHS.len()
    );
    assert!(report.packets.iter().all(|r| r.median_ns > 0.0));
    assert!(
        report.control.cold_starts_s.len() == 2
            && report.control.cold_starts_s.iter().all(|&s| s > 0.0)
            && report.control.change_p50_ms > 0.0
            && report.control.rss_mb > 0.0
    );
}
