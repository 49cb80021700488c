//! `uplinkctl`: the operator's command line for Uplink. It talks only to the control API's
//! public HTTP interface (docs/api.md); see docs/ctl.md for every command, the JSON shapes
//! and the exit codes.

mod api;
mod cli;
mod config;
mod error;
mod follow;
mod output;
mod put;
mod units;

use std::io::{BufRead as _, IsTerminal as _};
use std::time::Duration;

use clap::{CommandFactory as _, Parser as _};
use serde_json::{json, Value};

use crate::api::{query, seg, Api};
use crate::cli::*;
use crate::error::{exit, usage, CtlError, Result};
use crate::output::{bytes, col, fields, json_line, table, text, time, Col};

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print and exit 0; everything else is a usage error (2),
            // its message scrubbed of the token like every other.
            if !e.use_stderr() {
                let _ = e.print();
                std::process::exit(exit::OK);
            }
            eprint!("{}", scrub(e.render().to_string(), &token_candidates()));
            std::process::exit(exit::USAGE);
        }
    };
    let token = cli.token.clone();
    let json = cli.json;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            std::process::exit(exit::FAILED);
        }
    };
    let result = runtime.block_on(run(cli));
    if let Err(e) = result {
        // Last line of defence: whatever went wrong, the token is not printed.
        let mut tokens = token_candidates();
        tokens.extend(token);
        let msg = scrub(format!("error: {e}"), &tokens);
        if json {
            if let CtlError::Refused { problem, .. } = &e {
                if problem.is_object() {
                    eprintln!("{}", serde_json::to_string(problem).unwrap_or_default());
                }
            }
        }
        eprintln!("{msg}");
        std::process::exit(e.code());
    }
}

/// Every token this run could hold: `UPLINK_TOKEN` and the value of `--token` as given
/// (read from the raw arguments, so it is known even when they do not parse).
fn token_candidates() -> Vec<String> {
    let mut out: Vec<String> = std::env::var("UPLINK_TOKEN").ok().into_iter().collect();
    let args: Vec<String> = std::env::args().collect();
    for (i, a) in args.iter().enumerate() {
        if let Some(v) = a.strip_prefix("--token=") {
            out.push(v.to_string());
        } else if a == "--token" {
            out.extend(args.get(i + 1).cloned());
        }
    }
    out
}

/// `text` with each token (of 4 characters or more) replaced by `***`.
fn scrub(mut text: String, tokens: &[String]) -> String {
    for t in tokens.iter().map(|t| t.trim()).filter(|t| t.len() >= 4) {
        text = text.replace(t, "***");
    }
    text
}

async fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    match &cli.cmd {
        Cmd::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "uplinkctl",
                &mut std::io::stdout(),
            );
            return Ok(());
        }
        Cmd::Profiles => return profiles(json),
        Cmd::Login(args) => return login(&cli, args).await,
        _ => {}
    }
    let target = config::resolve(
        cli.api_url.clone(),
        cli.token.clone(),
        cli.profile.as_deref(),
    )?;
    let api = Api::new(&target)?;
    match cli.cmd {
        Cmd::Completions { .. } | Cmd::Profiles | Cmd::Login(_) => Ok(()),
        Cmd::Devices(c) => devices(&api, c, json).await,
        Cmd::Commands(c) => commands(&api, c, json).await,
        Cmd::Sessions(c) => sessions(&api, c, json).await,
        Cmd::Projects(c) => projects(&api, c, json).await,
        Cmd::Datasets(c) => datasets(&api, c, json).await,
        Cmd::Keys(c) => keys(&api, c, json).await,
        Cmd::Webhooks(c) => webhooks(&api, c, json).await,
        Cmd::Audit(a) => audit(&api, a, json).await,
        Cmd::Put(a) => {
            let part_size =
                units::parse_bytes(&a.part_size).map_err(|e| usage(format!("--part-size: {e}")))?;
            put::put(
                &api,
                put::PutRequest {
                    file: &a.file,
                    project: &a.project,
                    dataset: a.dataset.as_deref(),
                    part_size,
                    concurrency: a.concurrency.into(),
                    restart: a.restart,
                    state_dir: None,
                    api_url: api.base(),
                    progress: std::io::stderr().is_terminal(),
                },
                json,
            )
            .await
        }
        Cmd::Resume(a) => {
            let progress = std::io::stderr().is_terminal();
            put::resume(
                &api,
                &a.manifest,
                api.base(),
                a.concurrency.into(),
                progress,
                json,
            )
            .await
        }
        Cmd::Upload(a) => {
            let (device, path) = follow::split_target(&a.target)?;
            let follow = if a.no_follow {
                false
            } else {
                a.follow || std::io::stdout().is_terminal()
            };
            follow::upload(
                &api,
                follow::UploadRequest {
                    device,
                    path,
                    priority: a.priority,
                    follow,
                    timeout: a.timeout.map(Duration::from_secs),
                },
                json,
            )
            .await
        }
        Cmd::Config(a) => gateway_config(&api, a, json).await,
        Cmd::Events(a) => {
            follow::events(
                &api,
                follow::EventsRequest {
                    follow: a.follow,
                    project: a.project.as_deref(),
                    after: a.after,
                    limit: a.limit,
                    actions: &a.actions,
                },
                json,
            )
            .await
        }
    }
}

