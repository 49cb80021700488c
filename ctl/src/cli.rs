//! The command line: every command, its flags and its examples (`--help`).

use clap::{Args, Parser, Subcommand};

const MAIN_EXAMPLES: &str = "\
Examples:
  printf '%s\\n' \"$TOKEN\" | uplinkctl login --api-url https://uplink.example.com
  uplinkctl devices list
  uplinkctl upload robot-17:/data/rec/run-042.mcap --priority 9
  uplinkctl sessions list --device robot-17 --state uploading
  uplinkctl events --follow --project field
  uplinkctl --profile staging --json sessions show 7f1c…

Connection: --api-url / UPLINK_API_URL and --token / UPLINK_TOKEN, else the profile
(--profile / UPLINK_PROFILE, else default_profile, else \"default\") of
$XDG_CONFIG_HOME/uplink/ctl.toml (~/.config/uplink/ctl.toml).
Exit codes: 0 ok, 1 upload or command failed, 2 usage, 3 refused by the API (4xx),
4 API unreachable or 5xx, 130 interrupted. Manual: docs/ctl.md.";

#[derive(Debug, Parser)]
#[command(
    name = "uplinkctl",
    version,
    about = "Operate Uplink from the command line: devices, uploads, sessions, projects, keys, events",
    after_help = MAIN_EXAMPLES,
    propagate_version = true
)]
pub struct Cli {
    /// Control API base URL, e.g. https://uplink.example.com.
    #[arg(long, global = true, env = "UPLINK_API_URL", value_name = "URL")]
    pub api_url: Option<String>,
    /// Bearer token (operator token or API key). Prefer UPLINK_TOKEN or a profile: a flag is
    /// visible to other users in the process list.
    #[arg(
        long,
        global = true,
        env = "UPLINK_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Profile of the profile file to use.
    #[arg(long, global = true, env = "UPLINK_PROFILE", value_name = "NAME")]
    pub profile: Option<String>,
    /// Machine-readable output: one JSON document per line (the API's field names).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Save the API URL and a token (read from standard input) as a profile.
    #[command(after_help = "\
Examples:
  printf '%s\\n' \"$TOKEN\" | uplinkctl login --api-url https://uplink.example.com
  uplinkctl login --profile staging --api-url http://10.0.0.5:8080 < token.txt
  uplinkctl login --profile prod --api-url https://uplink.example.com --set-default < t

The token is checked against the API (GET /v1/projects) before it is saved, in the
profile file with mode 0600.")]
    Login(LoginArgs),
    /// List the profiles of the profile file (never their tokens).
    #[command(after_help = "Examples:\n  uplinkctl profiles\n  uplinkctl profiles --json")]
    Profiles,
    /// Devices: list, show, register, disable, enable, rotate-key.
    #[command(
        subcommand,
        after_help = "\
Examples:
  uplinkctl devices list --project field
  uplinkctl devices register robot-17 --public-key \"$(uplink-agent keygen --out device.key | tail -n1)\"
  uplinkctl devices disable robot-17"
    )]
    Devices(DevicesCmd),
    /// Commands sent to devices: list, show.
    #[command(
        subcommand,
        after_help = "\
Examples:
  uplinkctl commands list --device robot-17 --state failed
  uplinkctl commands show 3b1f0c2e-…"
    )]
    Commands(CommandsCmd),
    /// Upload sessions: list, show, pause, resume, abort, manifest.
    #[command(
        subcommand,
        after_help = "\
Examples:
  uplinkctl sessions list --device robot-17 --state uploading
  uplinkctl sessions pause 7f1c…
  uplinkctl sessions abort 7f1c…"
    )]
    Sessions(SessionsCmd),
    /// Projects: list, show, create, update (name, quota, storage policy).
    #[command(
        subcommand,
        after_help = "\
Examples:
  uplinkctl projects list
  uplinkctl projects create field --quota 1TB
  uplinkctl projects update field --quota none"
    )]
    Projects(ProjectsCmd),
    /// Datasets of a project: list, show, create, update, seal, manifest.
    #[command(
        subcommand,
        after_help = "\
Examples:
  uplinkctl datasets list field
  uplinkctl datasets create field trials --validator jsonl
  uplinkctl datasets seal field trials
  uplinkctl datasets manifest field trials --json"
    )]
    Datasets(DatasetsCmd),
    /// API keys: list, create (the token is shown once), revoke.
    #[command(
        subcommand,
        after_help = "\
Examples:
  uplinkctl keys create --name dashboard --role viewer --project field
  uplinkctl keys list --project field
  uplinkctl keys revoke k3j2h1g0"
    )]
    Keys(KeysCmd),
    /// Webhooks: list, show, create (the secret is shown once), delete.
    #[command(
        subcommand,
        after_help = "\
Examples:
  uplinkctl webhooks create https://hooks.example/uplink --project field --action session.transition
  uplinkctl webhooks list
  uplinkctl webhooks delete 5d2e…"
    )]
    Webhooks(WebhooksCmd),
    /// The append-only audit log (to follow what happens, use `events --follow`).
    #[command(after_help = "\
