//! Reports: one row per run as a table and as JSON, ratios between two JSON reports, and an SVG
//! plot of throughput and p99 against connection count.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// One scenario at one connection count.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// The scenario.
    pub scenario: String,
    /// `sqlite` or `postgres`.
    pub store: String,
    /// Concurrent connections.
    pub connections: usize,
    /// Answered requests.
    pub requests: usize,
    /// Requests per second.
    pub rps: f64,
    /// Latency quantiles, milliseconds.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest answer.
    pub max_ms: f64,
    /// Failed checks and transport errors.
    pub errors: u64,
    /// The first failure, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// The server's peak resident set size, MiB.
    pub peak_rss_mib: f64,
    /// Fixtures seeded before the server started (pending tickets, codes, users).
    pub fixtures: usize,
    /// Seconds the seeding took.
    pub seed_secs: f64,
    /// Whether the fixtures ran out before the deadline.
    pub exhausted: bool,
    /// Scenario-specific figures (delivered/s, argon2 ceiling, side-load p99).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
    /// The round of the run this row belongs to, from 1 (`--rounds`: the scenarios run again
    /// in turn, so that each round's ratio pairs figures taken minutes apart at most); 0 in
    /// reports written before rounds existed.
    #[serde(default)]
    pub round: usize,
}

/// A whole invocation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The command line's settings, for the record.
    pub duration_secs: u64,
    /// Cores the machine has.
    pub cores: usize,
    /// The machine's processor (`/proc/cpuinfo`), when known; absent in reports made before
    /// 2026-12-05, 14:40.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_model: Option<String>,
    /// Every run, in order.
    pub rows: Vec<Row>,
}

/// The table printed after a run.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    if let Some(model) = &report.cpu_model {
        let _ = writeln!(out, "machine: {model}, {} cores", report.cores);
    }
    let _ = writeln!(
        out,
        "{:<15} {:<8} {:>5} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>6} {:>8} {:>8}",
        "scenario",
        "store",
        "conns",
        "requests",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "errors",
        "RSS MiB",
        "fixtures"
    );
    for r in &report.rows {
        let _ = writeln!(
            out,
            "{:<15} {:<8} {:>5} {:>9} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.1} {:>6} {:>8.1} {:>8}",
            r.scenario,
            r.store,
            r.connections,
            r.requests,
            r.rps,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.max_ms,
            r.errors,
            r.peak_rss_mib,
            r.fixtures
        );
        for (k, v) in r.extra.iter().filter(|(k, _)| !is_cpu_figure(k)) {
            let _ = writeln!(out, "{:<15}   {k} = {v:.2}", "");
        }
        if let Some(line) = cpu_line(&r.extra) {
            let _ = writeln!(out, "{:<15}   {line}", "");
        }
        if let Some(e) = &r.first_error {
            let _ = writeln!(out, "{:<15}   first error: {e}", "");
        }
    }
    // Ratios to the baseline of the same store and connection count, as the targets are put.
    let several_rounds = report.rows.iter().any(|r| r.round > 1);
    for r in &report.rows {
        if r.scenario == "baseline" {
            continue;
        }
        if let Some((base, percent)) = percent_of_baseline(report, r) {
            let round = if several_rounds {
                format!(", round {}", r.round)
            } else {
                String::new()
            };
            let _ = write!(
                out,
                "{} / baseline ({}, {} connections{round}): {:.1}%",
                r.scenario, r.store, r.connections, percent
            );
            if let Some(ceiling) = cpu_ceiling(base, r) {
                let _ = write!(
                    out,
                    " (the CPU a request costs would allow {:.1}% with no idle core)",
                    100.0 * ceiling
                );
            }
            let _ = writeln!(out);
        }
    }
    for line in median_ratios(report) {
        let _ = writeln!(out, "{line}");
    }
    out
}

/// The round a row belongs to, reports from before rounds (0) counting as round 1.
fn round_of(row: &Row) -> usize {
    row.round.max(1)
}

