//! `login` and `profiles`: the profile file of connections (docs/ctl.md#profiles).

use std::io::{BufRead as _, IsTerminal as _};

use serde_json::{json, Value};

use crate::api::Api;
use crate::cli::*;
use crate::config;
use crate::error::{usage, Result};
use crate::output::{col, json_line, table, text};

pub async fn login(cli: &Cli, args: &LoginArgs) -> Result<()> {
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

pub fn profiles(json: bool) -> Result<()> {
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
