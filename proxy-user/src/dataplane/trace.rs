//! `kpr trace`: one packet through the data path as it stands, without
//! touching it, and why it went where it went.
//!
//! A loaded program's maps cannot be swapped for copies, and running the
//! live program would record a flow, advance a round-robin cursor and count
//! the packet. So the trace loads the same object (the program's tag, a hash
//! of its instructions without map addresses, is compared with the live
//! one's) against a snapshot of the live maps — copies in a pin directory of
//! their own on the same bpffs, removed afterwards — and runs the packet
//! through it with `BPF_PROG_TEST_RUN`, which sends nothing anywhere. What
//! the copy's counters and the rewritten frame say is the answer; the live
//! tables never see the packet.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{lpm_trie::LpmTrie, Array, HashMap, Map, MapData},
    programs::{ProgramInfo, SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use proxy_common::{
    addr_to_map, map_name, AffinityKey, AffinityValue, Backend, BackendKey, FlowKey, NatEntry, NodeConfig, ServiceKey,
    ServiceValue, SourceRange, Stat, FILTER_HALF_WORDS, IPPROTO_TCP, NAT_REPLY, SVC_EXTERNAL_LOCAL,
    TC_EXTERNAL_PROGRAM, TC_HOST_PROGRAM, TC_PROGRAM, XDP_MARK_FORWARD, XDP_MARK_TRANSLATED, XDP_PROGRAM,
};
use serde::Serialize;

use super::{loader, maps, monotonic_secs, sys};
use crate::packet;

/// Where the traced packet comes from: which of the node's hooks sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A pod (ingress of its interface on the node).
    Pod,
    /// Outside the node (ingress of an external interface).
    Outside,
    /// One of the node's own processes (egress), not balanced at `connect()`.
    Host,
}

impl Origin {
    fn program(self) -> &'static str {
        match self {
            Origin::Pod => TC_PROGRAM,
            Origin::Outside => TC_EXTERNAL_PROGRAM,
            Origin::Host => TC_HOST_PROGRAM,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Origin::Pod => "pod",
            Origin::Outside => "outside",
            Origin::Host => "host",
        }
    }
}

/// The packet to trace.
#[derive(Clone, Debug)]
pub struct Probe {
    pub origin: Origin,
    pub proto: u8,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    /// TCP flags (`packet::TCP_*`); ignored for UDP.
    pub tcp_flags: u8,
    /// Through the XDP program first (traffic from outside on an interface
    /// that runs it).
    pub xdp: bool,
}