/// The `baseline` row measured with `row`: same store, connections and round.
fn baseline_of<'a>(report: &'a Report, row: &Row) -> Option<&'a Row> {
    report.rows.iter().find(|b| {
        b.scenario == "baseline"
            && b.store == row.store
            && b.connections == row.connections
            && round_of(b) == round_of(row)
    })
}

/// `row`'s `baseline` and `row`'s requests/s as a percentage of it (none without a baseline
/// that answered anything).
fn percent_of_baseline<'a>(report: &'a Report, row: &Row) -> Option<(&'a Row, f64)> {
    let base = baseline_of(report, row).filter(|b| b.rps > 0.0)?;
    Some((base, 100.0 * row.rps / base.rps))
}

/// With several rounds, each scenario's ratios to `baseline` (one per round) and their median:
/// a figure that one slow minute cannot decide.
fn median_ratios(report: &Report) -> Vec<String> {
    let mut ratios: BTreeMap<(&str, &str, usize), Vec<f64>> = BTreeMap::new();
    for r in report.rows.iter().filter(|r| r.scenario != "baseline") {
        if let Some((_, percent)) = percent_of_baseline(report, r) {
            ratios
                .entry((r.store.as_str(), r.scenario.as_str(), r.connections))
                .or_default()
                .push(percent);
        }
    }
    ratios
        .into_iter()
        .filter(|(_, each)| each.len() > 1)
        .map(|((store, scenario, connections), each)| {
            let listed: Vec<String> = each.iter().map(|p| format!("{p:.1}%")).collect();
            format!(
                "{scenario} / baseline ({store}, {connections} connections): median {:.1}% of {} rounds ({})",
                median(&each),
                each.len(),
                listed.join(", ")
            )
        })
        .collect()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        let low = middle.checked_sub(1).and_then(|i| sorted.get(i));
        match (low, sorted.get(middle)) {
            (Some(low), Some(high)) => (low + high) / 2.0,
            _ => f64::NAN,
        }
    } else {
        sorted.get(middle).copied().unwrap_or(f64::NAN)
    }
}

/// One row per scenario, store and connection count: of several rounds, the one with the
/// median requests/s (for the plot).
pub fn median_rounds(rows: Vec<Row>) -> Vec<Row> {
    let mut groups: BTreeMap<(String, String, usize), Vec<Row>> = BTreeMap::new();
    for r in rows {
        groups
            .entry((r.scenario.clone(), r.store.clone(), r.connections))
            .or_default()
            .push(r);
    }
    groups
        .into_values()
        .filter_map(|mut group| {
            group.sort_by(|a, b| a.rps.total_cmp(&b.rps));
            let middle = group.len() / 2;
            group.into_iter().nth(middle)
        })
        .collect()
}

fn is_cpu_figure(key: &str) -> bool {
    key.starts_with("cpu_us_") || key == "cores_idle_pct"
}

/// The run's CPU on one line: µs per request of the server (and of each of its thread names),
/// the bench and PostgreSQL, and how idle the cores were.
fn cpu_line(extra: &BTreeMap<String, f64>) -> Option<String> {
    let of = |group: &str| extra.get(&format!("cpu_us_{group}")).copied();
    let server = of("server")?;
    let mut threads: Vec<(&str, f64)> = extra
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("cpu_us_server_")?, *v)))
        .filter(|(_, v)| *v >= 0.05)
        .collect();
    threads.sort_by(|a, b| b.1.total_cmp(&a.1));
    let threads: Vec<String> = threads
        .iter()
        .map(|(name, v)| format!("{name} {v:.1}"))
        .collect();
    let mut line = format!(
        "CPU µs a request: server {server:.1} ({})",
        threads.join(", ")
    );
    for group in ["bench", "postgres"] {
        if let Some(v) = of(group) {
            let _ = write!(line, ", {group} {v:.1}");
        }
    }
    if let Some(idle) = extra.get("cores_idle_pct") {
        let _ = write!(line, "; cores idle {idle:.1}%");
    }
    Some(line)
}

