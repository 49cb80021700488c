//! Following things as they happen, driven by the event feed (`GET /v1/events`, long-poll):
//! an upload asked of a gateway (`upload --follow`), a command (`config --wait`), and the
//! feed itself (`events --follow`).
//!
//! The feed wakes the client the moment something happens to the command or its session
//! (`command.ack`, `session.create`, `session.transition`, …); the session's `bytes_done`
//! (progress reports do not make events) is read after each wake-up, and at the latest
//! every [`PROGRESS_WAIT_SECS`], the long-poll's wait.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use crate::api::{query, seg, Api};
use crate::error::{usage, CtlError, Result};
use crate::output::{json_line, text, time};
use crate::units::{human_bytes, human_secs};

/// The long-poll's wait while following an upload: the longest the shown progress lags.
const PROGRESS_WAIT_SECS: u64 = 1;

/// `GET /v1/events` with these parameters.
async fn events_page(
    api: &Api,
    after: i64,
    limit: u32,
    wait: u64,
    project: Option<&str>,
) -> Result<(Vec<Value>, i64)> {
    let path = format!(
        "/v1/events{}",
        query(&[
            ("after", Some(after.to_string())),
            ("limit", Some(limit.to_string())),
            ("wait", (wait > 0).then(|| wait.to_string())),
            ("project_id", project.map(str::to_string)),
        ])
    );
    let page = if wait > 0 {
        api.get_long(&path, wait).await?
    } else {
        api.get(&path).await?
    };
    let events = page["events"].as_array().cloned().unwrap_or_default();
    let next = page["next"].as_i64().unwrap_or(after);
    Ok((events, next))
}

/// SIGINT (Ctrl-C), caught from now on (registered at once, not when first awaited).
fn interrupts() -> Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| CtlError::Failed(format!("cannot catch Ctrl-C: {e}")))
}

