//! Commands for the person on the gateway: `status`, `upload`, `doctor` and
//! `print-default-config`. Formatting (progress bars, sizes, ETA) is pure code, tested below;
//! the commands themselves print to stdout and return their exit code.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use serde_json::json;
use uplink_protocol::sign;
use uplink_protocol::telemetry::JobState;
use uplink_protocol::unix_now;
use uuid::Uuid;

use crate::config::{self, Config, ConfigError, Secret};
use crate::store::{self, JobRecord, NewJob, StoreError};
use crate::{flow, policy};
use uplink_protocol::flow::DEFAULT_PRIORITY;

/// Exit codes (also listed in `--help`).
pub const EXIT_OK: u8 = 0;
/// `doctor`: a check failed; any command: an error (configuration, database).
pub const EXIT_FAIL: u8 = 1;
/// `upload`: the path policy refused the file.
pub const EXIT_REFUSED: u8 = 2;

/// The commented default configuration `print-default-config` prints.
pub const DEFAULT_CONFIG: &str = include_str!("default-agent.toml");

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("no state database at {0} (has the agent run yet? check state_dir)")]
    NoDatabase(PathBuf),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

// ---- formatting ------------------------------------------------------------------------------

/// `[#####-----]` with `width` cells; empty when the total is unknown.
pub fn progress_bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        0
    } else {
        ((done.min(total) as u128 * width as u128) / total as u128) as usize
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// Percent done, one decimal (`None` when the total is unknown).
pub fn percent(done: u64, total: u64) -> Option<f64> {
    (total > 0).then(|| (done.min(total) as f64 * 1000.0 / total as f64).floor() / 10.0)
}

/// `1.5 GiB`, `12.0 MiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `42s`, `3m05s`, `2h07m`, `3d04h`.
pub fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Seconds left at `rate` bytes/s (`None` when the rate is unknown or zero).
pub fn eta_secs(done: u64, total: u64, rate: u64) -> Option<u64> {
    (rate > 0 && total > 0).then(|| total.saturating_sub(done).div_ceil(rate))
}

/// What `status` shows for one job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    pub job: JobRecord,
    pub bytes_done: u64,
    /// Average upload rate since the job was created (uploading jobs only).
    pub rate_bps: Option<u64>,
    /// `upload_window` when the job has parts to send but every upload window is closed.
    pub waiting_for: Option<&'static str>,
}

impl JobView {
    pub fn new(job: JobRecord, bytes_done: u64, now: i64) -> JobView {
        let elapsed = now.saturating_sub(job.created_at);
        let rate_bps = (job.state == JobState::Uploading && elapsed > 0 && bytes_done > 0)
            .then(|| bytes_done / elapsed as u64);
        JobView {
            job,
            bytes_done,
            rate_bps,
            waiting_for: None,
        }
    }

    fn total(&self) -> u64 {
        self.job
            .identity
            .map(|i| i.size)
            .unwrap_or(self.job.bytes_total)
    }

    fn done(&self) -> u64 {
        if self.job.state == JobState::Done {
            self.total()
        } else {
            self.bytes_done
        }
    }

    fn eta(&self) -> Option<u64> {
        self.rate_bps
            .and_then(|r| eta_secs(self.done(), self.total(), r))
    }

    /// Two lines: id, state, origin and path; then the bar, bytes, rate, ETA and error.
    pub fn text(&self) -> String {
        let (done, total) = (self.done(), self.total());
        let mut out = format!(
            "{}  {:<10}  {:<7}  {}\n    {} ",
            self.job.id,
            self.job.state.as_str(),
            if self.job.local { "local" } else { "command" },
            self.job.path.display(),
            progress_bar(done, total, 30),
        );
        match percent(done, total) {
            Some(p) => {
                let _ = write!(
                    out,
                    "{p:5.1}%  {} / {}",
                    human_bytes(done),
                    human_bytes(total)
                );
            }
            None => out.push_str("  size not known yet"),
        }
        if let Some(rate) = self.rate_bps {
            let _ = write!(out, "  {}/s avg", human_bytes(rate));
        }
        if let Some(eta) = self.eta() {
            let _ = write!(out, "  ETA {}", human_duration(eta));
        }
        if self.job.priority != DEFAULT_PRIORITY {
            let _ = write!(out, "  priority {}", self.job.priority);
        }
        if self.waiting_for == Some("upload_window") {
            out.push_str("  (waiting for an upload window)");
        }
        if let Some(e) = &self.job.error {
            let _ = write!(out, "\n    last error: {e}");
        }
        out
    }

