//! `uplinkctl`: the operator's command line for Uplink. It talks only to the control API's
//! public HTTP interface (docs/api.md); see docs/ctl.md for every command, the JSON shapes
//! and the exit codes.

mod admin;
mod api;
mod catalog;
mod cli;
mod config;
mod error;
mod fleet;
mod follow;
mod login;
mod output;
mod put;
mod units;

use std::io::IsTerminal as _;
use std::time::Duration;

use clap::{CommandFactory as _, Parser as _};

use crate::api::Api;
use crate::cli::*;
use crate::error::{exit, usage, CtlError, Result};

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
        Cmd::Profiles => return login::profiles(json),
        Cmd::Login(args) => return login::login(&cli, args).await,
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
        Cmd::Devices(c) => fleet::devices(&api, c, json).await,
        Cmd::Commands(c) => fleet::commands(&api, c, json).await,
        Cmd::Sessions(c) => fleet::sessions(&api, c, json).await,
        Cmd::Projects(c) => catalog::projects(&api, c, json).await,
        Cmd::Datasets(c) => catalog::datasets(&api, c, json).await,
        Cmd::Keys(c) => admin::keys(&api, c, json).await,
        Cmd::Webhooks(c) => admin::webhooks(&api, c, json).await,
        Cmd::Audit(a) => admin::audit(&api, a, json).await,
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
        Cmd::Config(a) => fleet::gateway_config(&api, a, json).await,
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
