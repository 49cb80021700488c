//! `uplink-loadgen`: simulated devices against a running Uplink on 127.0.0.1; see
//! `tests/src/loadgen/mod.rs` and `scripts/loadtest`. Exits 1 when any outcome was lost or
//! duplicated, 2 when the run could not be made.

use clap::Parser;
use uplink_e2e::loadgen::{args::Args, run};

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let json = args.json.clone();
    let report = match run::run(args).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("uplink-loadgen: {e:#}");
            std::process::exit(2);
        }
    };
    report.print();
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        if let Err(e) = std::fs::write(&path, text + "\n") {
            eprintln!("uplink-loadgen: could not write {}: {e}", path.display());
            std::process::exit(2);
        }
    }
    if !report.exactly_once {
        std::process::exit(1);
    }
}
