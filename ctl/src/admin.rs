//! API keys, webhooks and the audit log.

use serde_json::json;

use crate::api::{query, seg, Api};
use crate::cli::*;
use crate::error::Result;
use crate::output::{col, json_line, list, said, show, text, time, Col};

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

pub async fn keys(api: &Api, c: KeysCmd, json: bool) -> Result<()> {
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

pub async fn webhooks(api: &Api, c: WebhooksCmd, json: bool) -> Result<()> {
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

pub async fn audit(api: &Api, a: AuditArgs, json: bool) -> Result<()> {
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