Examples:
  uplinkctl audit --subject robot-17
  uplinkctl audit --project field --limit 20 --json")]
    Audit(AuditArgs),
    /// Ask a gateway to upload one of its files, and follow it to the verified object.
    #[command(after_help = "\
Examples:
  uplinkctl upload robot-17:/data/rec/run-042.mcap
  uplinkctl upload robot-17:/data/rec/run-042.mcap --priority 9 --no-follow
  uplinkctl upload robot-17:/data/rec/run-042.mcap --follow --json | jq -c .

Following (the default when standard output is a terminal) shows a progress bar (bytes,
rate, ETA) on a terminal, or with --json one document per line (\"event\": \"command\",
\"progress\", then \"done\" or \"failed\"). It ends with the object key and SHA-256 (exit 0),
or the reason of the failure (exit 1). Ctrl-C stops following, not the upload.")]
    Upload(UploadArgs),
    /// Upload a file from this machine straight to storage, resumable.
    #[command(after_help = "\
Examples:
  uplinkctl put rec/run-042.mcap
  uplinkctl put run-042.mcap --project field --dataset runs --part-size 64MiB --concurrency 8
  uplinkctl --json put big.bin            # a JSON line per part, then {\"event\":\"done\",…}

The file goes straight to storage through presigned part URLs (no bytes through the API,
no storage credentials here), in a session owned by this token's API key (an operator or
admin of the project). Each part's MD5 is signed into its URL; the API verifies every part
before completing and checks the SHA-256 from the stored bytes. Interrupted (Ctrl-C,
kill -9, network loss)? Run the same command again: it resumes from its manifest under
$XDG_STATE_HOME/uplink/put/ (~/.local/state/uplink/put/) and sends only the parts storage
does not hold. A file changed since needs --restart.")]
    Put(PutArgs),
    /// Resume an interrupted `put` from its manifest file.
    #[command(after_help = "\
Examples:
  uplinkctl resume ~/.local/state/uplink/put/3f2a9c01b7e4d2a85c6f0e19.json")]
    Resume(ResumeArgs),
    /// Change a gateway's flow control at run time: bandwidth cap, upload windows, concurrency.
    #[command(after_help = "\
Examples:
  uplinkctl config robot-17 --max-rate 256KiB/s --window 22:00-06:00
  uplinkctl config robot-17 --max-rate unlimited
  uplinkctl config robot-17 --concurrency 1 --per-job-concurrency 1 --wait
  uplinkctl config robot-17 --reset

Sizes: K/KiB, M/MiB, G/GiB are ×1024; KB, MB, GB ×1000; a trailing /s is allowed.
Windows are HH:MM-HH:MM in the gateway's local time.")]
    Config(ConfigArgs),
    /// Show the event feed; with --follow, tail it like `tail -f`.
    #[command(after_help = "\