/// CPU µs a request of everything the run watched: the server, the bench, PostgreSQL.
fn cpu_per_request(row: &Row) -> Option<f64> {
    let of = |group: &str| row.extra.get(&format!("cpu_us_{group}")).copied();
    Some(of("server")? + of("bench")? + of("postgres").unwrap_or(0.0))
}

/// The ratio to `base` that `row`'s CPU a request allows if the cores never idle: the same
/// cores serve `base` at its own idle share, so the ratio is bounded by base's CPU a request
/// over row's, divided by the share of the time base kept the cores busy.
fn cpu_ceiling(base: &Row, row: &Row) -> Option<f64> {
    let (base_cpu, row_cpu) = (cpu_per_request(base)?, cpu_per_request(row)?);
    let base_busy = 1.0 - base.extra.get("cores_idle_pct")? / 100.0;
    (row_cpu > 0.0 && base_busy > 0.0).then(|| base_cpu / (row_cpu * base_busy))
}

/// Ratios B/A for every run both reports have.
pub fn compare(a: &Report, b: &Report) -> String {
    let mut out = String::new();
    // A ratio of two runs on different machines measures the machines as much as the builds.
    let machine = |r: &Report| {
        format!(
            "{}, {} cores",
            r.cpu_model.as_deref().unwrap_or("an unrecorded processor"),
            r.cores
        )
    };
    if (&a.cpu_model, a.cores) != (&b.cpu_model, b.cores) || a.cpu_model.is_none() {
        let _ = writeln!(
            out,
            "machines: A on {}, B on {}; not known to be the same, so the ratios include the machines",
            machine(a),
            machine(b)
        );
    }
    let _ = writeln!(
        out,
        "{:<15} {:<8} {:>5} {:>12} {:>12} {:>12}",
        "scenario", "store", "conns", "req/s B/A", "p99 B/A", "RSS B/A"
    );
    for rb in &b.rows {
        let Some(ra) = a.rows.iter().find(|ra| {
            ra.scenario == rb.scenario
                && ra.store == rb.store
                && ra.connections == rb.connections
                && round_of(ra) == round_of(rb)
        }) else {
            continue;
        };
        let ratio = |x: f64, y: f64| if x > 0.0 { y / x } else { f64::NAN };
        let _ = writeln!(
            out,
            "{:<15} {:<8} {:>5} {:>12.3} {:>12.3} {:>12.3}",
            rb.scenario,
            rb.store,
            rb.connections,
            ratio(ra.rps, rb.rps),
            ratio(ra.p99_ms, rb.p99_ms),
            ratio(ra.peak_rss_mib, rb.peak_rss_mib)
        );
    }
    out
}