/// Prints one object: `--json` as it came, else `key  value` lines.
fn show(v: &Value, json: bool) {
    if json {
        json_line(v);
    } else {
        fields(v);
    }
}

/// Prints a list: `--json` as it came (one array), else a table.
fn list(v: &Value, json: bool, cols: &[Col]) {
    if json {
        json_line(v);
    } else {
        table(v.as_array().map(Vec::as_slice).unwrap_or(&[]), cols);
    }
}

/// A `key: value` confirmation, or the object with `--json`.
fn said(v: &Value, json: bool, line: String) {
    if json {
        json_line(v);
    } else {
        println!("{line}");
    }
}

fn parse_json(what: &str, text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| usage(format!("{what} is not JSON: {e}")))
}

fn parse_quota(q: &str) -> Result<Value> {
    if matches!(q, "none" | "null" | "unlimited") {
        return Ok(Value::Null);
    }
    units::parse_bytes(q)
        .map(|b| json!(b))
        .map_err(|e| usage(format!("--quota: {e} (or none)")))
}

// --- login and profiles -------------------------------------------------------------

async fn login(cli: &Cli, args: &LoginArgs) -> Result<()> {
    let path = config::profile_path()
        .ok_or_else(|| usage("no place for the profile file: set XDG_CONFIG_HOME or HOME"))?;
    let mut file = config::load(&path)?;
    let (name, _) = config::profile_name(cli.profile.as_deref(), &file);
    let existing = file.profiles.get(&name).cloned().unwrap_or_default();
    let api_url = cli
        .api_url
        .clone()
        .or(existing.api_url)
        .ok_or_else(|| usage("login needs --api-url (or UPLINK_API_URL)"))?;
    let api_url = config::normalise_url(&api_url)?;
    let token = match &cli.token {
        Some(t) => t.clone(),
        None => {
            if std::io::stdin().is_terminal() {
                eprint!("token for {api_url} (input is shown; or pipe it in): ");
            }
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| usage(format!("cannot read the token from standard input: {e}")))?;
            line.trim().to_string()
        }
    };
    let target = config::resolve(Some(api_url.clone()), Some(token), None)?;
    let api = Api::new(&target)?;
    let projects = api.get("/v1/projects").await?;
    let count = projects.as_array().map_or(0, Vec::len);
    file.profiles.insert(
        name.clone(),
        config::Profile {
            api_url: Some(api_url.clone()),
            token: Some(target.token.expose().to_string()),
            token_file: None,
        },
    );
    if args.set_default {
        file.default_profile = Some(name.clone());
    }
    config::save(&path, &file)?;
    if cli.json {
        json_line(&json!({"profile": name, "api_url": api_url, "path": path, "projects": count}));
    } else {
        println!(
            "logged in to {api_url} (sees {count} project{}); saved as profile {name:?} in {}",
            if count == 1 { "" } else { "s" },
            path.display()
        );
    }
    Ok(())
}

