//! The services' cost, read from /proc: CPU seconds over the load, resident memory, and
//! how many TCP connections each holds to PostgreSQL (its socket inodes matched against
//! /proc/net/tcp).

use std::collections::HashSet;

use serde::Serialize;

use crate::bench::cpu_secs_of;

/// One process under measurement.
#[derive(Debug, Clone)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
    cpu_start: f64,
    /// Most PostgreSQL connections seen at one sample.
    pg_max: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcSummary {
    pub name: String,
    pub pid: u32,
    pub cpu_secs: f64,
    /// Average share of one core over the load window (200 = both cores of two).
    pub cpu_percent: f64,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    pub pg_connections_max: usize,
    /// `false` when the process had exited by the end.
    pub alive: bool,
}

/// `VmRSS` and `VmHWM` of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Socket inodes of `pid`'s open files.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    dir.filter_map(|e| {
        let target = std::fs::read_link(e.ok()?.path()).ok()?;
        let t = target.to_str()?;
        t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
    })
    .collect()
}

/// Inodes of established TCP connections to `port` in a /proc/net/tcp table.
pub fn inodes_to_port(table: &str, port: u16) -> HashSet<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let remote_port = u16::from_str_radix(f.get(2)?.rsplit(':').next()?, 16).ok()?;
            // State 01 = ESTABLISHED.
            (remote_port == port && *f.get(3)? == "01").then(|| f.get(9)?.parse().ok())?
        })
        .collect()
}

/// PostgreSQL connections `pid` holds (PostgreSQL on 127.0.0.1:`pg_port`).
pub fn pg_connections(pid: u32, pg_port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let to_pg = inodes_to_port(&table, pg_port);
    socket_inodes(pid).intersection(&to_pg).count()
}

impl Watched {
    pub fn new(name: &str, pid: u32) -> Watched {
        Watched {
            name: name.to_string(),
            pid,
            cpu_start: cpu_secs_of(pid).unwrap_or(0.0),
            pg_max: 0,
        }
    }

    /// Restarts the CPU count (at the start of the load window).
    pub fn reset(&mut self) {
        self.cpu_start = cpu_secs_of(self.pid).unwrap_or(0.0);
        self.pg_max = 0;
    }

    pub fn sample(&mut self, pg_port: u16) {
        self.pg_max = self.pg_max.max(pg_connections(self.pid, pg_port));
    }

    pub fn summary(&self, window_secs: f64) -> ProcSummary {
        let cpu = cpu_secs_of(self.pid);
        let (rss, hwm) = rss_kib(self.pid).unwrap_or((0, 0));
        let cpu_secs = cpu.map_or(0.0, |c| c - self.cpu_start);
        ProcSummary {
            name: self.name.clone(),
            pid: self.pid,
            cpu_secs: (cpu_secs * 100.0).round() / 100.0,
            cpu_percent: (cpu_secs / window_secs.max(1e-9) * 1000.0).round() / 10.0,
            rss_mib: (rss as f64 / 1024.0 * 10.0).round() / 10.0,
            peak_rss_mib: (hwm as f64 / 1024.0 * 10.0).round() / 10.0,
            pg_connections_max: self.pg_max,
            alive: cpu.is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn established_connections_to_a_port_by_inode() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:D431 0100007F:1538 01 00000000:00000000 00:00000000 00000000     0        0 111 1 0000000000000000 20 4 30 10 -1\n\
   1: 0100007F:D432 0100007F:1538 06 00000000:00000000 00:00000000 00000000     0        0 222 1 0000000000000000 20 4 30 10 -1\n\
   2: 0100007F:D433 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 333 1 0000000000000000 20 4 30 10 -1\n";
        // 0x1538 = 5432; the second is TIME_WAIT, the third goes to 8080.
        assert_eq!(inodes_to_port(table, 5432), HashSet::from([111]));
        assert_eq!(inodes_to_port(table, 8080), HashSet::from([333]));
    }

    #[test]
    fn this_process_is_measurable() {
        let me = std::process::id();
        let (rss, hwm) = rss_kib(me).expect("own /proc status");
        assert!(rss > 0 && hwm >= rss);
        let w = Watched::new("self", me);
        let s = w.summary(1.0);
        assert!(s.alive && s.rss_mib > 0.0);
    }
}