Examples:
  uplinkctl events --follow
  uplinkctl events --follow --project field --json
  uplinkctl events --after 1200 --limit 50")]
    Events(EventsArgs),
    /// Print a shell completion script.
    #[command(after_help = "\
Examples:
  uplinkctl completions bash > /etc/bash_completion.d/uplinkctl
  uplinkctl completions zsh > \"${fpath[1]}/_uplinkctl\"
  uplinkctl completions fish > ~/.config/fish/completions/uplinkctl.fish")]
    Completions {
        /// bash, zsh or fish (also elvish, powershell).
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// Make this profile the default one (`default_profile`).
    #[arg(long)]
    pub set_default: bool,
}

#[derive(Debug, Subcommand)]
pub enum DevicesCmd {
    /// List devices.
    #[command(
        after_help = "Examples:\n  uplinkctl devices list\n  uplinkctl devices list --project field --json"
    )]
    List {
        #[arg(long)]
        project: Option<String>,
    },
    /// Show one device.
    #[command(after_help = "Examples:\n  uplinkctl devices show robot-17")]
    Show { device: String },
    /// Register a device with its public key (`uplink-agent keygen` prints it).
    #[command(
        after_help = "Examples:\n  uplinkctl devices register robot-17 --public-key MCowBQYDK2VwAyEA…\n  uplinkctl devices register cam-3 --public-key \"$KEY\" --project field"
    )]
    Register {
        device: String,
        #[arg(long)]
        public_key: String,
        /// Default: project `default`.
        #[arg(long)]
        project: Option<String>,
    },
    /// Disable a device: its requests are refused and no commands are sent to it.
    #[command(after_help = "Examples:\n  uplinkctl devices disable robot-17")]
    Disable { device: String },
    /// Enable a disabled device.
    #[command(after_help = "Examples:\n  uplinkctl devices enable robot-17")]
    Enable { device: String },
    /// Replace a device's public key: requests signed with the old key fail at once.
    #[command(
        after_help = "Examples:\n  uplinkctl devices rotate-key robot-17 --public-key \"$NEW_KEY\""
    )]
    RotateKey {
        device: String,
        #[arg(long)]
        public_key: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CommandsCmd {
    /// List commands, newest first.
    #[command(
        after_help = "Examples:\n  uplinkctl commands list --device robot-17\n  uplinkctl commands list --state failed --limit 10"
    )]
    List {
        #[arg(long)]
        device: Option<String>,
        /// pending, published, accepted, done, failed, rejected or expired.
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        project: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Show one command.
    #[command(after_help = "Examples:\n  uplinkctl commands show 3b1f0c2e-…")]
    Show { command: String },
}

#[derive(Debug, Subcommand)]
pub enum SessionsCmd {
    /// List sessions, newest first.
    #[command(
        after_help = "Examples:\n  uplinkctl sessions list --device robot-17\n  uplinkctl sessions list --project field --dataset trials --state completed"
    )]
    List {
        #[arg(long)]
        device: Option<String>,
        /// created, uploading, paused, completing, completed, failed, aborted or expired.
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        project: Option<String>,
        #[arg(long)]
        dataset: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Show one session.
    #[command(after_help = "Examples:\n  uplinkctl sessions show 7f1c…")]
    Show { session: String },
    /// Pause an upload (a signed pause command goes to the device).
    #[command(after_help = "Examples:\n  uplinkctl sessions pause 7f1c…")]
    Pause { session: String },
    /// Resume a paused upload.
    #[command(after_help = "Examples:\n  uplinkctl sessions resume 7f1c…")]
    Resume { session: String },
    /// Abort an upload: the multipart upload is aborted, the device cancels the job.
    #[command(after_help = "Examples:\n  uplinkctl sessions abort 7f1c…")]
    Abort { session: String },
    /// The device-signed manifest of a completed session (chain of custody).
    #[command(after_help = "Examples:\n  uplinkctl sessions manifest 7f1c… --json")]
    Manifest { session: String },
}