fn profiles(json: bool) -> Result<()> {
    let path = config::profile_path();
    let file = match &path {
        Some(p) => config::load(p)?,
        None => config::ProfileFile::default(),
    };
    let (current, _) = config::profile_name(None, &file);
    let rows: Vec<Value> = file
        .profiles
        .iter()
        .map(|(name, p)| {
            json!({
                "profile": name,
                "default": *name == current,
                "api_url": p.api_url,
                "token": if p.token.is_some() { "set" } else if p.token_file.is_some() { "file" } else { "none" },
            })
        })
        .collect();
    if json {
        json_line(&json!({"path": path, "profiles": rows}));
        return Ok(());
    }
    if let Some(p) = &path {
        println!("# {}", p.display());
    }
    table(
        &rows,
        &[
            col("PROFILE", |r| {
                let star = if r["default"] == true { " *" } else { "" };
                format!("{}{star}", text(&r["profile"]))
            }),
            col("API URL", |r| text(&r["api_url"])),
            col("TOKEN", |r| text(&r["token"])),
        ],
    );
    Ok(())
}

// --- fleet --------------------------------------------------------------------------

const DEVICE_COLS: &[Col] = &[
    col("DEVICE", |r| text(&r["device_id"])),
    col("PROJECT", |r| text(&r["project_id"])),
    col("ENABLED", |r| text(&r["enabled"])),
    col("ONLINE", |r| text(&r["online"])),
    col("AGENT", |r| text(&r["agent_version"])),
    col("QUEUE", |r| text(&r["queue_depth"])),
    col("LAST SEEN", |r| time(&r["last_seen_at"])),
];

async fn devices(api: &Api, c: DevicesCmd, json: bool) -> Result<()> {
    let one = |id: &str| format!("/v1/devices/{}", seg(id));
    match c {
        DevicesCmd::List { project } => {
            let v = api
                .get(&format!("/v1/devices{}", query(&[("project_id", project)])))
                .await?;
            list(&v, json, DEVICE_COLS);
        }
        DevicesCmd::Show { device } => show(&api.get(&one(&device)).await?, json),
        DevicesCmd::Register {
            device,
            public_key,
            project,
        } => {
            let mut body = json!({"device_id": device, "public_key": public_key});
            if let Some(p) = project {
                body["project_id"] = json!(p);
            }
            let v = api.post("/v1/devices", Some(body)).await?;
            said(
                &v,
                json,
                format!(
                    "registered {} in project {}",
                    text(&v["device_id"]),
                    text(&v["project_id"])
                ),
            );
        }
        DevicesCmd::Disable { device } => {
            let v = api.patch(&one(&device), json!({"enabled": false})).await?;
            said(&v, json, format!("{device}: disabled"));
        }
        DevicesCmd::Enable { device } => {
            let v = api.patch(&one(&device), json!({"enabled": true})).await?;
            said(&v, json, format!("{device}: enabled"));
        }
        DevicesCmd::RotateKey { device, public_key } => {
            let v = api
                .patch(&one(&device), json!({"public_key": public_key}))
                .await?;
            said(
                &v,
                json,
                format!("{device}: key rotated; requests signed with the old key now fail"),
            );
        }
    }
    Ok(())
}

const COMMAND_COLS: &[Col] = &[
    col("COMMAND", |r| text(&r["command_id"])),
    col("DEVICE", |r| text(&r["device_id"])),
    col("ACTION", |r| {
        let a = &r["action"];
        match a["type"].as_str() {
            Some("upload") => format!("upload {}", text(&a["path"])),
            Some(t @ ("pause" | "resume" | "cancel")) => format!("{t} {}", text(&a["job_id"])),
            Some(t) => t.to_string(),
            None => text(a),
        }
    }),
    col("STATE", |r| text(&r["state"])),
    col("CREATED", |r| time(&r["created_at"])),
    col("REASON", |r| text(&r["reason"])),
];

