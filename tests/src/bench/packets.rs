//! Per-packet cost through BPF_PROG_TEST_RUN, path by path. A NAT program
//! rewrites its input, so `repeat` over one buffer would measure the path
//! only once: every sample is one run (repeat = 1) on its own packet, and
//! the kernel-measured durations are summarized.
//!
//! Every size has its own loaded dataplane, programmed up front; the
//! samples are taken in rounds that visit every size in turn (after a
//! warm-up round that is thrown away), so that the machine's drift over the
//! run is shared by all sizes instead of showing up as a difference between
//! them.
use std::net::Ipv4Addr;

use anyhow::Result;
use proxy_common::{NOOP_PROGRAM, TC_EXTERNAL_PROGRAM, TC_PROGRAM, XDP_PASS_PROGRAM, XDP_PROGRAM};

use super::{baseline::Baseline, median, percentile, service_vip, services_desired, BenchConfig};
use crate::{
    dataplane::{Loaded, RunResult},
    packet::{self, TCP_ACK, TCP_SYN},
};

#[derive(Clone, Debug)]
pub struct Row {
    pub services: usize,
    pub path: &'static str,
    pub median_ns: f64,
    /// Mean of the middle 80% of samples. The kernel's clock here moves in
    /// steps of about 10 ns, so a median jumps by a whole step (10% of a
    /// 100 ns path) when the cost crosses a step boundary; a trimmed mean
    /// resolves below the step and still ignores interrupts and the like.
    pub trimmed_mean_ns: f64,
    pub p90_ns: f64,
}

fn trimmed_mean(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let cut = values.len() / 10;
    let middle = &values[cut..values.len() - cut];
    if middle.is_empty() {
        return 0.0;
    }
    middle.iter().sum::<f64>() / middle.len() as f64
}

pub const NO_MATCH: &str = "no match (later packet of a connection)";
pub const NO_MATCH_SYN: &str = "no match, first packet of a connection (clears stale reply state)";
pub const FLOOR: &str = "empty program (floor)";
/// From a /24 where a backend serves translated flows, on another port:
/// the /24 bitmap cannot rule it out, the /24-and-port one can.
pub const NO_MATCH_NEAR_BACKEND: &str = "no match, first packet, from a backend's /24";
pub const NEW_FLOW: &str = "new flow (SYN: select, track, DNAT)";
pub const ESTABLISHED: &str = "established flow (tracked, DNAT)";
pub const REPLY: &str = "reply (reverse NAT)";
/// The XDP program on traffic from outside, against an XDP program that
/// passes everything, and the TC program of the external interfaces on the
/// same packets (what it costs without XDP).
pub const XDP_FLOOR: &str = "XDP: empty program (floor)";
pub const XDP_NEW_FLOW: &str = "XDP, from outside: new flow (select, track, DNAT)";
pub const XDP_ESTABLISHED: &str = "XDP, from outside: established flow (DNAT)";
pub const TC_EXTERNAL_NEW_FLOW: &str = "TC external, from outside: new flow (select, track, DNAT)";
pub const TC_EXTERNAL_ESTABLISHED: &str = "TC external, from outside: established flow (DNAT)";
/// The same paths of the baseline build (`--baseline-object`), sampled
/// packet for packet beside this build's.
pub const BASELINE_FLOOR: &str = "baseline build: empty program (floor)";
pub const BASELINE_NEW_FLOW: &str = "baseline build: new flow (SYN: select, track, DNAT)";
pub const BASELINE_ESTABLISHED: &str = "baseline build: established flow (tracked, DNAT)";
pub const BASELINE_REPLY: &str = "baseline build: reply (reverse NAT)";
pub const BASELINE_PATHS: [(&str, &str); 4] = [
    (BASELINE_FLOOR, FLOOR),
    (BASELINE_NEW_FLOW, NEW_FLOW),
    (BASELINE_ESTABLISHED, ESTABLISHED),
    (BASELINE_REPLY, REPLY),
];
pub const PATHS: [&str; 12] = [
    FLOOR,
    NO_MATCH,
    NO_MATCH_SYN,
    NO_MATCH_NEAR_BACKEND,
    NEW_FLOW,
    ESTABLISHED,
    REPLY,
    XDP_FLOOR,
    XDP_NEW_FLOW,
    XDP_ESTABLISHED,
    TC_EXTERNAL_NEW_FLOW,
    TC_EXTERNAL_ESTABLISHED,
];

/// Rounds the samples of each size and path are split into.
pub const ROUNDS: usize = 5;

const CLIENT_BASE: u32 = u32::from_be_bytes([10, 244, 128, 0]);

