//! Per-packet cost through BPF_PROG_TEST_RUN, path by path. A NAT program
//! rewrites its input, so `repeat` over one buffer would measure the path
//! only once: every sample is one run (repeat = 1) on its own packet, and
//! the kernel-measured durations are summarized.
use std::net::Ipv4Addr;

use anyhow::Result;
use proxy_common::NOOP_PROGRAM;

use super::{median, percentile, service_vip, services_desired, BenchConfig};
use crate::{
    dataplane::Loaded,
    packet::{self, TCP_ACK, TCP_SYN},
};

#[derive(Clone, Debug)]
pub struct Row {
    pub services: usize,
    pub path: &'static str,
    pub median_ns: f64,
    pub p90_ns: f64,
}

pub const NO_MATCH: &str = "no match (packet of a connection)";
pub const NO_MATCH_SYN: &str = "no match, new connection (clears stale reply state)";
pub const FLOOR: &str = "empty program (floor)";

const CLIENT_BASE: u32 = u32::from_be_bytes([10, 244, 128, 0]);

fn client(i: usize) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::from(CLIENT_BASE + (i / 50_000) as u32),
        10_000 + (i % 50_000) as u16,
    )
}

pub fn run(cfg: &BenchConfig, progress: &dyn Fn(&str)) -> Result<Vec<Row>> {
    let mut dp = Loaded::new()?;
    dp.load_extra(NOOP_PROGRAM)?;
    let backends: Vec<(Ipv4Addr, u16)> = (0..3).map(|i| (Ipv4Addr::new(10, 244, 0, 10 + i), 80)).collect();
    let k = cfg.packet_samples;
    let mut rows = Vec::new();
    for &n in &cfg.packet_services {
        progress(&format!("per-packet cost: {n} services"));
        dp.program(&services_desired(n, &backends))?;
        let target = service_vip(n - 1);
        let mut summarize = |path: &'static str, ns: Vec<f64>| {
            rows.push(Row {
                services: n,
                path,
                median_ns: median(ns.clone()),
                p90_ns: percentile(ns, 0.9),
            });
        };
        let one = |frame: &[u8], program: Option<&str>| -> Result<f64> {
            let r = match program {
                Some(p) => dp.run_program(p, frame, 1)?,
                None => dp.run(frame)?,
            };
            Ok(r.duration.as_nanos() as f64)
        };
        let base = n * k; // fresh tuples for every size
        let syn = |i: usize| packet::tcp(client(base + i), (target, 80), TCP_SYN).frame();
        let floor = (0..k)
            .map(|i| one(&syn(i), Some(NOOP_PROGRAM)))
            .collect::<Result<Vec<_>>>()?;
        summarize(FLOOR, floor);
        let elsewhere = |i: usize| (Ipv4Addr::new(10, 200, (i / 250) as u8, (i % 250) as u8 + 1), 80);
        let no_match = (0..k)
            .map(|i| one(&packet::tcp(client(base + i), elsewhere(i), TCP_ACK).frame(), None))
            .collect::<Result<Vec<_>>>()?;
        summarize(NO_MATCH, no_match);
        let no_match_syn = (0..k)
            .map(|i| one(&packet::tcp(client(base + i), elsewhere(i), TCP_SYN).frame(), None))
            .collect::<Result<Vec<_>>>()?;
        summarize(NO_MATCH_SYN, no_match_syn);
        let mut chosen = Vec::with_capacity(k);
        let mut new_flow = Vec::with_capacity(k);
        for i in 0..k {
            let r = dp.run(&syn(i))?;
            new_flow.push(r.duration.as_nanos() as f64);
            let f = &r.frame;
            chosen.push((
                Ipv4Addr::new(f[30], f[31], f[32], f[33]),
                u16::from_be_bytes([f[36], f[37]]),
            ));
        }
        summarize("new flow (SYN: select, track, DNAT)", new_flow);
        let established = (0..k)
            .map(|i| one(&packet::tcp(client(base + i), (target, 80), TCP_ACK).frame(), None))
            .collect::<Result<Vec<_>>>()?;
        summarize("established flow (tracked, DNAT)", established);
        let reply = (0..k)
            .map(|i| one(&packet::tcp(chosen[i], client(base + i), TCP_ACK).frame(), None))
            .collect::<Result<Vec<_>>>()?;
        summarize("reply (reverse NAT)", reply);
    }
    Ok(rows)
}