async fn commands(api: &Api, c: CommandsCmd, json: bool) -> Result<()> {
    match c {
        CommandsCmd::List {
            device,
            state,
            project,
            limit,
        } => {
            let q = query(&[
                ("device_id", device),
                ("state", state),
                ("project_id", project),
                ("limit", limit.map(|l| l.to_string())),
            ]);
            list(
                &api.get(&format!("/v1/commands{q}")).await?,
                json,
                COMMAND_COLS,
            );
        }
        CommandsCmd::Show { command } => show(
            &api.get(&format!("/v1/commands/{}", seg(&command))).await?,
            json,
        ),
    }
    Ok(())
}

const SESSION_COLS: &[Col] = &[
    col("SESSION", |r| text(&r["session_id"])),
    // A workstation upload has no device: its owner (`key:<key_id>` or `operator`).
    col("DEVICE", |r| {
        if r["device_id"].is_null() && !r["owner"].is_null() {
            text(&r["owner"])
        } else {
            text(&r["device_id"])
        }
    }),
    col("FILE", |r| text(&r["file_name"])),
    col("STATE", |r| text(&r["state"])),
    col("DONE", |r| {
        match (r["bytes_done"].as_u64(), r["size"].as_u64()) {
            (Some(d), Some(s)) if s > 0 => format!("{}%", d * 100 / s),
            _ => "-".into(),
        }
    }),
    col("SIZE", |r| bytes(&r["size"])),
    col("UPDATED", |r| time(&r["updated_at"])),
    col("ERROR", |r| text(&r["error"])),
];

/// `sessions pause|resume|abort`: POSTs `{path}/{verb}` and says the new state.
async fn steer(api: &Api, path: &str, session: &str, verb: &str, json: bool) -> Result<()> {
    let v = api.post(&format!("{path}/{verb}"), None).await?;
    said(
        &v,
        json,
        format!("session {session}: {}", text(&v["state"])),
    );
    Ok(())
}

async fn sessions(api: &Api, c: SessionsCmd, json: bool) -> Result<()> {
    let one = |id: &str| format!("/v1/sessions/{}", seg(id));
    match c {
        SessionsCmd::List {
            device,
            state,
            project,
            dataset,
            limit,
        } => {
            let q = query(&[
                ("device_id", device),
                ("state", state),
                ("project_id", project),
                ("dataset", dataset),
                ("limit", limit.map(|l| l.to_string())),
            ]);
            list(
                &api.get(&format!("/v1/sessions{q}")).await?,
                json,
                SESSION_COLS,
            );
        }
        SessionsCmd::Show { session } => show(&api.get(&one(&session)).await?, json),
        SessionsCmd::Pause { session } => {
            steer(api, &one(&session), &session, "pause", json).await?
        }
        SessionsCmd::Resume { session } => {
            steer(api, &one(&session), &session, "resume", json).await?
        }
        SessionsCmd::Abort { session } => {
            steer(api, &one(&session), &session, "abort", json).await?
        }
        SessionsCmd::Manifest { session } => {
            let v = api.get(&format!("{}/manifest", one(&session))).await?;
            if json {
                json_line(&v);
            } else {
                let m = &v["manifest"];
                println!("device              {}", text(&m["device_id"]));
                println!("path                {}", text(&m["path"]));
                println!("size                {}", bytes(&m["size"]));
                println!("sha256              {}", text(&m["sha256"]));
                println!("parts               {}", text(&m["part_count"]));
                println!("signature_valid     {}", text(&v["signature_valid"]));
                println!("parts_digest_valid  {}", text(&v["parts_digest_valid"]));
                println!("recorded_at         {}", time(&v["recorded_at"]));
            }
        }
    }
    Ok(())
}

const PROJECT_COLS: &[Col] = &[
    col("PROJECT", |r| text(&r["project_id"])),
    col("NAME", |r| text(&r["name"])),
    col("QUOTA", |r| bytes(&r["quota_bytes"])),
    col("USED", |r| bytes(&r["used_bytes"])),
    col("RESERVED", |r| bytes(&r["reserved_bytes"])),
    col("CREATED", |r| time(&r["created_at"])),
];