    pub fn json(&self) -> serde_json::Value {
        let (done, total) = (self.done(), self.total());
        json!({
            "job_id": self.job.id,
            "local": self.job.local,
            "path": self.job.path,
            "file_name": self.job.file_name,
            "state": self.job.state.as_str(),
            "priority": self.job.priority,
            "waiting_for": self.waiting_for,
            "session_id": self.job.session_id,
            "bytes_done": done,
            "bytes_total": total,
            "percent": percent(done, total),
            "rate_bps": self.rate_bps,
            "eta_secs": self.eta(),
            "sha256": self.job.sha256,
            "error": self.job.error,
            "created_at": self.job.created_at,
            "updated_at": self.job.updated_at,
        })
    }
}

// ---- status ----------------------------------------------------------------------------------

/// Opens `agent.db` read-only (the running agent keeps writing; WAL lets both work).
fn open_read_only(state_dir: &Path) -> Result<Connection, CliError> {
    let path = state_dir.join(store::DB_FILE);
    if !path.exists() {
        return Err(CliError::NoDatabase(path));
    }
    let conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(StoreError::from)?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(StoreError::from)?;
    Ok(conn)
}

/// Jobs, newest first, as `JobView`s.
pub fn job_views(state_dir: &Path, limit: u32) -> Result<Vec<JobView>, CliError> {
    let conn = open_read_only(state_dir)?;
    let now = unix_now();
    let jobs = store::list_jobs(&conn, limit)?;
    let mut views = Vec::with_capacity(jobs.len());
    for job in jobs {
        let done = store::bytes_done(&conn, job.id)?;
        views.push(JobView::new(job, done, now));
    }
    Ok(views)
}

/// The effective flow settings (the file plus stored `config` overrides) and whether any
/// override is in force.
pub fn flow_settings(cfg: &Config) -> Result<(flow::Settings, bool), CliError> {
    let conn = open_read_only(&cfg.state_dir)?;
    let overrides = store::flow_overrides(&conn)?.unwrap_or_default();
    let effective = flow::Settings::from_config(cfg).with(&overrides);
    Ok((effective, !overrides.is_empty()))
}

/// One line on the flow settings, e.g. `flow: bandwidth 64.0 KiB/s, windows 22:00-06:00
/// (closed now), concurrency 4 (2 per job), set by a config command`.
pub fn flow_text(s: &flow::Settings, open: bool, overridden: bool) -> String {
    let bandwidth = match s.max_upload_bytes_per_sec {
        0 => "unlimited".to_string(),
        n => format!("{}/s", human_bytes(n)),
    };
    format!(
        "flow: bandwidth {bandwidth}, windows {} ({} now), concurrency {} ({} per job){}",
        s.windows_text(),
        if open { "open" } else { "closed" },
        s.concurrency,
        s.per_job(),
        if overridden {
            ", changed by a config command"
        } else {
            ""
        }
    )
}

/// `status`: prints the flow settings and the jobs (newest first) as text, or the jobs as
/// JSON.
pub fn status(file: Option<&Path>, as_json: bool, limit: u32) -> Result<u8, CliError> {
    let cfg = config::load(file)?;
    let mut views = job_views(&cfg.state_dir, limit)?;
    let (settings, overridden) = flow_settings(&cfg)?;
    let open = settings.open_at(flow::local_minute());
    if !open {
        for v in &mut views {
            if matches!(
                v.job.state,
                JobState::Queued | JobState::Open | JobState::Uploading
            ) && !v.job.pause_requested
            {
                v.waiting_for = Some("upload_window");
            }
        }
    }
    if !as_json {
        println!("{}", flow_text(&settings, open, overridden));
    }
    if as_json {
        let list: Vec<serde_json::Value> = views.iter().map(JobView::json).collect();
        println!("{}", serde_json::Value::Array(list));
    } else if views.is_empty() {
        println!("no jobs");
    } else {
        for v in &views {
            println!("{}", v.text());
        }
    }
    Ok(EXIT_OK)
}