/// Long-polls can come back at once with nothing (an API whose `long_poll_max_secs` is 0):
/// then wait out the rest of `at_least`, so following never spins.
async fn pace(started: Instant, got_events: bool, at_least: Duration) {
    if !got_events {
        if let Some(rest) = at_least.checked_sub(started.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
}

/// The `seq` of the newest event the caller sees (of `project`), without reading the log:
/// the smallest `after` with nothing after it, found by doubling then bisecting (about
/// 2·log2(newest) small requests).
pub async fn newest_seq(api: &Api, project: Option<&str>) -> Result<i64> {
    let empty_after = |after: i64| async move {
        events_page(api, after, 1, 0, project)
            .await
            .map(|(events, _)| events.is_empty())
    };
    if empty_after(0).await? {
        return Ok(0);
    }
    // Invariant: something after `lo`, nothing after `hi`.
    let (mut lo, mut hi) = (0i64, 1024i64);
    while !empty_after(hi).await? {
        lo = hi;
        hi = hi.saturating_mul(4);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if empty_after(mid).await? {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

/// Retries a following loop's call while the API is unreachable (it may be restarting);
/// a refusal ends the loop. Says once on stderr that it waits.
struct Patience {
    since: Option<Instant>,
}

impl Patience {
    fn new() -> Patience {
        Patience { since: None }
    }

    /// `Ok(None)`: retry after a pause.
    async fn take<T>(&mut self, r: Result<T>) -> Result<Option<T>> {
        match r {
            Ok(v) => {
                if self.since.take().is_some() {
                    eprintln!("note: the API answers again");
                }
                Ok(Some(v))
            }
            Err(CtlError::Unavailable(why)) => {
                if self.since.is_none() {
                    eprintln!("note: {why}; still trying (Ctrl-C to stop)");
                    self.since = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// How an upload ended.
enum End {
    Done(Value),
    Failed { reason: String, doc: Value },
}

fn is_final_command(state: &str) -> bool {
    matches!(state, "done" | "failed" | "rejected" | "expired")
}

/// Where an upload stands, and how it is shown.
struct Display {
    json: bool,
    bar: Option<ProgressBar>,
    command_id: String,
    last: Option<(String, String, u64)>,
    last_line: Instant,
    sized: bool,
    /// When the session was first seen `uploading`, and its bytes then.
    uploading_since: Option<(Instant, u64)>,
}

impl Display {
    fn new(json: bool, command_id: &str, device: &str) -> Display {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_message(format!("waiting for {device} to start the upload"));
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Display {
            json,
            bar,
            command_id: command_id.to_string(),
            last: None,
            last_line: Instant::now() - Duration::from_secs(60),
            sized: false,
            uploading_since: None,
        }
    }

    fn show(&mut self, cmd: &Value, session: Option<&Value>) {
        let command_state = text(&cmd["state"]);
        let state = session.map_or_else(String::new, |s| text(&s["state"]));
        let done = session.and_then(|s| s["bytes_done"].as_u64()).unwrap_or(0);
        let size = session.and_then(|s| s["size"].as_u64());
        let reported = session.and_then(|s| s["rate_bps"].as_u64()).unwrap_or(0);
        if state == "uploading" && self.uploading_since.is_none() {
            self.uploading_since = Some((Instant::now(), done));
        }
        // The gateway's rate when it reports one, else the average since uploading began.
        let rate = match self.uploading_since {
            _ if reported > 0 => reported,
            Some((t, from)) if done > from && t.elapsed() >= Duration::from_millis(200) => {
                ((done - from) as f64 / t.elapsed().as_secs_f64()) as u64
            }
            _ => 0,
        };
        let now = (command_state.clone(), state.clone(), done);
        let changed = self.last.as_ref() != Some(&now);
        let state_changed = self
            .last
            .as_ref()
            .is_none_or(|l| l.0 != now.0 || l.1 != now.1);
        self.last = Some(now);
        let eta = match (size, rate) {
            (Some(size), r) if r > 0 && size > done => Some((size - done).div_ceil(r)),
            _ => None,
        };
        if self.json {
            if changed {
                json_line(&json!({
                    "event": "progress",
                    "command_id": self.command_id,
                    "command_state": command_state,
                    "session_id": session.map(|s| s["session_id"].clone()),
                    "state": session.map(|s| s["state"].clone()),
                    "bytes_done": done,
                    "size": size,
                    "rate_bps": rate,
                    "eta_secs": eta,
                }));
            }
            return;
        }
        let what = if state.is_empty() {
            format!("command {command_state}")
        } else {
            state.clone()
        };
        if let Some(bar) = &self.bar {
            // Rate and ETA as the gateway measures them: bytes_done moves a whole part at
            // a time, the gateway's rate moves with every chunk sent.
            let rate_eta = || {
                format!(
                    "{}/s ETA {}",
                    human_bytes(rate),
                    eta.map_or_else(|| "-".into(), human_secs)
                )
            };
            if let Some(size) = size {
                if !self.sized {
                    self.sized = true;
                    bar.set_length(size);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{spinner} {prefix:10} [{bar:30}] {binary_bytes}/{binary_total_bytes} {msg}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                }
                bar.set_position(done.min(size));
                bar.set_prefix(what);
                bar.set_message(rate_eta());
            } else {
                bar.set_message(what);
            }
            return;
        }
        // Not a terminal: a line per change of state, and progress at most every 5 s.
        if state_changed || (changed && self.last_line.elapsed() >= Duration::from_secs(5)) {
            self.last_line = Instant::now();
            match size {
                Some(size) if size > 0 => println!(
                    "{what}: {} / {} ({}%){}{}",
                    human_bytes(done),
                    human_bytes(size),
                    done * 100 / size,
                    if rate > 0 {
                        format!(", {}/s", human_bytes(rate))
                    } else {
                        String::new()
                    },
                    eta.map(|e| format!(", ETA {}", human_secs(e)))
                        .unwrap_or_default(),
                ),
                _ => println!("{what}"),
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Splits `robot-17:/data/x.mcap`.
pub fn split_target(target: &str) -> Result<(&str, &str)> {
    match target.split_once(':') {
        Some((device, path)) if !device.is_empty() && path.starts_with('/') => Ok((device, path)),
        _ => Err(usage(format!(
            "{target:?} is not DEVICE:/absolute/path (e.g. robot-17:/data/rec/run-042.mcap)"
        ))),
    }
}

pub struct UploadRequest<'a> {
    pub device: &'a str,
    pub path: &'a str,
    pub priority: Option<u8>,
    pub follow: bool,
    pub timeout: Option<Duration>,
}

/// Sends the upload command and, when following, shows it to its end.
pub async fn upload(api: &Api, req: UploadRequest<'_>, json: bool) -> Result<()> {
    let device = api.get(&format!("/v1/devices/{}", seg(req.device))).await?;
    let project = device["project_id"].as_str().map(str::to_string);
    let cursor = if req.follow {
        newest_seq(api, project.as_deref()).await?
    } else {
        0
    };
    // Ctrl-C is caught from before the command is sent: it only stops following.
    let mut sigint = interrupts()?;
    let mut body = json!({"type": "upload", "path": req.path});
    if let Some(p) = req.priority {
        body["priority"] = json!(p);
    }
    let started = Instant::now();
    let cmd = api
        .post(
            &format!("/v1/devices/{}/commands", seg(req.device)),
            Some(body),
        )
        .await?;
    let command_id = text(&cmd["command_id"]);
    if json {
        json_line(&json!({
            "event": "command",
            "command_id": command_id,
            "device_id": req.device,
            "path": req.path,
            "command_state": cmd["state"],
        }));
    } else if !req.follow {
        println!(
            "command {command_id} sent to {} ({})",
            req.device,
            text(&cmd["state"])
        );
        println!("follow it: uplinkctl commands show {command_id}");
    } else if !std::io::stderr().is_terminal() {
        println!("command {command_id} sent to {}", req.device);
    }
    if !req.follow {
        return Ok(());
    }
    let mut display = Display::new(json, &command_id, req.device);
    let end = tokio::select! {
        end = follow_upload(api, &mut display, cmd, cursor, project.as_deref(), req.device, req.timeout) => end,
        _ = sigint.recv() => {
            display.finish();
            return Err(CtlError::Interrupted(format!(
                "stopped following; the upload goes on: uplinkctl commands show {command_id}"
            )));
        }
    };
    display.finish();
    let end = end?;
    match end {
        End::Done(session) => {
            let size = session["size"].as_u64().unwrap_or(0);
            let elapsed = started.elapsed().as_secs_f64();
            if json {
                json_line(&json!({
                    "event": "done",
                    "command_id": command_id,
                    "device_id": req.device,
                    "path": req.path,
                    "session_id": session["session_id"],
                    "bucket": session["bucket"],
                    "object_key": session["object_key"],
                    "size": session["size"],
                    "sha256": session["sha256"],
                    "digest_check": session["digest_check"],
                    "deduplicated_from": session["deduplicated_from"],
                    "elapsed_secs": (elapsed * 10.0).round() / 10.0,
                }));
            } else {
                let check = match session["digest_check"].as_str() {
                    Some("verified") => "SHA-256 verified by the API",
                    Some("pending") => "SHA-256 check by the API pending",
                    _ => "SHA-256 as the device computed it",
                };
                let dedupe = if session["deduplicated_from"].is_null() {
                    String::new()
                } else {
                    format!(
                        ", deduplicated from {}",
                        text(&session["deduplicated_from"])
                    )
                };
                println!(
                    "object  s3://{}/{}",
                    text(&session["bucket"]),
                    text(&session["object_key"])
                );
                println!("sha256  {} ({check})", text(&session["sha256"]));
                println!(
                    "done: {} uploaded in {:.1} s ({}/s){dedupe}",
                    human_bytes(size),
                    elapsed,
                    human_bytes((size as f64 / elapsed.max(0.001)) as u64),
                );
            }
            Ok(())
        }
        End::Failed { reason, doc } => {
            if json {
                json_line(&doc);
            }
            Err(CtlError::Failed(format!("upload failed: {reason}")))
        }
    }
}

async fn follow_upload(
    api: &Api,
    display: &mut Display,
    mut cmd: Value,
    mut cursor: i64,
    project: Option<&str>,
    device: &str,
    timeout: Option<Duration>,
) -> Result<End> {
    let command_id = text(&cmd["command_id"]);
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut session_id: Option<String> = None;
    let mut session: Option<Value> = None;
    let mut patience = Patience::new();
    let mut refresh_command = true;
    display.show(&cmd, None);
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(CtlError::Failed(format!(
                "not finished within --timeout; the upload goes on: uplinkctl commands show {command_id}"
            )));
        }
        // Wake-up: something happened, or the wait is up.
        let polled = Instant::now();
        let page = events_page(api, cursor, 1000, PROGRESS_WAIT_SECS, project).await;
        let Some((events, next)) = patience.take(page).await? else {
            continue;
        };
        pace(polled, !events.is_empty(), Duration::from_millis(500)).await;
        cursor = next;
        for e in &events {
            let subject = text(&e["subject"]);
            let action = e["action"].as_str().unwrap_or("");
            if subject == command_id {
                refresh_command = true;
                if let Some(s) = e["detail"]["session_id"].as_str() {
                    session_id = Some(s.to_string());
                }
            }
            if matches!(action, "session.create" | "session.deduplicated")
                && (e["detail"]["job_id"] == command_id.as_str()
                    || e["detail"]["command_id"] == command_id.as_str())
            {
                session_id = Some(subject.clone());
            }
        }
        if refresh_command || session_id.is_none() {
            let Some(c) = patience
                .take(api.get(&format!("/v1/commands/{}", seg(&command_id))).await)
                .await?
            else {
                continue;
            };
            cmd = c;
            refresh_command = false;
            if let Some(s) = cmd["session_id"].as_str() {
                session_id = Some(s.to_string());
            }
        }
        // A session whose creation event was missed: the device's newest sessions.
        if session_id.is_none() && matches!(cmd["state"].as_str(), Some("accepted" | "done")) {
            let path = format!(
                "/v1/sessions{}",
                query(&[
                    ("device_id", Some(device.to_string())),
                    ("limit", Some("50".into()))
                ])
            );
            if let Some(list) = patience.take(api.get(&path).await).await? {
                session_id = list
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|s| s["command_id"] == command_id.as_str())
                    .and_then(|s| s["session_id"].as_str())
                    .map(str::to_string);
            }
        }
        if let Some(sid) = &session_id {
            if let Some(s) = patience
                .take(api.get(&format!("/v1/sessions/{}", seg(sid))).await)
                .await?
            {
                session = Some(s);
            }
        }
        display.show(&cmd, session.as_ref());
        let state = session
            .as_ref()
            .and_then(|s| s["state"].as_str())
            .unwrap_or("");
        let failed = |reason: String, s: Option<&Value>, cmd: &Value| End::Failed {
            doc: json!({
                "event": "failed",
                "command_id": command_id,
                "command_state": cmd["state"],
                "session_id": s.map(|s| s["session_id"].clone()),
                "state": s.map(|s| s["state"].clone()),
                "reason": reason,
            }),
            reason,
        };
        match state {
            "completed" => {
                let s = session.unwrap_or_default();
                return Ok(End::Done(wait_digest(api, s).await));
            }
            "failed" | "aborted" | "expired" => {
                let reason = session
                    .as_ref()
                    .and_then(|s| s["error"].as_str())
                    .map(str::to_string)
                    .or_else(|| cmd["reason"].as_str().map(str::to_string))
                    .unwrap_or_else(|| format!("session {state}"));
                return Ok(failed(
                    format!("session {state}: {reason}"),
                    session.as_ref(),
                    &cmd,
                ));
            }
            _ => {}
        }
        let cstate = cmd["state"].as_str().unwrap_or("");
        if is_final_command(cstate) && cstate != "done" {
            let reason = cmd["reason"].as_str().map_or_else(
                || format!("command {cstate}"),
                |r| format!("command {cstate}: {r}"),
            );
            return Ok(failed(reason, session.as_ref(), &cmd));
        }
    }
}

/// After completion the API hashes the stored object (`digest_check`); waits up to 10 s for
/// that verdict so the SHA-256 shown is one the API computed. A `mismatch` is reported as
/// it is (the caller sees `digest_check`).
async fn wait_digest(api: &Api, mut session: Value) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    while session["digest_check"] == "pending" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sid = text(&session["session_id"]);
        match api.get(&format!("/v1/sessions/{}", seg(&sid))).await {
            Ok(s) => session = s,
            Err(_) => break,
        }
    }
    session
}

/// Waits until a command is final (`config --wait`), woken by its events.
pub async fn wait_command(
    api: &Api,
    mut cmd: Value,
    project: Option<&str>,
    cursor: i64,
) -> Result<Value> {
    let command_id = text(&cmd["command_id"]);
    let mut cursor = cursor;
    let mut patience = Patience::new();
    while !is_final_command(cmd["state"].as_str().unwrap_or("")) {
        let polled = Instant::now();
        let page = events_page(api, cursor, 1000, 5, project).await;
        let Some((events, next)) = patience.take(page).await? else {
            continue;
        };
        pace(polled, !events.is_empty(), Duration::from_secs(1)).await;
        cursor = next;
        if let Some(c) = patience
            .take(api.get(&format!("/v1/commands/{}", seg(&command_id))).await)
            .await?
        {
            cmd = c;
        }
    }
    Ok(cmd)
}

pub struct EventsRequest<'a> {
    pub follow: bool,
    pub project: Option<&'a str>,
    pub after: Option<i64>,
    pub limit: u32,
    pub actions: &'a [String],
}

/// Prints events; with `follow`, keeps long-polling for new ones until interrupted.
pub async fn events(api: &Api, req: EventsRequest<'_>, json: bool) -> Result<()> {
    let mut sigint = interrupts()?;
    let mut cursor = match req.after {
        Some(a) => a,
        None => {
            let newest = newest_seq(api, req.project).await?;
            if req.follow {
                newest
            } else {
                (newest - i64::from(req.limit)).max(0)
            }
        }
    };
    let mut patience = Patience::new();
    let wanted = |e: &Value| {
        req.actions.is_empty()
            || req
                .actions
                .iter()
                .any(|a| e["action"].as_str() == Some(a.as_str()))
    };
    if !json && !req.follow {
        println!(
            "{:>7}  {:19}  {:22}  {:38}  DETAIL",
            "SEQ", "AT", "ACTION", "SUBJECT"
        );
    }
    loop {
        let wait = if req.follow { 30 } else { 0 };
        let polled = Instant::now();
        let page = tokio::select! {
            p = events_page(api, cursor, req.limit, wait, req.project) => p,
            _ = sigint.recv() => return Ok(()),
        };
        let (events, next) = if req.follow {
            match patience.take(page).await? {
                Some(p) => p,
                None => continue,
            }
        } else {
            page?
        };
        for e in events.iter().filter(|e| wanted(e)) {
            if json {
                json_line(e);
            } else {
                println!("{}", event_line(e));
            }
        }
        cursor = next;
        if !req.follow {
            return Ok(());
        }
        pace(polled, !events.is_empty(), Duration::from_secs(1)).await;
    }
}

/// `   1234  2026-12-06 06:18:59  session.transition      7f1c…  uploading → completed`
fn event_line(e: &Value) -> String {
    let d = &e["detail"];
    let detail = match e["action"].as_str() {
        Some("session.transition") => {
            let mut s = format!("{} → {}", text(&d["from"]), text(&d["to"]));
            if let Some(err) = d["error"].as_str() {
                s.push_str(&format!(" ({err})"));
            }
            s
        }
        Some("command.ack") => {
            let mut s = text(&d["state"]);
            if let Some(r) = d["reason"].as_str() {
                s.push_str(&format!(": {r}"));
            }
            s
        }
        _ => match d {
            Value::Object(m) if m.is_empty() => String::new(),
            Value::Null => String::new(),
            other => {
                let s = other.to_string();
                if s.chars().count() > 160 {
                    format!("{}…", s.chars().take(160).collect::<String>())
                } else {
                    s
                }
            }
        },
    };
    format!(
        "{:>7}  {:19}  {:22}  {:38}  {} [{}]",
        text(&e["seq"]),
        time(&e["at"]),
        text(&e["action"]),
        text(&e["subject"]),
        detail,
        text(&e["actor"]),
    )
}