/// The `i`th client tuple: distinct for every sample of the whole run.
fn client(i: usize) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::from(CLIENT_BASE + (i / 50_000) as u32),
        10_000 + (i % 50_000) as u16,
    )
}

/// The `i`th client outside the cluster: distinct from `client`'s, and
/// one set for the XDP samples, another for the TC ones.
fn outsider(i: usize, set: u32) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::from(OUTSIDER_BASE + (set << 12) + (i / 50_000) as u32),
        10_000 + (i % 50_000) as u16,
    )
}

const OUTSIDER_BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);

/// Somewhere no service is, for the no-match paths.
fn elsewhere(i: usize) -> (Ipv4Addr, u16) {
    (Ipv4Addr::new(10, 200, (i / 250 % 250) as u8, (i % 250) as u8 + 1), 80)
}

/// One size's dataplane and where its next fresh tuples start.
struct Sized {
    services: usize,
    dp: Loaded,
    target: Ipv4Addr,
    next_client: usize,
    samples: Vec<Vec<f64>>,
    baseline: Option<Baseline>,
    /// By `BASELINE_PATHS`.
    baseline_samples: Vec<Vec<f64>>,
}

impl Sized {
    /// `count` samples of every path, each on tuples never used before.
    fn measure(&mut self, count: usize, keep: bool) -> Result<()> {
        let base = self.next_client;
        self.next_client += count;
        let dp = &self.dp;
        let target = self.target;
        let one = |frame: &[u8], program: Option<&str>| -> Result<f64> {
            let r = match program {
                Some(p) => dp.run_program(p, frame, 1)?,
                None => dp.run(frame)?,
            };
            Ok(r.duration.as_nanos() as f64)
        };
        let syn = |i: usize| packet::tcp(client(base + i), (target, 80), TCP_SYN).frame();
        let mut ns: Vec<Vec<f64>> = vec![Vec::with_capacity(count); PATHS.len()];
        let mut base_ns: Vec<Vec<f64>> = vec![Vec::with_capacity(count); BASELINE_PATHS.len()];
        // The baseline build's run of the same packet, right after this
        // build's: (kernel-measured ns, output frame).
        let baseline = self.baseline.as_ref();
        let base_one = |program: &str, frame: &[u8]| -> Result<Option<(f64, Vec<u8>)>> {
            let Some(b) = baseline else { return Ok(None) };
            let r = b.run_program(program, frame)?;
            Ok(Some((r.duration.as_nanos() as f64, r.frame)))
        };
        // Which build runs a packet first alternates: the second run finds
        // the kernel's own test-run path warm.
        let both = |i: usize, ours: &dyn Fn() -> Result<RunResult>, program: &str, frame: &[u8]| {
            if i.is_multiple_of(2) {
                let r = ours()?;
                Ok::<_, anyhow::Error>((r, base_one(program, frame)?))
            } else {
                let b = base_one(program, frame)?;
                Ok((ours()?, b))
            }
        };
        for i in 0..count {
            let frame = syn(i);
            let (r, b) = both(i, &|| dp.run_program(NOOP_PROGRAM, &frame, 1), NOOP_PROGRAM, &frame)?;
            ns[0].push(r.duration.as_nanos() as f64);
            if let Some((t, _)) = b {
                base_ns[0].push(t);
            }
        }
        // A connection's first packet finds the filter words for its tuples
        // out of cache; its later packets find them where the first left
        // them.
        for i in 0..count {
            ns[2].push(one(
                &packet::tcp(client(base + i), elsewhere(base + i), TCP_SYN).frame(),
                None,
            )?);
        }
        for i in 0..count {
            ns[1].push(one(
                &packet::tcp(client(base + i), elsewhere(base + i), TCP_ACK).frame(),
                None,
            )?);
        }
        for i in 0..count {
            let neighbour = (Ipv4Addr::new(10, 244, 0, 100 + (i % 100) as u8), client(base + i).1);
            ns[3].push(one(
                &packet::tcp(neighbour, elsewhere(base + i), TCP_SYN).frame(),
                None,
            )?);
        }
        let backend_of = |f: &[u8]| {
            (
                Ipv4Addr::new(f[30], f[31], f[32], f[33]),
                u16::from_be_bytes([f[36], f[37]]),
            )
        };
        let mut chosen = Vec::with_capacity(count);
        let mut base_chosen = Vec::with_capacity(count);
        for i in 0..count {
            let frame = syn(i);
            let (r, b) = both(i, &|| dp.run(&frame), TC_PROGRAM, &frame)?;
            ns[4].push(r.duration.as_nanos() as f64);
            chosen.push(backend_of(&r.frame));
            if let Some((t, out)) = b {
                base_ns[1].push(t);
                base_chosen.push(backend_of(&out));
            }
        }
        for i in 0..count {
            let ack = packet::tcp(client(base + i), (target, 80), TCP_ACK).frame();
            let (r, b) = both(i, &|| dp.run(&ack), TC_PROGRAM, &ack)?;
            ns[5].push(r.duration.as_nanos() as f64);
            if let Some((t, _)) = b {
                base_ns[2].push(t);
            }
        }
        for (i, &backend) in chosen.iter().enumerate() {
            let reply = packet::tcp(backend, client(base + i), TCP_ACK).frame();
            // The baseline build answers from the backend it chose.
            let base_reply = base_chosen
                .get(i)
                .map(|&b| packet::tcp(b, client(base + i), TCP_ACK).frame())
                .unwrap_or_else(|| reply.clone());
            let (r, b) = both(i, &|| dp.run(&reply), TC_PROGRAM, &base_reply)?;
            ns[6].push(r.duration.as_nanos() as f64);
            if let Some((t, _)) = b {
                base_ns[3].push(t);
            }
        }
        // From outside, as the external interface sees it: through XDP, and
        // through the TC program alone (each on its own clients).
        let xdp =
            |frame: &[u8], program: &str| -> Result<f64> { Ok(dp.run_xdp(program, frame)?.duration.as_nanos() as f64) };
        let from_outside =
            |i: usize, set: u32, flags: u8| packet::tcp(outsider(base + i, set), (target, 80), flags).frame();
        for i in 0..count {
            ns[7].push(xdp(&from_outside(i, 0, TCP_SYN), XDP_PASS_PROGRAM)?);
        }
        for (path, flags) in [(8, TCP_SYN), (9, TCP_ACK)] {
            for i in 0..count {
                ns[path].push(xdp(&from_outside(i, 0, flags), XDP_PROGRAM)?);
            }
        }
        for (path, flags) in [(10, TCP_SYN), (11, TCP_ACK)] {
            for i in 0..count {
                ns[path].push(one(&from_outside(i, 1, flags), Some(TC_EXTERNAL_PROGRAM))?);
            }
        }
        if keep {
            for (all, new) in self.samples.iter_mut().zip(ns) {
                all.extend(new);
            }
            for (all, new) in self.baseline_samples.iter_mut().zip(base_ns) {
                all.extend(new);
            }
        }
        Ok(())
    }
}

