//! The run's report: a table for the terminal, the same as JSON for the docs.

use serde::Serialize;

use super::args::Args;
use super::check::Outcome;
use super::procs::ProcSummary;
use super::stats::OpSummary;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub mem_gib: f64,
    pub kernel: String,
}

impl Machine {
    pub fn here() -> Machine {
        let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()
            })
            .unwrap_or(0.0);
        Machine {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            mem_gib: (mem_kib / 1048576.0 * 10.0).round() / 10.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Devices {
    pub registered: usize,
    /// Seconds to register them all (`POST /v1/devices`, `--register-concurrency` at once).
    pub register_secs: f64,
    /// Most MQTT connections open at once (CONNACK received, not yet dropped).
    pub connected_max: usize,
    /// Seconds from the first CONNECT until every device was connected and `online` in
    /// the API's database.
    pub all_online_secs: f64,
    /// Devices the API had `online` when the load began and when it ended.
    pub online_in_api_at_start: i64,
    pub online_in_api_at_end: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub date: String,
    pub machine: Machine,
    pub args: Args,
    pub load_secs: f64,
    pub devices: Devices,
    pub ops: Vec<OpSummary>,
    pub duplicate_command_deliveries: u64,
    pub processes: Vec<ProcSummary>,
    pub outcome: Outcome,
    /// Lost or duplicated outcomes, from the devices' ledger and from PostgreSQL.
    pub problems: Vec<String>,
    pub exactly_once: bool,
}

impl Report {
    pub fn print(&self) {
        let m = &self.machine;
        println!(
            "uplink-loadgen {}: {} devices over {:.0} s on {} cores, {} GiB, kernel {}",
            self.date, self.devices.registered, self.load_secs, m.cores, m.mem_gib, m.kernel
        );
        println!(
            "devices: registered in {:.1} s, {} connected at most, all online after {:.1} s; online in the API: {} at start, {} at end",
            self.devices.register_secs,
            self.devices.connected_max,
            self.devices.all_online_secs,
            self.devices.online_in_api_at_start,
            self.devices.online_in_api_at_end
        );
        println!("(per s over the load window; device.register and mqtt.connect happen before it)");
        println!(
            "\n{:<18} {:>8} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8}  errors",
            "op", "ok", "per s", "units/s", "p50 ms", "p95 ms", "p99 ms", "max ms"
        );
        for o in &self.ops {
            let errors: Vec<String> = o.errors.iter().map(|(k, n)| format!("{k}: {n}")).collect();
            println!(
                "{:<18} {:>8} {:>9.1} {:>10.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1}  {}",
                o.op,
                o.ok,
                o.per_sec,
                o.units_per_sec,
                o.p50_ms,
                o.p95_ms,
                o.p99_ms,
                o.max_ms,
                errors.join(", ")
            );
        }
        println!(
            "\n{:<14} {:>7} {:>8} {:>6} {:>9} {:>9} {:>7}",
            "process", "pid", "cpu s", "cpu %", "rss MiB", "peak MiB", "pg conn"
        );
        for p in &self.processes {
            println!(
                "{:<14} {:>7} {:>8.1} {:>6.1} {:>9.1} {:>9.1} {:>7}{}",
                p.name,
                p.pid,
                p.cpu_secs,
                p.cpu_percent,
                p.rss_mib,
                p.peak_rss_mib,
                p.pg_connections_max,
                if p.alive { "" } else { "  (exited)" }
            );
        }
        let o = &self.outcome;
        println!(
            "\ncommands: {} issued, {} done in the database, {} duplicate deliveries; sessions: {}, parts: {}",
            o.commands_issued, o.commands_done, self.duplicate_command_deliveries, o.sessions, o.parts
        );
        if self.exactly_once {
            println!("exactly once: yes (nothing lost, nothing duplicated)");
        } else {
            println!("exactly once: NO");
            for p in &self.problems {
                println!("  - {p}");
            }
        }
    }
}
