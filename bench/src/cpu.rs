//! Where a run's CPU went: Linux's scheduler statistics of every thread of the server (grouped
//! by thread name), of the bench itself and, on PostgreSQL, of the local server's processes,
//! read before and after the load; with the share of time the machine's cores sat idle. A
//! ratio to `baseline` is bounded by what a request costs the cores in all, and by how long
//! they wait, so the report gives both.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// CPU nanoseconds of the threads and processes a run watches, and the machine's counters.
#[derive(Debug)]
pub struct Snapshot {
    /// (group, thread id) → nanoseconds on a CPU so far.
    threads: HashMap<(String, u32), u64>,
    /// All cores' time and idle time (including waiting for I/O), in clock ticks.
    cores: (u64, u64),
}

/// What to watch.
#[derive(Debug, Clone, Copy)]
pub struct Watched {
    /// The server's process.
    pub server: u32,
    /// Whether the local PostgreSQL server's processes count.
    pub postgres: bool,
}

/// Reads every counter now.
pub fn snapshot(watched: Watched) -> Snapshot {
    let mut threads = HashMap::new();
    for (tid, comm, ns) in threads_of(&format!("/proc/{}/task", watched.server)) {
        threads.insert((format!("server {comm}"), tid), ns);
    }
    for (tid, _, ns) in threads_of("/proc/self/task") {
        threads.insert(("bench".to_owned(), tid), ns);
    }
    if watched.postgres {
        for (pid, ns) in postgres_processes() {
            threads.insert(("postgres".to_owned(), pid), ns);
        }
    }
    Snapshot {
        threads,
        cores: std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| cores_of(&text))
            .unwrap_or_default(),
    }
}

/// CPU microseconds per answered request between two snapshots, by group (`server`,
/// `server <thread name>`, `bench`, `postgres`), and the cores' idle percentage. A thread that
/// started during the run counts from zero; one that ended is missed.
pub fn per_request(before: &Snapshot, after: &Snapshot, requests: usize) -> BTreeMap<String, f64> {
    let mut spent: BTreeMap<String, u64> = BTreeMap::new();
    for (key, &ns) in &after.threads {
        let used = ns.saturating_sub(before.threads.get(key).copied().unwrap_or(0));
        let (group, _) = key;
        *spent.entry(group.clone()).or_default() += used;
        if group.starts_with("server ") {
            *spent.entry("server".to_owned()).or_default() += used;
        }
    }
    let mut figures: BTreeMap<String, f64> = spent
        .into_iter()
        .map(|(group, ns)| {
            let per = ns as f64 / 1000.0 / requests.max(1) as f64;
            (format!("cpu_us_{}", group.replace(' ', "_")), per)
        })
        .collect();
    let total = after.cores.0.saturating_sub(before.cores.0);
    let idle = after.cores.1.saturating_sub(before.cores.1);
    if total > 0 {
        figures.insert(
            "cores_idle_pct".to_owned(),
            100.0 * idle as f64 / total as f64,
        );
    }
    figures
}

/// (thread id, name, nanoseconds on a CPU) of every thread under `task_dir`.
fn threads_of(task_dir: &str) -> Vec<(u32, String, u64)> {
    numbered(task_dir)
        .into_iter()
        .filter_map(|(tid, dir)| Some((tid, name_of(&dir)?, on_cpu_ns(&dir)?)))
        .collect()
}

/// (process id, nanoseconds on a CPU) of every process named `postgres` (the postmaster, its
/// backends and its workers); single-threaded, so the process's own statistics are all of it.
fn postgres_processes() -> Vec<(u32, u64)> {
    numbered("/proc")
        .into_iter()
        .filter(|(_, dir)| name_of(dir).is_some_and(|name| name == "postgres"))
        .filter_map(|(pid, dir)| Some((pid, on_cpu_ns(&dir)?)))
        .collect()
}

/// The entries of `dir` named by a number (processes in `/proc`, threads in a `task`).
fn numbered(dir: &str) -> Vec<(u32, std::path::PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| Some((entry.file_name().to_str()?.parse().ok()?, entry.path())))
        .collect()
}

/// A process's or thread's name (`comm`).
fn name_of(dir: &Path) -> Option<String> {
    Some(
        std::fs::read_to_string(dir.join("comm"))
            .ok()?
            .trim()
            .to_owned(),
    )
}

/// The first field of `schedstat`: nanoseconds the task has run.
fn on_cpu_ns(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("schedstat")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// The machine's processor, as `/proc/cpuinfo` names it: runs on two machines are compared by
/// their ratios, and a machine's speed moves those too (2026-12-05: `baseline` gave about
/// 100,000 req/s on one machine and 35,000 on an AMD EPYC at 2 GHz the same day).
pub fn model() -> Option<String> {
    model_of(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

/// The first `model name` of a `/proc/cpuinfo` text.
fn model_of(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name")
            .then(|| value.trim().to_owned())
            .filter(|v| !v.is_empty())
    })
}

/// (all, idle + iowait) clock ticks of the `cpu` line of `/proc/stat`.
fn cores_of(stat: &str) -> Option<(u64, u64)> {
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let all = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((all, idle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_is_the_first_model_name_of_cpuinfo() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n\n\
                       processor\t: 1\nmodel name\t: AMD EPYC\n";
        assert_eq!(model_of(cpuinfo).as_deref(), Some("AMD EPYC"));
        assert_eq!(model_of("processor\t: 0\nmodel name\t:\n"), None);
        assert_eq!(model_of(""), None);
    }

    #[test]
    fn the_cores_line_counts_idle_and_io_wait_as_idle_and_leaves_guest_time_out() {
        let stat = "cpu  100 5 50 800 40 1 2 2 30 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        assert_eq!(cores_of(stat), Some((1000, 840)));
        assert_eq!(cores_of("intr 1 2 3\n"), None);
    }

    #[test]
    fn a_busy_thread_of_the_bench_shows_up_per_request() {
        let watched = Watched {
            server: std::process::id(),
            postgres: false,
        };
        let this_thread = Path::new("/proc/thread-self");
        let ran = || on_cpu_ns(this_thread).unwrap_or(0);
        let before = snapshot(watched);
        // Spin until this thread has run 50 ms (however long a busy machine makes that take).
        let (start, gave_up) = (ran(), std::time::Instant::now());
        let mut spin = 0u64;
        while ran().saturating_sub(start) < 50_000_000 && gave_up.elapsed().as_secs() < 20 {
            for _ in 0..10_000 {
                spin = std::hint::black_box(spin.wrapping_add(1));
            }
        }
        let after = snapshot(watched);
        let figures = per_request(&before, &after, 1000);
        // 50 ms over 1,000 requests is 50 µs each, and more if the other tests' threads ran.
        let bench = figures.get("cpu_us_bench").copied().unwrap_or(0.0);
        assert!((50.0..10_000.0).contains(&bench), "{figures:?}");
        // Watching its own process as the server, the same threads count there too.
        let server = figures.get("cpu_us_server").copied().unwrap_or(0.0);
        assert!((50.0..10_000.0).contains(&server), "{figures:?}");
        assert!(figures.contains_key("cores_idle_pct"));
    }
}