#[derive(Debug, Subcommand)]
pub enum ProjectsCmd {
    /// List the projects the caller can see.
    #[command(after_help = "Examples:\n  uplinkctl projects list")]
    List,
    /// Show one project (quota, used and reserved bytes, storage policy).
    #[command(after_help = "Examples:\n  uplinkctl projects show field")]
    Show { project: String },
    /// Create a project (needs an unscoped admin).
    #[command(
        after_help = "Examples:\n  uplinkctl projects create field --quota 1TB\n  uplinkctl projects create lab --policy '{\"key_template\":\"{project}/{date}/{filename}\"}'"
    )]
    Create {
        project: String,
        #[arg(long)]
        name: Option<String>,
        /// Quota in bytes (1TB, 500GiB, …).
        #[arg(long)]
        quota: Option<String>,
        /// Storage policy as JSON (see docs/api.md, Storage policies).
        #[arg(long)]
        policy: Option<String>,
    },
    /// Change a project's name, quota (`none` removes it) or storage policy.
    #[command(
        after_help = "Examples:\n  uplinkctl projects update field --quota 2TB\n  uplinkctl projects update field --quota none"
    )]
    Update {
        project: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        quota: Option<String>,
        #[arg(long)]
        policy: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DatasetsCmd {
    /// List a project's datasets.
    #[command(after_help = "Examples:\n  uplinkctl datasets list field")]
    List { project: String },
    /// Show one dataset.
    #[command(after_help = "Examples:\n  uplinkctl datasets show field trials")]
    Show { project: String, dataset: String },
    /// Create a dataset.
    #[command(
        after_help = "Examples:\n  uplinkctl datasets create field trials\n  uplinkctl datasets create field logs --validator jsonl --policy '{\"key_template\":\"{project}/{dataset}/{device}/{date}/{filename}\"}'"
    )]
    Create {
        project: String,
        dataset: String,
        /// jsonl, csv or parquet.
        #[arg(long)]
        validator: Option<String>,
        /// Storage policy as JSON.
        #[arg(long)]
        policy: Option<String>,
    },
    /// Change a dataset's validator (`none` removes it) or storage policy.
    #[command(after_help = "Examples:\n  uplinkctl datasets update field logs --validator none")]
    Update {
        project: String,
        dataset: String,
        #[arg(long)]
        validator: Option<String>,
        #[arg(long)]
        policy: Option<String>,
    },
    /// Seal a dataset: it takes no new files and its manifest is written once.
    #[command(after_help = "Examples:\n  uplinkctl datasets seal field trials")]
    Seal { project: String, dataset: String },
    /// The dataset's manifest: sealed, or what it would list now.
    #[command(
        after_help = "Examples:\n  uplinkctl datasets manifest field trials\n  uplinkctl datasets manifest field trials --json > trials.json"
    )]
    Manifest { project: String, dataset: String },
}

#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// List API keys (never their tokens).
    #[command(
        after_help = "Examples:\n  uplinkctl keys list\n  uplinkctl keys list --project field"
    )]
    List {
        #[arg(long)]
        project: Option<String>,
    },
    /// Create an API key; its token is shown once.
    #[command(
        after_help = "Examples:\n  uplinkctl keys create --name dashboard --role viewer --project field\n  uplinkctl keys create --name ci --role operator --project field --json | jq -r .token"
    )]
    Create {
        #[arg(long)]
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: String,
        /// Absent: every project (needs an unscoped admin).
        #[arg(long)]
        project: Option<String>,
    },
    /// Revoke a key at once.
    #[command(after_help = "Examples:\n  uplinkctl keys revoke k3j2h1g0")]
    Revoke { key: String },
}