// ---- upload ----------------------------------------------------------------------------------

/// `upload FILE`: checks the path policy and queues a local job for the running agent.
/// `priority` (0..=9, checked by the caller) places it among the queued jobs.
pub fn upload(file: Option<&Path>, path: &Path, priority: Option<u8>) -> Result<u8, CliError> {
    let loaded = config::load_and_validate(file)?;
    let absolute = std::path::absolute(path)?;
    let canonical = match policy::check(&absolute.to_string_lossy(), &loaded.roots) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("refused: {e}");
            eprintln!(
                "allowed roots: {}",
                loaded
                    .roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            return Ok(EXIT_REFUSED);
        }
    };
    let file_name = canonical
        .file_name()
        .or_else(|| absolute.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let job = NewJob {
        id: Uuid::new_v4(),
        action: String::new(),
        path: canonical.clone(),
        file_name,
        create_request_id: format!("create-{}", Uuid::new_v4().simple()),
        priority: priority.unwrap_or(DEFAULT_PRIORITY),
    };
    let mut conn = store::open(&loaded.config.state_dir)?;
    store::queue_local_upload(&mut conn, &job, unix_now())?;
    println!("{}", job.id);
    eprintln!(
        "queued {}; the running agent starts it within 2 s (`uplink-agent status` shows it)",
        canonical.display()
    );
    Ok(EXIT_OK)
}

// ---- doctor ----------------------------------------------------------------------------------

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Ok(String),
    NotChecked(String),
    Fail(String),
}

impl Check {
    pub fn line(&self, name: &str) -> String {
        match self {
            Check::Ok(d) if d.is_empty() => format!("{name:<20} ok"),
            Check::Ok(d) => format!("{name:<20} ok: {d}"),
            Check::NotChecked(why) => format!("{name:<20} ok: not checked ({why})"),
            Check::Fail(why) => format!("{name:<20} FAIL: {why}"),
        }
    }
}

/// Parses an HTTP `Date` (IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`) to Unix seconds.
pub fn parse_http_date(s: &str) -> Option<i64> {
    let mut w = s.split_whitespace().skip(1);
    let day: i64 = w.next()?.parse().ok()?;
    let month = match w.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = w.next()?.parse().ok()?;
    let mut hms = w.next()?.split(':').map(|p| p.parse::<i64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if w.next()? != "GMT" {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

/// Largest clock difference with the API that `doctor` accepts.
pub const MAX_SKEW_SECS: i64 = 60;
/// The control API's default replay window: signed requests and MQTT passwords further
/// than this from its clock are refused.
pub const REPLAY_WINDOW_SECS: i64 = 300;
/// Free space below this fails `doctor` (parts are read from the files, but SQLite and logs
/// need room).
pub const MIN_FREE_BYTES: u64 = 256 * 1024 * 1024;

fn free_bytes(dir: &Path) -> Result<u64, String> {
    let out = std::process::Command::new("df")
        .arg("-Pk")
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot run df: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "df failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let kib: u64 = text
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "cannot read df's output".to_string())?;
    Ok(kib * 1024)
}

fn check_state_dir(dir: &Path) -> Check {
    if let Err(e) = std::fs::create_dir_all(dir) {
        return Check::Fail(format!("cannot create {}: {e}", dir.display()));
    }
    let probe = dir.join(format!(".doctor-{}", Uuid::new_v4().simple()));
    match std::fs::write(&probe, b"ok") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            Check::Ok(format!("{} is writable", dir.display()))
        }
        Err(e) => Check::Fail(format!("cannot write in {}: {e}", dir.display())),
    }
}