pub fn run(cfg: &BenchConfig, progress: &dyn Fn(&str)) -> Result<Vec<Row>> {
    // In 10.244.0.0/24, clients elsewhere: see `NO_MATCH_NEAR_BACKEND`.
    let backends: Vec<(Ipv4Addr, u16)> = (0..3).map(|i| (Ipv4Addr::new(10, 244, 0, 10 + i), 80)).collect();
    let mut sized = Vec::new();
    for &n in &cfg.packet_services {
        progress(&format!("per-packet cost: programming {n} services"));
        let mut dp = Loaded::new()?;
        dp.load_extra(NOOP_PROGRAM)?;
        dp.load_extra_xdp(XDP_PASS_PROGRAM)?;
        dp.program(&services_desired(n, &backends))?;
        let baseline = match &cfg.baseline_object {
            Some(path) => {
                let mut b = Baseline::load(path)?;
                b.program(n, &backends)?;
                Some(b)
            }
            None => None,
        };
        sized.push(Sized {
            services: n,
            dp,
            target: service_vip(n - 1),
            next_client: 0,
            samples: vec![Vec::new(); PATHS.len()],
            baseline,
            baseline_samples: vec![Vec::new(); BASELINE_PATHS.len()],
        });
    }
    let per_round = cfg.packet_samples.div_ceil(ROUNDS);
    for round in 0..=ROUNDS {
        progress(&format!(
            "per-packet cost: {}",
            if round == 0 {
                "warm-up round".to_string()
            } else {
                format!("round {round}/{ROUNDS}")
            }
        ));
        for s in &mut sized {
            s.measure(per_round, round > 0)?;
        }
    }
    let mut rows = Vec::new();
    for s in sized {
        let baseline = BASELINE_PATHS.iter().map(|(path, _)| path);
        let measured = PATHS.iter().zip(s.samples).chain(baseline.zip(s.baseline_samples));
        for (path, ns) in measured.filter(|(_, ns)| !ns.is_empty()) {
            rows.push(Row {
                services: s.services,
                path,
                median_ns: median(ns.clone()),
                trimmed_mean_ns: trimmed_mean(ns.clone()),
                p90_ns: percentile(ns, 0.9),
            });
        }
    }
    Ok(rows)
}
