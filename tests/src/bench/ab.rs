//! ApacheBench (`ab`, from Debian's apache2-utils): a new TCP connection per
//! request, as the figures in the issue were measured.
use std::{process::Command, time::Instant};

use anyhow::{bail, Context, Result};

use crate::{cgroup::TestCgroup, netns::Netns};

#[derive(Clone, Copy, Debug, Default)]
pub struct AbResult {
    pub requests_per_s: f64,
    /// Mean time per request as each concurrent client sees it.
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub failed: u64,
    /// ab's own CPU time over the wall time: near 1.0, ab saturated a core.
    pub load_tool_cpu: f64,
}

fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// `ab -n requests -c concurrency url` from inside `ns`, as a process of
/// `cgroup` when given (where kpr's socket-level balancer acts).
pub fn run(ns: &Netns, cgroup: Option<&TestCgroup>, url: &str, requests: u32, concurrency: u32) -> Result<AbResult> {
    let cpu_before = children_cpu_seconds();
    let started = Instant::now();
    let mut command = Command::new("ip");
    super::pin(&mut command, super::Cpu::Client);
    if let Some(cgroup) = cgroup {
        cgroup.enter(&mut command);
    }
    let out = command
        .args(["netns", "exec", &ns.name, "ab", "-q", "-r", "-s", "10"])
        .args(["-n", &requests.to_string(), "-c", &concurrency.to_string(), url])
        .output()
        .context("running ab (is apache2-utils installed? `cargo xtask setup`)")?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = children_cpu_seconds() - cpu_before;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("ab {url} failed: {}{text}", String::from_utf8_lossy(&out.stderr));
    }
    let mut result = parse(&text).with_context(|| format!("unexpected ab output:\n{text}"))?;
    result.load_tool_cpu = cpu / wall;
    Ok(result)
}

fn field(text: &str, label: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.trim_start().starts_with(label))?;
    line[line.find(':')? + 1..].split_whitespace().next()?.parse().ok()
}

fn percentile(text: &str, pct: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.trim_start().starts_with(pct))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn parse(text: &str) -> Option<AbResult> {
    let complete = field(text, "Complete requests")?;
    let failed = field(text, "Failed requests")? as u64;
    let non_2xx = field(text, "Non-2xx responses").unwrap_or(0.0) as u64;
    if complete == 0.0 {
        return None;
    }
    Some(AbResult {
        requests_per_s: field(text, "Requests per second")?,
        mean_ms: field(text, "Time per request")?,
        p50_ms: percentile(text, "50%")?,
        p99_ms: percentile(text, "99%")?,
        failed: failed + non_2xx,
        load_tool_cpu: 0.0,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_ab_output() {
        let text = "Complete requests:      2000\nFailed requests:        3\nRequests per second:    4321.09 [#/sec] (mean)\n\
                    Time per request:       1.851 [ms] (mean)\nTime per request:       0.231 [ms] (mean, across all concurrent requests)\n\
                    Percentage of the requests served within a certain time (ms)\n  50%      2\n  66%      2\n  99%      5\n 100%     11 (longest request)\n";
        let r = super::parse(text).unwrap();
        assert_eq!(
            (r.requests_per_s, r.mean_ms, r.p50_ms, r.p99_ms, r.failed),
            (4321.09, 1.851, 2.0, 5.0, 3)
        );
    }
}