/// What one program did with the packet.
#[derive(Clone, Debug, Serialize)]
pub struct Stage {
    pub program: &'static str,
    /// What became of the frame: `passed on`, `dropped`, ...
    pub action: String,
    /// The counter it moved (`kpr stats`' names); none when XDP left the
    /// frame to TC untouched.
    pub verdict: Option<&'static str>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Trace {
    pub origin: &'static str,
    pub protocol: &'static str,
    pub before: Addresses,
    /// The addresses the packet leaves with, when it leaves (not dropped).
    pub after: Option<Addresses>,
    pub stages: Vec<Stage>,
    /// The verdict of the program that finished with the packet.
    pub verdict: &'static str,
    /// Why, stage by stage, in words.
    pub because: Vec<String>,
    /// Whether the traced programs are the live ones (same instructions):
    /// false when the daemon runs another build than this `kpr`.
    pub same_programs_as_live: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Addresses {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
}

/// The data path's object loaded beside the live one, on copies of its
/// maps.
pub struct Snapshot {
    ebpf: Ebpf,
    dir: PathBuf,
    live: PathBuf,
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        // The pins go; the copies die with the last descriptor, `ebpf`'s.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Copies every entry of the hash map `name`.
fn copy_hash<K, V>(from: &Path, to: &Path, name: &str) -> Result<()>
where
    K: aya::Pod + Default,
    V: aya::Pod + Default,
{
    let source = maps::open(from, name)?;
    let entries: Vec<(K, V)> = sys::lookup_batch(source.fd(), 4096).with_context(|| format!("reading {name}"))?;
    let (keys, values): (Vec<K>, Vec<V>) = entries.into_iter().unzip();
    let target = maps::open(to, name)?;
    for (k, v) in keys.chunks(4096).zip(values.chunks(4096)) {
        sys::update_batch(target.fd(), k, v)
            .map_err(|(_, e)| e)
            .with_context(|| format!("copying {name}"))?;
    }
    Ok(())
}

impl Snapshot {
    /// Loads the object with maps of its own next to `live` (the daemon's
    /// pin directory) and copies into them what the live maps hold.
    pub fn take(live: &Path) -> Result<Self> {
        let name = live
            .file_name()
            .context("the pin directory has a name")?
            .to_string_lossy();
        // No dot: bpffs refuses names with one.
        let dir = live.with_file_name(format!("{name}-trace-{}", std::process::id()));
        let ebpf = match loader::load(&dir) {
            Ok(ebpf) => ebpf,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        // From here on, dropping it removes the directory.
        let mut snapshot = Snapshot {
            ebpf,
            dir,
            live: live.to_path_buf(),
        };
        loader::load_xdp(&mut snapshot.ebpf)?;
        snapshot.copy_maps()?;
        Ok(snapshot)
    }

    fn copy_maps(&self) -> Result<()> {
        let (from, to) = (self.live.as_path(), self.dir.as_path());
        copy_hash::<ServiceKey, ServiceValue>(from, to, map_name::SERVICES)?;
        copy_hash::<BackendKey, Backend>(from, to, map_name::BACKENDS)?;
        copy_hash::<FlowKey, NatEntry>(from, to, map_name::CONNTRACK)?;
        copy_hash::<AffinityKey, AffinityValue>(from, to, map_name::AFFINITY)?;
        // The cursors of the services there are (the array is mostly empty).
        let services: HashMap<MapData, ServiceKey, ServiceValue> =
            HashMap::try_from(Map::HashMap(maps::open(from, map_name::SERVICES)?))?;
        let live_cursors: Array<MapData, u64> = Array::try_from(Map::Array(maps::open(from, map_name::RR_CURSORS)?))?;
        let mut cursors: Array<MapData, u64> = Array::try_from(Map::Array(maps::open(to, map_name::RR_CURSORS)?))?;
        for entry in services.iter() {
            let id = entry?.1.id;
            cursors.set(id, live_cursors.get(&id, 0)?, 0)?;
        }
        let live_node: Array<MapData, NodeConfig> = Array::try_from(Map::Array(maps::open(from, map_name::NODE)?))?;
        let mut node: Array<MapData, NodeConfig> = Array::try_from(Map::Array(maps::open(to, map_name::NODE)?))?;
        node.set(0, live_node.get(&0, 0)?, 0)?;
        let live_ranges: LpmTrie<MapData, SourceRange, u8> =
            LpmTrie::try_from(Map::LpmTrie(maps::open(from, map_name::SOURCE_RANGES)?))?;
        let mut ranges: LpmTrie<MapData, SourceRange, u8> =
            LpmTrie::try_from(Map::LpmTrie(maps::open(to, map_name::SOURCE_RANGES)?))?;
        for entry in live_ranges.iter() {
            let (key, value) = entry?;
            ranges.insert(&key, value, 0)?;
        }
        let words = 2 * FILTER_HALF_WORDS as usize;
        let live_filter = sys::SharedWords::map(maps::open(from, map_name::FILTER)?.fd(), words)?;
        let filter = sys::SharedWords::map(maps::open(to, map_name::FILTER)?.fd(), words)?;
        for (to, from) in filter.words().iter().zip(live_filter.words()) {
            to.store(
                from.load(std::sync::atomic::Ordering::Relaxed),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        Ok(())
    }

    /// Whether this object's `program` has the same instructions as the
    /// live one pinned by the daemon.
    fn same_as_live(&self, program: &str) -> Option<bool> {
        let live = ProgramInfo::from_pin(self.live.join(format!("prog_{program}"))).ok()?;
        let ours: &SchedClassifier = self.ebpf.program(program)?.try_into().ok()?;
        Some(ours.info().ok()?.tag() == live.tag())
    }

    fn run_tc(&self, program: &str, frame: &[u8]) -> Result<(i32, Vec<u8>)> {
        let program: &SchedClassifier = self.ebpf.program(program).context("no such program")?.try_into()?;
        let (verdict, out) = test_run(program, frame)?;
        Ok((verdict as i32, out))
    }

    fn run_xdp(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let program: &Xdp = self.ebpf.program(XDP_PROGRAM).context("no XDP program")?.try_into()?;
        test_run(program, frame)
    }

    /// The counter that moved since `before` (each program run moves
    /// exactly one).
    fn moved(&self, before: &[(Stat, u64)]) -> Result<Option<Stat>> {
        let after = maps::read_stats(&self.dir)?;
        Ok(after
            .iter()
            .zip(before)
            .find(|((_, a), (_, b))| a != b)
            .map(|((s, _), _)| *s))
    }

    /// Runs `probe` through the programs its origin meets.
    pub fn trace(&self, probe: &Probe) -> Result<Trace> {
        let input = match probe.proto {
            IPPROTO_TCP => packet::tcp(endpoint(probe.src), endpoint(probe.dst), probe.tcp_flags),
            _ => packet::udp(endpoint(probe.src), endpoint(probe.dst)),
        };
        let mut because = self.context(probe)?;
        let frame = input.frame();
        let mut stages = Vec::new();
        let mut finished: Option<(Stat, Option<Vec<u8>>)> = None;
        if probe.xdp {
            if probe.origin != Origin::Outside {
                bail!("XDP runs on external interfaces only: trace --from outside");
            }
            let before = maps::read_stats(&self.dir)?;
            let (action, out) = self.run_xdp(&frame)?;
            let stat = self.moved(&before)?;
            let (mark, passed) = split_mark(&frame, out);
            let action_name = match (action, mark) {
                (XDP_DROP, _) => "dropped",
                (XDP_TX, _) | (XDP_REDIRECT, _) => "sent out from XDP (to a backend on another node)",
                (XDP_PASS, Some(XDP_MARK_TRANSLATED)) => "passed up translated (TC lets it through)",
                (XDP_PASS, Some(XDP_MARK_FORWARD)) => "translated; TC forwards it (no neighbour entry yet)",
                (XDP_PASS, _) => "left to TC untouched",
                _ => "unexpected action",
            };
            stages.push(Stage {
                program: XDP_PROGRAM,
                action: action_name.to_string(),
                verdict: stat.map(Stat::name),
            });
            if let Some(stat) = stat {
                let leaves = (action != XDP_DROP).then_some(passed);
                finished = Some((stat, leaves));
            }
        }
        if finished.is_none() {
            let program = probe.origin.program();
            let before = maps::read_stats(&self.dir)?;
            let (verdict, out) = self.run_tc(program, &frame)?;
            let stat = self.moved(&before)?.context("the program counted nothing")?;
            let action = match verdict {
                TC_ACT_SHOT => "dropped".to_string(),
                TC_ACT_REDIRECT if stat == Stat::Rejected => "answered (ICMP port unreachable to the sender)".into(),
                TC_ACT_REDIRECT => "sent out by the FIB".into(),
                TC_ACT_OK | TC_ACT_UNSPEC if out != frame => "passed on translated".into(),
                TC_ACT_OK | TC_ACT_UNSPEC => "passed on untouched".into(),
                other => format!("TC action {other}"),
            };
            stages.push(Stage {
                program,
                action,
                verdict: Some(stat.name()),
            });
            finished = Some((stat, (verdict != TC_ACT_SHOT).then_some(out)));
        }
        let (stat, leaves) = finished.expect("a stage finished");
        let after = leaves.map(|out| {
            let (src, dst) = packet::endpoints_of(&out);
            Addresses {
                src: SocketAddrV4::new(src.0, src.1),
                dst: SocketAddrV4::new(dst.0, dst.1),
            }
        });
        because.push(explain(stat, probe, after.as_ref()));
        Ok(Trace {
            origin: probe.origin.name(),
            protocol: if probe.proto == IPPROTO_TCP { "TCP" } else { "UDP" },
            before: Addresses {
                src: probe.src,
                dst: probe.dst,
            },
            after,
            stages,
            verdict: stat.name(),
            because,
            same_programs_as_live: self.same_as_live(probe.origin.program()).unwrap_or(false),
        })
    }

    /// What the maps say about the packet before it runs: a tracked flow,
    /// the frontend, a remembered affinity, the next round-robin slot.
    fn context(&self, probe: &Probe) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        let key = FlowKey::new(
            addr_to_map(*probe.src.ip()),
            probe.src.port().to_be(),
            addr_to_map(*probe.dst.ip()),
            probe.dst.port().to_be(),
            probe.proto,
        );
        let conntrack: HashMap<MapData, FlowKey, NatEntry> =
            HashMap::try_from(Map::LruHashMap(maps::open(&self.dir, map_name::CONNTRACK)?))?;
        if let Ok(entry) = conntrack.get(&key, 0) {
            let (addr, port) = (proxy_common::addr_from_map(entry.addr), u16::from_be(entry.port));
            if entry.flags & NAT_REPLY != 0 {
                notes.push(format!("tracked flow: a reply, answered as coming from {addr}:{port}"));
            } else {
                notes.push(format!(
                    "tracked flow: to backend {addr}:{port} (service id {}, slot {})",
                    entry.service_id, entry.slot
                ));
            }
        }
        let services: HashMap<MapData, ServiceKey, ServiceValue> =
            HashMap::try_from(Map::HashMap(maps::open(&self.dir, map_name::SERVICES)?))?;
        let frontend = ServiceKey::new(*probe.dst.ip(), probe.dst.port(), probe.proto);
        let Ok(svc) = services.get(&frontend, 0) else {
            notes.push(format!(
                "no service frontend at {}/{}",
                probe.dst,
                protocol(probe.proto)
            ));
            return Ok(notes);
        };
        let from_outside = probe.origin == Origin::Outside;
        let (first, count) = svc.slots(from_outside);
        let set = if from_outside && svc.flags & SVC_EXTERNAL_LOCAL != 0 {
            "this node's endpoints (externalTrafficPolicy Local)"
        } else {
            "every ready endpoint"
        };
        notes.push(format!(
            "frontend {}/{} ({}, service id {}): {count} backend(s) in the set it uses, {set}",
            probe.dst,
            protocol(probe.proto),
            svc.kind().name(),
            svc.id
        ));
        if svc.affinity_timeout != 0 {
            let affinity: HashMap<MapData, AffinityKey, AffinityValue> =
                HashMap::try_from(Map::LruHashMap(maps::open(&self.dir, map_name::AFFINITY)?))?;
            let client = AffinityKey {
                service_id: svc.id,
                _pad: 0,
                client: addr_to_map(*probe.src.ip()) as u64,
            };
            match affinity.get(&client, 0) {
                Ok(v) => {
                    let idle = monotonic_secs().wrapping_sub(v.last_used);
                    let b = SocketAddrV4::new(
                        proxy_common::addr_from_map(v.backend.addr),
                        u16::from_be(v.backend.port),
                    );
                    notes.push(format!(
                        "sessionAffinity ClientIP ({}s): {} was sent to {b} {idle}s ago{}",
                        svc.affinity_timeout,
                        probe.src.ip(),
                        if idle <= svc.affinity_timeout { "" } else { " (expired)" }
                    ));
                }
                Err(_) => notes.push(format!(
                    "sessionAffinity ClientIP ({}s): nothing remembered for {}",
                    svc.affinity_timeout,
                    probe.src.ip()
                )),
            }
        }
        if count > 0 {
            let cursors: Array<MapData, u64> =
                Array::try_from(Map::Array(maps::open(&self.dir, map_name::RR_CURSORS)?))?;
            let turn = cursors.get(&svc.id, 0)?;
            notes.push(format!(
                "round-robin: the next new flow takes slot {} (turn {turn})",
                first + (turn % count as u64) as u32
            ));
        }
        Ok(notes)
    }
}

/// One run of `program` on `frame` (BPF_PROG_TEST_RUN, which sends
/// nothing): its return value and the frame it leaves.
fn test_run<P>(program: &P, frame: &[u8]) -> Result<(u32, Vec<u8>)>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    let result = program.test_run(opts)?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

fn endpoint(at: SocketAddrV4) -> (Ipv4Addr, u16) {
    (*at.ip(), at.port())
}

fn protocol(proto: u8) -> &'static str {
    if proto == IPPROTO_TCP {
        "TCP"
    } else {
        "UDP"
    }
}

/// The mark XDP put in front of a frame it passed, and the frame.
fn split_mark(input: &[u8], out: Vec<u8>) -> (Option<u32>, Vec<u8>) {
    if out.len() == input.len() + 4 {
        let mark = u32::from_ne_bytes(out[..4].try_into().expect("four bytes"));
        (Some(mark), out[4..].to_vec())
    } else {
        (None, out)
    }
}

/// TC verdicts and XDP actions as the programs return them (also what the
/// test harness's packet fixtures expect).
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_UNSPEC: i32 = -1;
pub const TC_ACT_REDIRECT: i32 = 7;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// The verdict in words.
fn explain(stat: Stat, probe: &Probe, after: Option<&Addresses>) -> String {
    let moved = |what: &str| match after {
        Some(a) if a.src != probe.src || a.dst != probe.dst => format!("{what}: now {} -> {}", a.src, a.dst),
        _ => what.to_string(),
    };
    match stat {
        Stat::NewFlow => moved("a new flow: backend chosen as above, both directions recorded, translated"),
        Stat::Established => moved("a packet of the tracked flow: sent to its backend"),
        Stat::Reply => moved("a backend's reply: given the service's address back, to the client"),
        Stat::NoMatch => "no frontend and no tracked flow: not kpr's, passed untouched".into(),
        Stat::SourceDenied => "outside the service's loadBalancerSourceRanges: dropped".into(),
        Stat::NoLocalBackend => {
            "externalTrafficPolicy Local and no endpoint on this node: dropped (as kube-proxy does)".into()
        }
        Stat::Rejected => "no endpoint anywhere: refused with ICMP port unreachable (kube-proxy's REJECT)".into(),
        Stat::NoBackend => "no usable endpoint in the set this origin uses: dropped".into(),
        Stat::NoFlow => {
            "a TCP packet that is not a SYN, of no tracked flow: dropped (a backend chosen now could only reset it)"
                .into()
        }
        Stat::NatExhausted => "every NAT port to that backend is in use: dropped".into(),
        other => format!("verdict {}", other.name()),
    }
}