async fn projects(api: &Api, c: ProjectsCmd, json: bool) -> Result<()> {
    match c {
        ProjectsCmd::List => list(&api.get("/v1/projects").await?, json, PROJECT_COLS),
        ProjectsCmd::Show { project } => show(
            &api.get(&format!("/v1/projects/{}", seg(&project))).await?,
            json,
        ),
        ProjectsCmd::Create {
            project,
            name,
            quota,
            policy,
        } => {
            let mut body = json!({"project_id": project});
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            if let Some(q) = quota {
                body["quota_bytes"] = parse_quota(&q)?;
            }
            if let Some(p) = policy {
                body["policy"] = parse_json("--policy", &p)?;
            }
            let v = api.post("/v1/projects", Some(body)).await?;
            said(
                &v,
                json,
                format!("created project {}", text(&v["project_id"])),
            );
        }
        ProjectsCmd::Update {
            project,
            name,
            quota,
            policy,
        } => {
            let mut body = json!({});
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            if let Some(q) = quota {
                body["quota_bytes"] = parse_quota(&q)?;
            }
            if let Some(p) = policy {
                body["policy"] = parse_json("--policy", &p)?;
            }
            if body.as_object().is_some_and(|m| m.is_empty()) {
                return Err(usage("nothing to change: give --name, --quota or --policy"));
            }
            let v = api
                .patch(&format!("/v1/projects/{}", seg(&project)), body)
                .await?;
            said(
                &v,
                json,
                format!(
                    "updated project {project} (quota {})",
                    bytes(&v["quota_bytes"])
                ),
            );
        }
    }
    Ok(())
}

const DATASET_COLS: &[Col] = &[
    col("DATASET", |r| text(&r["name"])),
    col("PROJECT", |r| text(&r["project_id"])),
    col("STATE", |r| text(&r["state"])),
    col("VALIDATOR", |r| text(&r["validator"])),
    col("CREATED", |r| time(&r["created_at"])),
    col("SEALED", |r| time(&r["sealed_at"])),
];

fn print_manifest(v: &Value, json: bool) {
    if json {
        json_line(v);
        return;
    }
    println!(
        "{}/{}: {} objects, {}{}",
        text(&v["project_id"]),
        text(&v["dataset"]),
        v["objects"].as_array().map_or(0, Vec::len),
        bytes(&v["total_bytes"]),
        if v["sealed"] == true {
            ", sealed"
        } else {
            " (open: what it would list now)"
        }
    );
    table(
        v["objects"].as_array().map(Vec::as_slice).unwrap_or(&[]),
        &[
            col("DEVICE", |r| text(&r["device_id"])),
            col("FILE", |r| text(&r["file_name"])),
            col("SIZE", |r| bytes(&r["size"])),
            col("SHA256", |r| text(&r["sha256"])),
            col("OBJECT", |r| {
                format!("s3://{}/{}", text(&r["bucket"]), text(&r["object_key"]))
            }),
        ],
    );
}

async fn datasets(api: &Api, c: DatasetsCmd, json: bool) -> Result<()> {
    let base = |p: &str| format!("/v1/projects/{}/datasets", seg(p));
    let one = |p: &str, d: &str| format!("/v1/projects/{}/datasets/{}", seg(p), seg(d));
    match c {
        DatasetsCmd::List { project } => list(&api.get(&base(&project)).await?, json, DATASET_COLS),
        DatasetsCmd::Show { project, dataset } => {
            show(&api.get(&one(&project, &dataset)).await?, json)
        }
        DatasetsCmd::Create {
            project,
            dataset,
            validator,
            policy,
        } => {
            let mut body = json!({"name": dataset});
            if let Some(v) = validator {
                body["validator"] = json!(v);
            }
            if let Some(p) = policy {
                body["policy"] = parse_json("--policy", &p)?;
            }
            let v = api.post(&base(&project), Some(body)).await?;
            said(
                &v,
                json,
                format!("created dataset {project}/{}", text(&v["name"])),
            );
        }
        DatasetsCmd::Update {
            project,
            dataset,
            validator,
            policy,
        } => {
            let mut body = json!({});
            if let Some(v) = validator {
                body["validator"] = if v == "none" { Value::Null } else { json!(v) };
            }
            if let Some(p) = policy {
                body["policy"] = parse_json("--policy", &p)?;
            }
            if body.as_object().is_some_and(|m| m.is_empty()) {
                return Err(usage("nothing to change: give --validator or --policy"));
            }
            let v = api.patch(&one(&project, &dataset), body).await?;
            said(&v, json, format!("updated dataset {project}/{dataset}"));
        }
        DatasetsCmd::Seal { project, dataset } => {
            let v = api
                .post(&format!("{}/seal", one(&project, &dataset)), None)
                .await?;
            print_manifest(&v, json);
        }
        DatasetsCmd::Manifest { project, dataset } => {
            let v = api
                .get(&format!("{}/manifest", one(&project, &dataset)))
                .await?;
            print_manifest(&v, json);
        }
    }
    Ok(())
}

