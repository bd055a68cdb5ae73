//! `cargo xtask bench` runs this (release build, as root): every benchmark
//! in one run, written as a Markdown report.
use std::path::PathBuf;

use anyhow::{Context, Result};
use kpr_testbed::bench::{self, BenchConfig};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut out = None;
    let mut cfg = BenchConfig::full();
    let mut command = "cargo xtask bench".to_string();
    let mut recorded = Vec::new();
    while let Some(arg) = args.next() {
        if arg != "--out" {
            recorded.push(arg.clone());
        }
        let mut value = |what: &str| -> Result<String> {
            let v = args.next().with_context(|| format!("{arg} needs {what}"))?;
            recorded.push(v.clone());
            Ok(v)
        };
        match arg.as_str() {
            "--out" => out = Some(PathBuf::from(args.next().context("--out needs a path")?)),
            "--smoke" => cfg = BenchConfig::smoke(),
            "--requests" => cfg.requests = value("a number")?.parse()?,
            "--rounds" => cfg.rounds = value("a number")?.parse()?,
            "--external-rounds" => cfg.external_rounds = value("a number")?.parse()?,
            "--external-requests" => cfg.external_requests = value("a number")?.parse()?,
            "--only" => cfg.only.push(value("datapath, packets, control or external")?),
            "--skip-rule-loads" => cfg.skip_rule_loads = true,
            "--baseline-object" => cfg.baseline_object = Some(value("an eBPF object")?.into()),
            "--packet-sizes" => {
                cfg.packet_services = value("sizes, comma separated")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?;
            }
            // Connection-rate sizes, every dataplane compared at each.
            "--sizes" => {
                cfg.compared_services = value("sizes, comma separated")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?;
                cfg.kpr_only_services.clear();
            }
            other => anyhow::bail!(
                "unknown argument {other:?} (expected --out PATH, --smoke, --requests N, --rounds N, --external-rounds N, --external-requests N, --only PART, --skip-rule-loads, --sizes N,N, --packet-sizes N,N, --baseline-object FILE)"
            ),
        }
    }
    if !recorded.is_empty() {
        command = format!("{command} -- {}", recorded.join(" "));
    }
    let started = std::time::Instant::now();
    let progress = |step: &str| eprintln!("[{:>5.0}s] {step}", started.elapsed().as_secs_f64());
    let report = bench::run(&cfg, &progress)?;
    let date = String::from_utf8(
        std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d"])
            .output()?
            .stdout,
    )?;
    let markdown = report.to_markdown(&cfg, &command, date.trim());
    // Only a whole run replaces the committed report; a part of one is
    // written beside the build.
    let out = out.unwrap_or_else(|| {
        PathBuf::from(if cfg.only.is_empty() {
            "docs/benchmarks.md"
        } else {
            "target/benchmarks-partial.md"
        })
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, &markdown)?;
    println!("{markdown}");
    eprintln!("wrote {}", out.display());
    Ok(())
}