async fn check_mqtt(cfg: &Config, key: &sign::PrivateKey, password: Option<&Secret>) -> Check {
    use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet};
    let mut opts = MqttOptions::new(cfg.device_id.clone(), cfg.mqtt.host.clone(), cfg.mqtt.port);
    opts.set_keep_alive(Duration::from_secs(10))
        .set_clean_session(true);
    let user = cfg
        .mqtt
        .username
        .clone()
        .unwrap_or_else(|| cfg.device_id.clone());
    let password = match password {
        Some(p) => p.expose().to_string(),
        None => sign::mqtt_password(key, &cfg.device_id, unix_now()),
    };
    opts.set_credentials(user, password);
    if let Some(files) = crate::tls::mqtt_files(&cfg.mqtt) {
        match crate::tls::transport(&files) {
            Ok(t) => {
                opts.set_transport(t);
            }
            Err(e) => return Check::Fail(format!("TLS settings: {e}")),
        }
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 4);
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    let check = match outcome {
        Ok(Ok(())) => Check::Ok(format!("CONNECT as {} accepted", cfg.device_id)),
        Ok(Err(ConnectionError::ConnectionRefused(code))) => {
            Check::Fail(format!("CONNECT refused: {code:?}"))
        }
        Ok(Err(e)) => match uplink_service::tls::explain(&e) {
            Some(why) => Check::Fail(format!(
                "TLS handshake with {}:{} failed: {why}",
                cfg.mqtt.host, cfg.mqtt.port
            )),
            None => Check::Fail(format!("CONNECT failed: {e}")),
        },
        Err(_) => Check::Fail("no CONNACK within 5 s".into()),
    };
    if matches!(check, Check::Ok(_)) {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    check
}

async fn check_clock(api_url: Option<&str>, https_ca_file: Option<&Path>) -> Check {
    let Some(url) = api_url else {
        return Check::NotChecked("set api_url to compare with the API's clock".into());
    };
    let builder = match crate::tls::https(reqwest::Client::builder(), https_ca_file) {
        Ok(b) => b,
        Err(e) => return Check::Fail(format!("https_ca_file: {e}")),
    };
    let client = match builder.timeout(Duration::from_secs(5)).build() {
        Ok(c) => c,
        Err(e) => return Check::Fail(format!("HTTP client: {e}")),
    };
    let response = match client.get(url).send().await {
        Ok(r) => r,
        Err(e) => {
            let why = uplink_service::tls::explain(&e)
                .map_or_else(|| e.without_url().to_string(), |w| format!("TLS: {w}"));
            return Check::Fail(format!("cannot reach api_url: {why}"));
        }
    };
    let Some(remote) = response
        .headers()
        .get(reqwest::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_http_date)
    else {
        return Check::NotChecked("the API sent no Date header".into());
    };
    let skew = unix_now() - remote;
    if skew.abs() > REPLAY_WINDOW_SECS {
        Check::Fail(format!(
            "{skew:+} s: {}",
            crate::clock::describe(skew, Some(REPLAY_WINDOW_SECS as u64))
        ))
    } else if skew.abs() > MAX_SKEW_SECS {
        Check::Fail(format!(
            "{skew:+} s (more than {MAX_SKEW_SECS} s): {}",
            crate::clock::describe(skew, None)
        ))
    } else {
        Check::Ok(format!("{skew:+} s from the API"))
    }
}

