//! A running process's figures from `/proc`: CPU time, resident memory, bytes read from
//! storage.

/// User + system CPU seconds a running process has used so far (`/proc/PID/stat`).
pub fn cpu_secs_of(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Some((ticks(11)? + ticks(12)?) / clock_ticks())
}

/// CPU seconds the S3 server (`UPLINK_BENCH_SERVER_PID`, set by scripts/bench) has used so
/// far; 0 when it is not known. Differences show what each client costs the server.
pub fn server_cpu_secs() -> f64 {
    std::env::var("UPLINK_BENCH_SERVER_PID")
        .ok()
        .and_then(|p| p.parse().ok())
        .and_then(cpu_secs_of)
        .unwrap_or(0.0)
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// A `Name:   value kB` line of `/proc/PID/status`, in KiB.
fn status_kib(pid: u32, name: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(name))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resident set size (VmRSS) of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// Peak resident set size (VmHWM) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// Bytes a process (all its threads) caused to be read from storage so far: `read_bytes`
/// of `/proc/PID/io` (page-cache hits do not count).
pub fn read_bytes_of(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("read_bytes:"))?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(cpu_secs_of(me).is_some());
        let (rss, peak) = (rss_kib(me).unwrap(), peak_rss_kib(me).unwrap());
        assert!(rss > 0 && peak >= rss, "{rss} {peak}");
        assert!(read_bytes_of(me).is_some());
        assert!(read_bytes_of(u32::MAX).is_none());
    }
}
