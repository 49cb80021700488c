//! A cgroup v1 memory cgroup of the bench's own (`/sys/fs/cgroup/memory/uplink-bench-PID`)
//! whose limit counts the page cache its processes fill, so a file larger than the limit
//! cannot stay cached for them; and dropping a file's page cache before it is read.
//! Needs root and the v1 memory controller mounted at `/sys/fs/cgroup/memory`.

use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup/memory";

/// The cgroup; dropping it moves the processes still in it to this process's memory cgroup
/// (where they would be as its children) and removes it.
#[derive(Debug)]
pub struct MemoryCgroup {
    dir: PathBuf,
}

/// The memory cgroup directory a process is in (`/proc/PID/cgroup`, v1 `memory` line).
fn memory_cgroup_of(pid: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then_some(path)
    })?;
    Some(Path::new(ROOT).join(rel.trim_start_matches('/')))
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::write(path, value)
}

impl MemoryCgroup {
    /// Creates the cgroup with `limit_bytes` (memory.limit_in_bytes); `Err` says what is
    /// missing.
    pub fn create(limit_bytes: u64) -> Result<MemoryCgroup, String> {
        let needs = "the disk-read bench needs root and the cgroup v1 memory controller at /sys/fs/cgroup/memory (mount -t cgroup -o memory cgroup /sys/fs/cgroup/memory)";
        if !Path::new(ROOT).join("memory.limit_in_bytes").exists() {
            return Err(format!("no {ROOT}/memory.limit_in_bytes: {needs}"));
        }
        let dir = Path::new(ROOT).join(format!("uplink-bench-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}; {needs}", dir.display()))?;
        let cgroup = MemoryCgroup { dir };
        write(
            &cgroup.dir.join("memory.limit_in_bytes"),
            &limit_bytes.to_string(),
        )
        .map_err(|e| format!("set memory.limit_in_bytes of {}: {e}", cgroup.dir.display()))?;
        Ok(cgroup)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A command prefix that runs a program in the cgroup from its start, children
    /// included, so everything it uses is charged here: a shell moves itself in, then
    /// `exec`s the program and arguments that follow the prefix.
    pub fn wrapper(&self) -> Vec<String> {
        vec![
            "sh".into(),
            "-c".into(),
            "echo $$ > \"$0/cgroup.procs\" && exec \"$@\"".into(),
            self.dir.display().to_string(),
        ]
    }

    /// Peak memory use (processes' memory and page cache) since the last [`Self::reset_peak`].
    pub fn peak_bytes(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("memory.max_usage_in_bytes"))
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn reset_peak(&self) {
        write(&self.dir.join("memory.max_usage_in_bytes"), "0").ok();
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let ours = memory_cgroup_of("self").unwrap_or_else(|| PathBuf::from(ROOT));
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Err(e) = write(&ours.join("cgroup.procs"), pid) {
                eprintln!("uplink-bench: move {pid} back to {}: {e}", ours.display());
            }
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!(
                "uplink-bench: remove {} (rmdir it by hand): {e}",
                self.dir.display()
            );
        }
    }
}

/// Drops `path`'s pages from the page cache (`posix_fadvise(DONTNEED)` through GNU dd's
/// `iflag=nocache count=0`); the file must have been synced (dirty pages stay). Checked
/// with util-linux `fincore` where it is installed.
pub fn drop_page_cache(path: &Path) {
    let status = std::process::Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["iflag=nocache", "count=0", "status=none"])
        .status()
        .expect("run dd");
    assert!(
        status.success(),
        "dd iflag=nocache of {}: {status}",
        path.display()
    );
    if let Some(cached) = cached_bytes(path) {
        assert_eq!(
            cached,
            0,
            "{} still cached after dd iflag=nocache",
            path.display()
        );
    }
}

/// Bytes of `path` in the page cache (`fincore`), if fincore runs.
pub fn cached_bytes(path: &Path) -> Option<u64> {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}