#[derive(Debug, Subcommand)]
pub enum WebhooksCmd {
    /// List webhooks (never their secrets).
    #[command(after_help = "Examples:\n  uplinkctl webhooks list --project field")]
    List {
        #[arg(long)]
        project: Option<String>,
    },
    /// Show one webhook (cursor, failures, last error).
    #[command(after_help = "Examples:\n  uplinkctl webhooks show 5d2e…")]
    Show { webhook: String },
    /// Create a webhook; its HMAC secret is shown once.
    #[command(
        after_help = "Examples:\n  uplinkctl webhooks create https://hooks.example/uplink --project field --action session.transition --action session.validated"
    )]
    Create {
        url: String,
        #[arg(long)]
        project: Option<String>,
        /// Only these actions (repeat the flag); default all.
        #[arg(long = "action", value_name = "ACTION")]
        actions: Vec<String>,
        /// Replay from this event seq (default: only new events).
        #[arg(long)]
        after: Option<i64>,
    },
    /// Delete a webhook: nothing more is sent to it.
    #[command(after_help = "Examples:\n  uplinkctl webhooks delete 5d2e…")]
    Delete { webhook: String },
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[arg(long)]
    pub subject: Option<String>,
    #[arg(long)]
    pub project: Option<String>,
    /// Audit ids greater than this.
    #[arg(long)]
    pub after: Option<i64>,
    /// 1-1000 (default 100).
    #[arg(long)]
    pub limit: Option<u32>,
}

#[derive(Debug, Args)]
pub struct PutArgs {
    /// The file to upload.
    pub file: std::path::PathBuf,
    /// Project of the upload.
    #[arg(long, default_value = "default")]
    pub project: String,
    /// Dataset of the project (default: `default`).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Part size, 5MiB to 5GiB.
    #[arg(long, default_value = "8MiB", value_name = "SIZE")]
    pub part_size: String,
    /// Parts in flight.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub concurrency: u16,
    /// Upload anew a file that changed since its interrupted put.
    #[arg(long)]
    pub restart: bool,
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// The manifest an interrupted `put` left.
    pub manifest: std::path::PathBuf,
    /// Parts in flight.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub concurrency: u16,
}

#[derive(Debug, Args)]
pub struct UploadArgs {
    /// DEVICE:/absolute/path/on/the/gateway
    #[arg(value_name = "DEVICE:PATH")]
    pub target: String,
    /// 0 (lowest) to 9 (highest); the gateway's default is 5.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=9))]
    pub priority: Option<u8>,
    /// Follow the upload to its end (default when standard output is a terminal).
    #[arg(long, overrides_with = "no_follow")]
    pub follow: bool,
    /// Only send the command; print it and exit.
    #[arg(long)]
    pub no_follow: bool,
    /// Give up following after this many seconds (exit 1; the upload goes on).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    pub device: String,
    /// Upload rate cap over all jobs, e.g. 256KiB/s, 2MB/s; 0 or `unlimited` lifts it.
    #[arg(long, value_name = "RATE")]
    pub max_rate: Option<String>,
    /// Upload window HH:MM-HH:MM (gateway local time); repeat for several.
    #[arg(long = "window", value_name = "HH:MM-HH:MM", conflicts_with = "always")]
    pub windows: Vec<String>,
    /// Upload at any time (drops the windows).
    #[arg(long)]
    pub always: bool,
    /// Parts in flight over all jobs.
    #[arg(long)]
    pub concurrency: Option<u32>,
    /// Parts in flight of any one job.
    #[arg(long)]
    pub per_job_concurrency: Option<u32>,
    /// Drop earlier overrides first (back to the gateway's agent.toml).
    #[arg(long)]
    pub reset: bool,
    /// Wait until the gateway has applied (done) or refused (rejected) the command.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep waiting for new events (long-poll) until interrupted.
    #[arg(long, short = 'f')]
    pub follow: bool,
    #[arg(long)]
    pub project: Option<String>,
    /// Events with a greater seq (default: the newest --limit events, or only new ones
    /// with --follow).
    #[arg(long)]
    pub after: Option<i64>,
    /// Events per page, 1-1000 (default 20).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,
    /// Only these actions (repeat the flag), e.g. session.transition.
    #[arg(long = "action", value_name = "ACTION")]
    pub actions: Vec<String>,
}