const KEY_COLS: &[Col] = &[
    col("KEY", |r| text(&r["key_id"])),
    col("NAME", |r| text(&r["name"])),
    col("ROLE", |r| text(&r["role"])),
    col("PROJECT", |r| {
        r["project_id"]
            .as_str()
            .map_or_else(|| "(all)".into(), str::to_string)
    }),
    col("CREATED", |r| time(&r["created_at"])),
    col("LAST USED", |r| time(&r["last_used_at"])),
    col("REVOKED", |r| time(&r["revoked_at"])),
];

async fn keys(api: &Api, c: KeysCmd, json: bool) -> Result<()> {
    match c {
        KeysCmd::List { project } => {
            let v = api
                .get(&format!("/v1/keys{}", query(&[("project_id", project)])))
                .await?;
            list(&v, json, KEY_COLS);
        }
        KeysCmd::Create {
            name,
            role,
            project,
        } => {
            let v = api
                .post(
                    "/v1/keys",
                    Some(json!({"name": name, "role": role, "project_id": project})),
                )
                .await?;
            if json {
                json_line(&v);
            } else {
                println!(
                    "created key {} ({}, {})",
                    text(&v["key_id"]),
                    text(&v["role"]),
                    v["project_id"].as_str().map_or("every project", |p| p)
                );
                println!("token: {}", text(&v["token"]));
                eprintln!("note: the token is shown once; store it now (e.g. `uplinkctl login --profile NAME`)");
            }
        }
        KeysCmd::Revoke { key } => {
            let v = api.delete(&format!("/v1/keys/{}", seg(&key))).await?;
            said(&v, json, format!("key {key}: revoked"));
        }
    }
    Ok(())
}

const WEBHOOK_COLS: &[Col] = &[
    col("WEBHOOK", |r| text(&r["webhook_id"])),
    col("PROJECT", |r| {
        r["project_id"]
            .as_str()
            .map_or_else(|| "(all)".into(), str::to_string)
    }),
    col("URL", |r| text(&r["url"])),
    col("CURSOR", |r| text(&r["cursor"])),
    col("FAILURES", |r| text(&r["failures"])),
    col("LAST ERROR", |r| text(&r["last_error"])),
];

async fn webhooks(api: &Api, c: WebhooksCmd, json: bool) -> Result<()> {
    let one = |id: &str| format!("/v1/webhooks/{}", seg(id));
    match c {
        WebhooksCmd::List { project } => {
            let v = api
                .get(&format!(
                    "/v1/webhooks{}",
                    query(&[("project_id", project)])
                ))
                .await?;
            list(&v, json, WEBHOOK_COLS);
        }
        WebhooksCmd::Show { webhook } => show(&api.get(&one(&webhook)).await?, json),
        WebhooksCmd::Create {
            url,
            project,
            actions,
            after,
        } => {
            let mut body = json!({"url": url});
            if let Some(p) = project {
                body["project_id"] = json!(p);
            }
            if !actions.is_empty() {
                body["actions"] = json!(actions);
            }
            if let Some(a) = after {
                body["after"] = json!(a);
            }
            let v = api.post("/v1/webhooks", Some(body)).await?;
            if json {
                json_line(&v);
            } else {
                println!(
                    "created webhook {} → {}",
                    text(&v["webhook_id"]),
                    text(&v["url"])
                );
                println!("secret: {}", text(&v["secret"]));
                eprintln!(
                    "note: the secret is shown once; receivers check X-Uplink-Signature with it"
                );
            }
        }
        WebhooksCmd::Delete { webhook } => {
            let v = api.delete(&one(&webhook)).await?;
            said(&v, json, format!("webhook {webhook}: deleted"));
        }
    }
    Ok(())
}