/// `doctor`: runs every check, prints one line each; exit 0 when all are ok, 1 otherwise.
pub async fn doctor(file: Option<&Path>) -> u8 {
    let mut failed = false;
    let mut report = |name: &str, check: Check| {
        failed |= matches!(check, Check::Fail(_));
        println!("{}", check.line(name));
    };
    let cfg = match config::load(file) {
        Ok(c) => c,
        Err(e) => {
            report("config", Check::Fail(e.to_string().replace('\n', " ")));
            return EXIT_FAIL;
        }
    };
    match config::load_and_validate(file) {
        Ok(_) => report("config", Check::Ok(String::new())),
        Err(e) => report("config", Check::Fail(e.to_string().replace('\n', " "))),
    }
    let key = match std::fs::read_to_string(&cfg.key_file) {
        Ok(text) => match sign::decode_private(&text) {
            Ok(k) => {
                report(
                    "key file",
                    Check::Ok(format!(
                        "{}, public key {}",
                        cfg.key_file.display(),
                        sign::encode_public(&k.verifying_key())
                    )),
                );
                Some(k)
            }
            Err(e) => {
                report(
                    "key file",
                    Check::Fail(format!("{}: {e}", cfg.key_file.display())),
                );
                None
            }
        },
        Err(e) => {
            report(
                "key file",
                Check::Fail(format!("cannot read {}: {e}", cfg.key_file.display())),
            );
            None
        }
    };
    match sign::decode_public(&cfg.command_public_key) {
        Ok(_) => report("command public key", Check::Ok(String::new())),
        Err(e) => report("command public key", Check::Fail(e.to_string())),
    }
    report("state dir", check_state_dir(&cfg.state_dir));
    report(
        "disk space",
        match free_bytes(&cfg.state_dir) {
            Ok(free) if free < MIN_FREE_BYTES => Check::Fail(format!(
                "only {} free under {}",
                human_bytes(free),
                cfg.state_dir.display()
            )),
            Ok(free) => Check::Ok(format!("{} free", human_bytes(free))),
            Err(e) => Check::Fail(e),
        },
    );
    let addr = format!("{}:{}", cfg.mqtt.host, cfg.mqtt.port);
    let reachable = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(&addr),
    )
    .await;
    let tcp_ok = matches!(reachable, Ok(Ok(_)));
    report(
        "broker tcp",
        match reachable {
            Ok(Ok(_)) => Check::Ok(format!("{addr} reachable")),
            Ok(Err(e)) => Check::Fail(format!("{addr}: {e}")),
            Err(_) => Check::Fail(format!("{addr}: no answer within 3 s")),
        },
    );
    let mqtt = match (&key, tcp_ok, cfg.mqtt.static_password()) {
        (_, _, Err(problem)) => Check::Fail(problem.to_string()),
        (Some(key), true, Ok(password)) => check_mqtt(&cfg, key, password.as_ref()).await,
        (None, _, _) => Check::Fail("no usable device key".into()),
        (_, false, _) => Check::Fail("broker not reachable".into()),
    };
    report("mqtt connect", mqtt);
    report(
        "clock",
        check_clock(cfg.api_url.as_deref(), cfg.https_ca_file.as_deref()).await,
    );
    if failed {
        EXIT_FAIL
    } else {
        EXIT_OK
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hasher::FileIdentity;

    #[test]
    fn progress_bars() {
        assert_eq!(progress_bar(0, 100, 10), "[----------]");
        assert_eq!(progress_bar(50, 100, 10), "[#####-----]");
        assert_eq!(progress_bar(99, 100, 10), "[#########-]");
        assert_eq!(progress_bar(100, 100, 10), "[##########]");
        assert_eq!(progress_bar(200, 100, 4), "[####]");
        assert_eq!(progress_bar(5, 0, 4), "[----]");
        assert_eq!(percent(1, 3), Some(33.3));
        assert_eq!(percent(3, 3), Some(100.0));
        assert_eq!(percent(3, 0), None);
    }

    #[test]
    fn sizes_durations_and_eta() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(12 * 1024 * 1024), "12.0 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_duration(42), "42s");
        assert_eq!(human_duration(185), "3m05s");
        assert_eq!(human_duration(7620), "2h07m");
        assert_eq!(human_duration(273_600), "3d04h");
        assert_eq!(eta_secs(0, 100, 10), Some(10));
        assert_eq!(eta_secs(95, 100, 10), Some(1));
        assert_eq!(eta_secs(100, 100, 10), Some(0));
        assert_eq!(eta_secs(0, 100, 0), None);
        assert_eq!(eta_secs(0, 0, 10), None);
    }

    fn job(state: JobState, size: Option<u64>, created_at: i64) -> JobRecord {
        JobRecord {
            id: Uuid::nil(),
            path: "/data/a.bin".into(),
            file_name: "a.bin".into(),
            identity: size.map(|size| FileIdentity {
                size,
                mtime_ns: 0,
                inode: 1,
            }),
            part_size: None,
            sha256: None,
            create_request_id: "create-1".into(),
            session_id: None,
            state,
            error: None,
            bytes_total: size.unwrap_or(0),
            pause_requested: false,
            cancel_requested: false,
            created_at,
            updated_at: created_at,
            priority: DEFAULT_PRIORITY,
            local: true,
        }
    }

    #[test]
    fn job_view_text_and_json() {
        let mib = 1024 * 1024;
        let v = JobView::new(
            job(JobState::Uploading, Some(100 * mib), 1000),
            25 * mib,
            1010,
        );
        assert_eq!(v.rate_bps, Some(25 * mib / 10));
        let text = v.text();
        assert!(text.contains("uploading"), "{text}");
        assert!(text.contains("local"), "{text}");
        assert!(text.contains("[#######-----------------------]"), "{text}");
        assert!(text.contains(" 25.0%  25.0 MiB / 100.0 MiB"), "{text}");
        assert!(text.contains("2.5 MiB/s avg"), "{text}");
        assert!(text.contains("ETA 30s"), "{text}");
        let j = v.json();
        assert_eq!(j["state"], "uploading");
        assert_eq!(j["eta_secs"], 30);
        assert_eq!(j["bytes_done"], 25 * mib);

        let mut failed = job(JobState::Failed, None, 1000);
        failed.error = Some("file changed during upload".into());
        let text = JobView::new(failed, 0, 2000).text();
        assert!(text.contains("size not known yet"), "{text}");
        assert!(
            text.contains("last error: file changed during upload"),
            "{text}"
        );
        assert!(!text.contains("ETA"), "{text}");

        let mut waiting = JobView::new(job(JobState::Uploading, Some(10), 1000), 0, 1000);
        waiting.job.priority = 9;
        waiting.waiting_for = Some("upload_window");
        let text = waiting.text();
        assert!(text.contains("priority 9"), "{text}");
        assert!(text.contains("waiting for an upload window"), "{text}");
        assert_eq!(waiting.json()["waiting_for"], "upload_window");
        assert_eq!(waiting.json()["priority"], 9);

        // A done job shows its whole size, whatever the part table says.
        let done = JobView::new(job(JobState::Done, Some(10), 1000), 0, 2000);
        assert_eq!(done.json()["bytes_done"], 10);
        assert_eq!(done.json()["percent"], 100.0);
    }

    #[test]
    fn http_dates() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(
            parse_http_date("Mon, 23 Nov 2026 12:43:25 GMT"),
            Some(1_795_437_805)
        );
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 PST"), None);
        assert_eq!(parse_http_date("yesterday"), None);
    }

    #[test]
    fn check_lines() {
        assert_eq!(
            Check::Ok(String::new()).line("config"),
            format!("{:<20} ok", "config")
        );
        assert!(Check::Fail("nope".into()).line("x").ends_with("FAIL: nope"));
        assert!(Check::NotChecked("why".into())
            .line("clock")
            .ends_with("ok: not checked (why)"));
    }

    #[test]
    fn default_config_parses_and_documents_new_fields() {
        let cfg: Config = toml::from_str(DEFAULT_CONFIG).unwrap();
        assert_eq!(cfg.concurrency, 4);
        assert_eq!(cfg.metrics_listen, None);
        assert!(DEFAULT_CONFIG.contains("# metrics_listen = \"127.0.0.1:9464\""));
        assert!(DEFAULT_CONFIG.contains("# api_url"));
    }

    #[test]
    fn local_jobs_are_listed_and_read_only_status_works() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = store::open(dir.path()).unwrap();
        let job = NewJob {
            id: Uuid::new_v4(),
            action: String::new(),
            path: "/data/a.bin".into(),
            file_name: "a.bin".into(),
            create_request_id: "create-2".into(),
            priority: 9,
        };
        store::queue_local_upload(&mut conn, &job, 100).unwrap();
        assert_eq!(store::queued_local_jobs(&conn).unwrap(), vec![job.id]);
        let views = job_views(dir.path(), 10).unwrap();
        assert_eq!(views.len(), 1);
        assert!(views[0].job.local);
        assert_eq!(views[0].job.priority, 9);
        assert_eq!(views[0].job.state, JobState::Queued);
        assert!(matches!(
            job_views(&dir.path().join("nope"), 10),
            Err(CliError::NoDatabase(_))
        ));
    }
}
