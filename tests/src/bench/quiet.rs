//! Timed parts start on an idle machine. The kernel tears a namespace down
//! (and frees its rules, its maps, its sockets) in the background, long
//! after the command that removed it returned: after the benchmark's own
//! 10,000-service nftables namespace that takes the better part of a minute
//! of CPU, which would otherwise be billed to whatever is timed next.
use std::time::{Duration, Instant};

/// Busy share of all CPUs under which the machine counts as idle.
const IDLE_BELOW: f64 = 0.10;
const WINDOW: Duration = Duration::from_millis(500);

/// Waits until the machine has been idle for one window, at most `limit`.
/// Returns how long it waited and the last busy share seen, for the log.
pub fn wait_until_idle(limit: Duration) -> (Duration, f64) {
    let started = Instant::now();
    loop {
        let busy = busy_share(WINDOW);
        if busy < IDLE_BELOW || started.elapsed() >= limit {
            return (started.elapsed(), busy);
        }
    }
}

/// `wait_until_idle` with a minute's limit, reported through `progress`
/// when it had to wait (or gave up).
pub fn settle(progress: &dyn Fn(&str)) {
    let (waited, busy) = wait_until_idle(Duration::from_secs(60));
    if busy >= IDLE_BELOW {
        progress(&format!(
            "machine still {:.0}% busy after {:.0} s; measuring anyway",
            busy * 100.0,
            waited.as_secs_f64()
        ));
    } else if waited > WINDOW {
        progress(&format!(
            "waited {:.0} s for the machine to go idle",
            waited.as_secs_f64()
        ));
    }
}

/// The share of CPU time (all CPUs, steal included) not spent idle over `window`.
fn busy_share(window: Duration) -> f64 {
    let before = cpu_times();
    std::thread::sleep(window);
    let after = cpu_times();
    match (before, after) {
        (Some((total0, idle0)), Some((total1, idle1))) if total1 > total0 => {
            1.0 - (idle1 - idle0) as f64 / (total1 - total0) as f64
        }
        // Unreadable: do not wait on what cannot be measured.
        _ => 0.0,
    }
}

/// Total and idle (idle + iowait) jiffies from `/proc/stat`'s first line:
/// user nice system idle iowait irq softirq steal (guest time is already
/// inside user).
fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    (fields.len() == 8).then(|| (fields.iter().sum(), fields[3] + fields[4]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_are_read_and_move_forward() {
        let (total0, idle0) = cpu_times().expect("/proc/stat");
        std::thread::sleep(Duration::from_millis(50));
        let (total1, idle1) = cpu_times().expect("/proc/stat");
        assert!(total1 >= total0 && idle1 >= idle0 && total1 - total0 >= idle1 - idle0);
    }

    #[test]
    fn a_busy_cpu_is_seen_as_busy() {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinner = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let busy = busy_share(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        spinner.join().unwrap();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        // One spinning thread keeps one CPU of `cpus` busy.
        assert!(busy >= 0.8 / cpus, "busy share {busy} with one CPU spinning");
    }
}
