//! The real programs and maps, loaded without attaching anywhere, for
//! packet-level tests and per-packet benchmarks through BPF_PROG_TEST_RUN.
use std::path::PathBuf;

use anyhow::{Context, Result};
use aya::{
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use proxy_common::{Stat, TC_PROGRAM};
use proxy_user::{
    dataplane::{loader, maps},
    model::DesiredState,
    sync::Syncer,
};

use crate::{bpffs::BpffsMount, packet::hex};

/// TC verdicts and XDP actions as the programs return them.
pub use proxy_user::dataplane::trace::{
    TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX,
};

pub struct Loaded {
    pub ebpf: Ebpf,
    pub pin_dir: PathBuf,
    maps: maps::ServiceMaps,
    syncer: Syncer,
    // Last: unmounted after the maps and programs are closed.
    _bpffs: BpffsMount,
}

pub struct XdpRunResult {
    pub action: u32,
    /// What the program left, metadata included if it added any.
    pub frame: Vec<u8>,
    pub duration: std::time::Duration,
}

pub struct RunResult {
    pub verdict: i32,
    pub frame: Vec<u8>,
    /// Kernel-measured time per run.
    pub duration: std::time::Duration,
}

impl Loaded {
    pub fn new() -> Result<Self> {
        let bpffs = BpffsMount::new()?;
        let pin_dir = bpffs.path.join("dp");
        let mut ebpf = loader::load(&pin_dir)?;
        // The tests and benchmarks run it on packets whether or not an
        // interface has it.
        loader::load_xdp(&mut ebpf)?;
        let mut maps = maps::ServiceMaps::open(&pin_dir)?;
        let syncer = Syncer::recover(&mut maps)?;
        Ok(Loaded {
            ebpf,
            pin_dir,
            maps,
            syncer,
            _bpffs: bpffs,
        })
    }

    /// Programs the maps as the daemon would.
    pub fn program(&mut self, desired: &DesiredState) -> Result<()> {
        let report = self.syncer.sync(desired, &mut self.maps);
        anyhow::ensure!(report.failures.is_empty(), "sync failed: {:?}", report.failures);
        Ok(())
    }

    /// Loads another classifier of the object (e.g. the no-op floor).
    pub fn load_extra(&mut self, name: &str) -> Result<()> {
        let program: &mut SchedClassifier = self.ebpf.program_mut(name).context("no such program")?.try_into()?;
        program.load()?;
        Ok(())
    }

    /// Loads another XDP program of the object (e.g. the pass-all floor).
    pub fn load_extra_xdp(&mut self, name: &str) -> Result<()> {
        let program: &mut Xdp = self.ebpf.program_mut(name).context("no such program")?.try_into()?;
        program.load()?;
        Ok(())
    }

    pub fn run_program(&self, name: &str, frame: &[u8], repeat: u32) -> Result<RunResult> {
        Self::run_in(&self.ebpf, name, frame, repeat)
    }

    /// Runs `frame` through the classifier `name` of any loaded object.
    pub fn run_in(ebpf: &Ebpf, name: &str, frame: &[u8], repeat: u32) -> Result<RunResult> {
        let program: &SchedClassifier = ebpf.program(name).context("no such program")?.try_into()?;
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat;
        let result = program.test_run(opts)?;
        out.truncate(result.data_size_out as usize);
        Ok(RunResult {
            verdict: result.return_value as i32,
            frame: out,
            duration: result.duration,
        })
    }

    /// Runs `frame` through the XDP program `program`; the frame it leaves
    /// includes the metadata XDP put in front of it (kpr's mark), if any.
    pub fn run_xdp(&self, program: &str, frame: &[u8]) -> Result<XdpRunResult> {
        let program: &Xdp = self.ebpf.program(program).context("no such program")?.try_into()?;
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.repeat = 1;
        let result = program.test_run(opts)?;
        out.truncate(result.data_size_out as usize);
        Ok(XdpRunResult {
            action: result.return_value,
            frame: out,
            duration: result.duration,
        })
    }

    pub fn run_repeat(&self, frame: &[u8], repeat: u32) -> Result<RunResult> {
        self.run_program(TC_PROGRAM, frame, repeat)
    }

    pub fn run(&self, frame: &[u8]) -> Result<RunResult> {
        self.run_repeat(frame, 1)
    }

    pub fn stats(&self) -> Result<Vec<(Stat, u64)>> {
        maps::read_stats(&self.pin_dir)
    }

    /// `kpr drain` (or its undoing), as the CLI sets it.
    pub fn set_draining(&mut self, draining: bool) -> Result<()> {
        self.maps.set_draining(draining)
    }

    /// The address flows are source-NATed to, as the daemon sets it.
    pub fn set_snat_addr(&mut self, addr: std::net::Ipv4Addr) -> Result<()> {
        self.maps.set_snat_addr(Some(addr))
    }

    /// Runs one frame through `program` and checks the verdict, the exact
    /// output frame, and that exactly `stat` moved.
    pub fn expect_from(&self, program: &str, name: &str, input: &[u8], verdict: i32, output: &[u8], stat: Stat) {
        let count = |dp: &Self| -> std::collections::BTreeMap<&'static str, u64> {
            dp.stats().unwrap().into_iter().map(|(s, n)| (s.name(), n)).collect()
        };
        let before = count(self);
        let result = self
            .run_program(program, input, 1)
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(result.verdict, verdict, "{name}: verdict");
        assert_eq!(hex(&result.frame), hex(output), "{name}: output frame");
        let after = count(self);
        let moved: Vec<&str> = after
            .iter()
            .filter(|(k, v)| before[*k] != **v)
            .map(|(k, _)| *k)
            .collect();
        assert_eq!(moved, vec![stat.name()], "{name}: counters");
    }
}

pub use proxy_user::dataplane::monotonic_secs;

/// Makes every NAT port towards `backend` (TCP) from `node` look held by
/// another flow (source-NATed when `nated`, else one that kept its own
/// port there), last seen at `last_seen`, its reply direction having seen
/// `seen` (`SEEN_*`), as a busy node's conntrack would be.
pub fn hold_nat_ports(
    pin_dir: &std::path::Path,
    backend: (std::net::Ipv4Addr, u16),
    node: std::net::Ipv4Addr,
    last_seen: u32,
    seen: u8,
    nated: bool,
) -> Result<()> {
    use proxy_common::{nat_port, FlowKey, NatEntry, IPPROTO_TCP, NAT_PORT_COUNT, NAT_REPLY, NAT_SNAT};
    let mut flows = maps::FlowMaps::open(pin_dir)?;
    for port in (0..NAT_PORT_COUNT).map(nat_port) {
        let key = FlowKey::new(
            proxy_common::addr_to_map(backend.0),
            backend.1.to_be(),
            proxy_common::addr_to_map(node),
            port.to_be(),
            IPPROTO_TCP,
        );
        let held = NatEntry {
            flags: if nated { NAT_REPLY | NAT_SNAT } else { NAT_REPLY },
            nat_port: port.to_be(),
            seen,
            last_seen,
            ..Default::default()
        };
        flows.insert(&key, &held)?;
    }
    Ok(())
}
