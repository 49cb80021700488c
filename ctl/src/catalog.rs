//! Projects and datasets.

use serde_json::{json, Value};

use crate::api::{seg, Api};
use crate::cli::*;
use crate::error::{usage, Result};
use crate::output::{bytes, col, json_line, list, said, show, table, text, time, Col};
use crate::units;

const PROJECT_COLS: &[Col] = &[
    col("PROJECT", |r| text(&r["project_id"])),
    col("NAME", |r| text(&r["name"])),
    col("QUOTA", |r| bytes(&r["quota_bytes"])),
    col("USED", |r| bytes(&r["used_bytes"])),
    col("RESERVED", |r| bytes(&r["reserved_bytes"])),
    col("CREATED", |r| time(&r["created_at"])),
];

pub async fn projects(api: &Api, c: ProjectsCmd, json: bool) -> Result<()> {
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

pub async fn datasets(api: &Api, c: DatasetsCmd, json: bool) -> Result<()> {
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
