//! The daemon: watch the source, sync the maps, keep the programs attached.
use std::{
    collections::BTreeSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::Ebpf;

use crate::{
    dataplane::{loader, maps::ServiceMaps},
    model,
    source::manifests::ManifestDir,
    sync::Syncer,
};

pub struct Config {
    pub pin_dir: PathBuf,
    pub manifests: PathBuf,
    /// Interface names to attach to; a trailing `*` matches a prefix.
    pub interfaces: Vec<String>,
    pub poll_interval: Duration,
}

fn matches(patterns: &[String], iface: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => iface.starts_with(prefix),
        None => p == iface,
    })
}

/// Keeps the classifier attached to every matching interface, including
/// pods' veths that appear after start.
struct Attacher {
    patterns: Vec<String>,
    attached: BTreeSet<String>,
}

impl Attacher {
    fn refresh(&mut self, ebpf: &mut Ebpf, pin_dir: &std::path::Path) {
        let present: BTreeSet<String> = loader::interfaces()
            .into_iter()
            .filter(|i| matches(&self.patterns, i))
            .collect();
        for iface in present.difference(&self.attached.clone()) {
            match loader::attach(ebpf, pin_dir, iface) {
                Ok(()) => {
                    tracing::info!(%iface, "attached");
                    self.attached.insert(iface.clone());
                }
                Err(e) => tracing::warn!(%iface, error = format!("{e:#}"), "cannot attach; will retry"),
            }
        }
        for gone in self.attached.difference(&present).cloned().collect::<Vec<_>>() {
            loader::forget(pin_dir, &gone);
            self.attached.remove(&gone);
            tracing::info!(iface = %gone, "interface gone");
        }
    }
}

pub async fn run(config: Config) -> Result<()> {
    let mut ebpf = loader::load(&config.pin_dir)?;
    let mut attacher = Attacher {
        patterns: config.interfaces.clone(),
        attached: BTreeSet::new(),
    };
    // Links pinned by a previous run on interfaces that still exist are
    // taken over by `attach`; the others are stale.
    let existing: BTreeSet<String> = loader::interfaces().into_iter().collect();
    for iface in loader::attached_interfaces(&config.pin_dir) {
        if !existing.contains(&iface) || !matches(&config.interfaces, &iface) {
            loader::forget(&config.pin_dir, &iface);
        }
    }
    attacher.refresh(&mut ebpf, &config.pin_dir);

    let mut maps = ServiceMaps::open(&config.pin_dir)?;
    let mut syncer = Syncer::recover(&mut maps).context("reading the maps left by a previous run")?;
    tracing::info!(frontends = syncer.frontend_count(), pin_dir = %config.pin_dir.display(), "dataplane loaded");

    let mut source = ManifestDir::new(&config.manifests);
    let mut tick = tokio::time::interval(config.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_attach = Instant::now();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
        if last_attach.elapsed() >= Duration::from_secs(1) {
            attacher.refresh(&mut ebpf, &config.pin_dir);
            last_attach = Instant::now();
        }
        let scan = match source.scan() {
            Ok(Some(scan)) => scan,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(dir = %config.manifests.display(), error = %e, "cannot read the manifest directory; keeping the current state");
                continue;
            }
        };
        for problem in &scan.new_problems {
            tracing::warn!("rejected: {problem}");
        }
        let started = Instant::now();
        let desired = model::desired_state(scan.snapshot.services.values(), scan.snapshot.slices.values());
        for conflict in &desired.conflicts {
            tracing::warn!("rejected: {conflict}");
        }
        let report = syncer.sync(&desired, &mut maps);
        for failure in &report.failures {
            tracing::error!("sync: {failure}");
        }
        tracing::info!(
            frontends = desired.frontends.len(),
            endpoints = desired.endpoint_count(),
            added = report.added,
            updated = report.updated,
            removed = report.removed,
            took_us = started.elapsed().as_micros() as u64,
            "synced"
        );
    }
    // Pins stay: the dataplane keeps forwarding until the next daemon
    // takes over (or `kpr uninstall` removes it).
    tracing::info!("stopping; the dataplane stays pinned");
    Ok(())
}
