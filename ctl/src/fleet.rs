//! Devices, their commands and upload sessions, and the gateways' flow control (`config`).

use serde_json::json;

use crate::api::{query, seg, Api};
use crate::cli::*;
use crate::error::{usage, CtlError, Result};
use crate::output::{bytes, col, json_line, list, said, show, text, time, Col};
use crate::{follow, units};

const DEVICE_COLS: &[Col] = &[
    col("DEVICE", |r| text(&r["device_id"])),
    col("PROJECT", |r| text(&r["project_id"])),
    col("ENABLED", |r| text(&r["enabled"])),
    col("ONLINE", |r| text(&r["online"])),
    col("AGENT", |r| text(&r["agent_version"])),
    col("QUEUE", |r| text(&r["queue_depth"])),
    col("LAST SEEN", |r| time(&r["last_seen_at"])),
];

pub async fn devices(api: &Api, c: DevicesCmd, json: bool) -> Result<()> {
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

pub async fn commands(api: &Api, c: CommandsCmd, json: bool) -> Result<()> {
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

pub async fn sessions(api: &Api, c: SessionsCmd, json: bool) -> Result<()> {
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

pub async fn gateway_config(api: &Api, a: ConfigArgs, json: bool) -> Result<()> {
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