const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// Two panels (requests/s and p99 against connections), one line per scenario and store.
pub fn svg(rows: &[Row], title: &str) -> String {
    let mut series: BTreeMap<String, Vec<&Row>> = BTreeMap::new();
    for r in rows {
        series
            .entry(format!("{} ({})", r.scenario, r.store))
            .or_default()
            .push(r);
    }
    for points in series.values_mut() {
        points.sort_by_key(|r| r.connections);
    }
    let max_conn = rows.iter().map(|r| r.connections).max().unwrap_or(1).max(1) as f64;
    let max_rps = rows.iter().map(|r| r.rps).fold(1.0, f64::max) * 1.1;
    let max_p99 = rows.iter().map(|r| r.p99_ms).fold(1.0, f64::max) * 1.1;
    let (width, height) = (960.0, 420.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="20" text-anchor="middle" font-size="15">{title}</text>"#,
        width / 2.0
    );
    let panels = [
        ("requests/s", max_rps, 60.0, true),
        ("p99 latency, ms", max_p99, 540.0, false),
    ];
    for (label, max_y, left, is_rps) in panels {
        let (top, w, h) = (40.0, 360.0, 300.0);
        let x_of = |c: f64| left + w * c / max_conn;
        let y_of = |v: f64| top + h - h * v / max_y;
        let _ = writeln!(
            out,
            r##"<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#888"/>"##
        );
        for i in 0..=4 {
            let v = max_y * f64::from(i) / 4.0;
            let y = y_of(v);
            let _ = writeln!(
                out,
                r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v:.0}</text>"##,
                left + w,
                left - 4.0,
                y + 4.0
            );
        }
        let mut ticks: Vec<usize> = rows.iter().map(|r| r.connections).collect();
        ticks.sort_unstable();
        ticks.dedup();
        for c in ticks {
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{c}</text>"#,
                x_of(c as f64),
                top + h + 16.0
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">connections</text><text x="{:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
            left + w / 2.0,
            top + h + 34.0,
            left + w / 2.0,
            top - 6.0
        );
        for (i, (name, points)) in series.iter().enumerate() {
            let colour = COLOURS.get(i % COLOURS.len()).copied().unwrap_or("black");
            let path: Vec<String> = points
                .iter()
                .map(|r| {
                    let v = if is_rps { r.rps } else { r.p99_ms };
                    format!("{:.1},{:.1}", x_of(r.connections as f64), y_of(v))
                })
                .collect();
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
                path.join(" ")
            );
            for p in &path {
                let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(out, r#"<circle cx="{x}" cy="{y}" r="3" fill="{colour}"/>"#);
            }
            if is_rps {
                let _ = writeln!(
                    out,
                    r#"<rect x="{:.1}" y="{:.1}" width="10" height="10" fill="{colour}"/><text x="{:.1}" y="{:.1}">{name}</text>"#,
                    left + 10.0,
                    top + 10.0 + 16.0 * i as f64,
                    left + 24.0,
                    top + 19.0 + 16.0 * i as f64
                );
            }
        }
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(scenario: &str, rps: f64, cpu: &[(&str, f64)]) -> Row {
        Row {
            scenario: scenario.to_owned(),
            store: "sqlite".to_owned(),
            connections: 100,
            requests: 1000,
            rps,
            p50_ms: 1.0,
            p90_ms: 1.0,
            p99_ms: 1.0,
            max_ms: 1.0,
            errors: 0,
            first_error: None,
            peak_rss_mib: 40.0,
            fixtures: 1,
            seed_secs: 0.0,
            exhausted: false,
            extra: cpu.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            round: 0,
        }
    }

    fn in_round(mut row: Row, round: usize) -> Row {
        row.round = round;
        row
    }

    #[test]
    fn each_round_pairs_with_its_own_baseline_and_the_median_of_the_rounds_is_given() {
        let rows = vec![
            in_round(row("baseline", 100.0, &[]), 1),
            in_round(row("acl-confirm", 30.0, &[]), 1),
            in_round(row("baseline", 80.0, &[]), 2),
            in_round(row("acl-confirm", 20.0, &[]), 2),
            in_round(row("baseline", 90.0, &[]), 3),
            in_round(row("acl-confirm", 27.0, &[]), 3),
        ];
        let report = Report {
            duration_secs: 5,
            cores: 2,
            cpu_model: None,
            rows: rows.clone(),
        };
        let text = table(&report);
        for line in [
            "acl-confirm / baseline (sqlite, 100 connections, round 1): 30.0%\n",
            "acl-confirm / baseline (sqlite, 100 connections, round 2): 25.0%\n",
            "acl-confirm / baseline (sqlite, 100 connections, round 3): 30.0%\n",
            "acl-confirm / baseline (sqlite, 100 connections): median 30.0% of 3 rounds (30.0%, 25.0%, 30.0%)\n",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
        assert_eq!(median(&[25.0, 30.0, 20.0, 40.0]), 27.5);
        // The plot keeps the round with the median requests/s of each scenario.
        let plotted = median_rounds(rows);
        let rps: Vec<f64> = plotted.iter().map(|r| r.rps).collect();
        assert_eq!(rps, vec![27.0, 90.0]);
    }

    #[test]
    fn compare_pairs_the_same_round() {
        let a = Report {
            duration_secs: 5,
            cores: 2,
            cpu_model: None,
            rows: vec![
                in_round(row("baseline", 100.0, &[]), 1),
                in_round(row("baseline", 50.0, &[]), 2),
            ],
        };
        let b = Report {
            duration_secs: 5,
            cores: 2,
            cpu_model: None,
            rows: vec![in_round(row("baseline", 100.0, &[]), 2)],
        };
        let text = compare(&a, &b);
        assert!(text.contains("2.000"), "{text}");
        // A report from before rounds (round 0) pairs with the first round of a new one.
        let old = Report {
            duration_secs: 5,
            cores: 2,
            cpu_model: None,
            rows: vec![row("baseline", 25.0, &[])],
        };
        let text = compare(&old, &a);
        assert!(text.contains("4.000"), "{text}");
    }

    #[test]
    fn compare_names_the_machines_unless_both_are_recorded_and_the_same() {
        let on = |model: Option<&str>, cores: usize| Report {
            duration_secs: 5,
            cores,
            cpu_model: model.map(Into::into),
            rows: vec![row("baseline", 100.0, &[])],
        };
        let unknown = compare(&on(None, 2), &on(None, 2));
        assert!(
            unknown.starts_with(
                "machines: A on an unrecorded processor, 2 cores, B on an unrecorded processor, 2 cores;"
            ),
            "{unknown}"
        );
        let same = compare(&on(Some("AMD EPYC"), 2), &on(Some("AMD EPYC"), 2));
        assert!(!same.contains("machines:"), "{same}");
        assert!(same.contains("1.000"), "{same}");
        let other = compare(&on(Some("Intel Xeon"), 2), &on(Some("AMD EPYC"), 2));
        assert!(
            other.starts_with("machines: A on Intel Xeon, 2 cores, B on AMD EPYC, 2 cores;"),
            "{other}"
        );
        let more_cores = compare(&on(Some("AMD EPYC"), 4), &on(Some("AMD EPYC"), 2));
        assert!(more_cores.contains("machines:"), "{more_cores}");
    }

    #[test]
    fn the_cpu_ceiling_divides_baselines_cpu_by_the_scenarios_at_baselines_busy_share() {
        // The figures of 2026-12-05, 05:05: 19.8 µs a baseline request at 2.9% idle, 60.2 µs a
        // login (its idle share does not enter: the ceiling is what no idle would give).
        let base = row(
            "baseline",
            94_942.0,
            &[
                ("cpu_us_server", 10.3),
                ("cpu_us_bench", 9.5),
                ("cores_idle_pct", 2.9),
            ],
        );
        let login = row(
            "acl-confirm",
            25_773.0,
            &[
                ("cpu_us_server", 45.0),
                ("cpu_us_server_sqlite-writer", 19.4),
                ("cpu_us_bench", 15.2),
                ("cores_idle_pct", 18.6),
            ],
        );
        let ceiling = cpu_ceiling(&base, &login).unwrap_or(0.0);
        assert!((ceiling - 0.339).abs() < 0.001, "{ceiling}");
        let report = Report {
            duration_secs: 10,
            cores: 2,
            cpu_model: Some("AMD EPYC".into()),
            rows: vec![base, login],
        };
        let text = table(&report);
        assert!(text.starts_with("machine: AMD EPYC, 2 cores\n"), "{text}");
        assert!(text.contains("acl-confirm / baseline (sqlite, 100 connections): 27.1% (the CPU a request costs would allow 33.9% with no idle core)"), "{text}");
        assert!(
            text.contains(
                "CPU µs a request: server 45.0 (sqlite-writer 19.4), bench 15.2; cores idle 18.6%"
            ),
            "{text}"
        );
        assert!(!text.contains("cpu_us_"), "{text}");
    }

    #[test]
    fn without_cpu_figures_the_ratio_stands_alone() {
        let report = Report {
            duration_secs: 10,
            cores: 2,
            cpu_model: None,
            rows: vec![row("baseline", 100.0, &[]), row("v1-check", 40.0, &[])],
        };
        let text = table(&report);
        assert!(!text.contains("machine:"), "{text}");
        assert!(
            text.contains("v1-check / baseline (sqlite, 100 connections): 40.0%\n"),
            "{text}"
        );
        assert!(!text.contains("CPU µs"), "{text}");
    }
}