async fn audit(api: &Api, a: AuditArgs, json: bool) -> Result<()> {
    let q = query(&[
        ("subject", a.subject),
        ("project_id", a.project),
        ("after", a.after.map(|x| x.to_string())),
        ("limit", a.limit.map(|x| x.to_string())),
    ]);
    let v = api.get(&format!("/v1/audit{q}")).await?;
    list(
        &v,
        json,
        &[
            col("ID", |r| text(&r["id"])),
            col("AT", |r| time(&r["at"])),
            col("ACTOR", |r| text(&r["actor"])),
            col("ACTION", |r| text(&r["action"])),
            col("SUBJECT", |r| text(&r["subject"])),
            col("DETAIL", |r| {
                let d = r["detail"].to_string();
                if d.chars().count() > 120 {
                    format!("{}…", d.chars().take(120).collect::<String>())
                } else {
                    d
                }
            }),
        ],
    );
    Ok(())
}

// --- gateway flow control -----------------------------------------------------------

async fn gateway_config(api: &Api, a: ConfigArgs, json: bool) -> Result<()> {
    let mut body = json!({"type": "config"});
    if let Some(rate) = &a.max_rate {
        let bps = if matches!(rate.as_str(), "unlimited" | "none" | "off") {
            0
        } else {
            units::parse_bytes(rate).map_err(|e| usage(format!("--max-rate: {e}")))?
        };
        body["max_upload_bytes_per_sec"] = json!(bps);
    }
    if a.always {
        body["upload_windows"] = json!([]);
    } else if !a.windows.is_empty() {
        body["upload_windows"] = json!(a.windows);
    }
    if let Some(n) = a.concurrency {
        body["concurrency"] = json!(n);
    }
    if let Some(n) = a.per_job_concurrency {
        body["per_job_concurrency"] = json!(n);
    }
    if a.reset {
        body["reset"] = json!(true);
    }
    if body.as_object().is_some_and(|m| m.len() == 1) {
        return Err(usage(
            "nothing to change: give --max-rate, --window, --always, --concurrency, --per-job-concurrency or --reset",
        ));
    }
    let device = seg(&a.device);
    let (project, cursor) = if a.wait {
        let d = api.get(&format!("/v1/devices/{device}")).await?;
        let project = d["project_id"].as_str().map(str::to_string);
        let cursor = follow::newest_seq(api, project.as_deref()).await?;
        (project, cursor)
    } else {
        (None, 0)
    };
    let cmd = api
        .post(&format!("/v1/devices/{device}/commands"), Some(body))
        .await?;
    if !a.wait {
        said(
            &cmd,
            json,
            format!(
                "config command {} sent to {} ({}); see it with: uplinkctl commands show {}",
                text(&cmd["command_id"]),
                a.device,
                text(&cmd["state"]),
                text(&cmd["command_id"])
            ),
        );
        return Ok(());
    }
    let cmd = follow::wait_command(api, cmd, project.as_deref(), cursor).await?;
    said(
        &cmd,
        json,
        format!(
            "config command {}: {}",
            text(&cmd["command_id"]),
            text(&cmd["state"])
        ),
    );
    match cmd["state"].as_str() {
        Some("done") => Ok(()),
        other => Err(CtlError::Failed(format!(
            "the gateway did not apply the config: {}{}",
            other.unwrap_or("?"),
            cmd["reason"]
                .as_str()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ))),
    }
}
