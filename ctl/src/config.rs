//! Where the API URL and the token come from: flags, then `UPLINK_API_URL` / `UPLINK_TOKEN`,
//! then a profile of `$XDG_CONFIG_HOME/uplink/ctl.toml` (default `~/.config/uplink/ctl.toml`).
//!
//! ```toml
//! default_profile = "prod"          # optional; else the profile named "default"
//!
//! [profiles.default]
//! api_url = "http://127.0.0.1:8080"
//! token = "upk_…"
//!
//! [profiles.prod]
//! api_url = "https://uplink.example.com"
//! token_file = "/run/secrets/uplink-token"   # instead of token
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{usage, Result};

/// A token. Never printed: `Debug` shows `***`.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    pub fn new(t: String) -> Token {
        Token(t)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_profile: Option<String>,
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

/// `$UPLINK_CTL_CONFIG`, else `$XDG_CONFIG_HOME/uplink/ctl.toml`, else
/// `$HOME/.config/uplink/ctl.toml`.
pub fn profile_path() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(p) = var("UPLINK_CTL_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = var("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("uplink").join("ctl.toml"))
}

/// The file, or an empty one when it does not exist.
pub fn load(path: &Path) -> Result<ProfileFile> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ProfileFile::default()),
        Err(e) => return Err(usage(format!("cannot read {}: {e}", path.display()))),
    };
    warn_if_readable_by_others(path);
    // toml's error names the line and the key, never echoes a value beyond its span: the
    // span of a bad `token` value could, so only the message's first line is kept.
    toml::from_str(&text).map_err(|e| {
        let msg = e.message().to_string();
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
        match line {
            Some(l) => usage(format!("{}:{l}: {msg}", path.display())),
            None => usage(format!("{}: {msg}", path.display())),
        }
    })
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            eprintln!(
                "warning: {} holds tokens and is readable by others: chmod 600 it",
                path.display()
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path) {}

/// Writes the file with mode 0600 (its directory 0700 when created).
pub fn save(path: &Path, file: &ProfileFile) -> Result<()> {
    let text = toml::to_string(file).map_err(|e| usage(format!("cannot write profiles: {e}")))?;
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .map_err(|e| usage(format!("cannot create {}: {e}", dir.display())))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
            }
        }
    }
    let tmp = path.with_extension("toml.tmp");
    let write = || -> std::io::Result<()> {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| usage(format!("cannot write {}: {e}", path.display())))
}

/// The profile name in force: `--profile`, `UPLINK_PROFILE`, the file's `default_profile`,
/// else `default`. `true` when it was asked for explicitly (then it must exist).
pub fn profile_name(flag: Option<&str>, file: &ProfileFile) -> (String, bool) {
    if let Some(p) = flag.filter(|p| !p.is_empty()) {
        return (p.to_string(), true);
    }
    if let Ok(p) = std::env::var("UPLINK_PROFILE") {
        if !p.is_empty() {
            return (p, true);
        }
    }
    match &file.default_profile {
        Some(p) => (p.clone(), true),
        None => ("default".into(), false),
    }
}

/// Where to talk to and as whom.
#[derive(Debug)]
pub struct Target {
    pub api_url: String,
    pub token: Token,
}

/// Resolves the target: flags (which clap already filled from `UPLINK_API_URL` and
/// `UPLINK_TOKEN` when absent), then the profile.
pub fn resolve(
    api_url: Option<String>,
    token: Option<String>,
    profile: Option<&str>,
) -> Result<Target> {
    let path = profile_path();
    let file = match &path {
        Some(p) if api_url.is_none() || token.is_none() => load(p)?,
        _ => ProfileFile::default(),
    };
    let (name, explicit) = profile_name(profile, &file);
    let chosen = file.profiles.get(&name).cloned();
    if chosen.is_none() && explicit && (api_url.is_none() || token.is_none()) {
        let known: Vec<&str> = file.profiles.keys().map(String::as_str).collect();
        return Err(usage(format!(
            "no profile {name:?} in {} (profiles: {})",
            path.as_deref()
                .map_or("<no config path>".into(), |p| p.display().to_string()),
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        )));
    }
    let chosen = chosen.unwrap_or_default();
    let api_url = api_url.or(chosen.api_url).ok_or_else(|| {
        usage("no API URL: pass --api-url, set UPLINK_API_URL or run `uplinkctl login`")
    })?;
    let token = match (token, chosen.token, chosen.token_file) {
        (Some(t), _, _) | (None, Some(t), _) => t,
        (None, None, Some(f)) => std::fs::read_to_string(&f)
            .map(|t| t.trim().to_string())
            .map_err(|e| usage(format!("cannot read token_file {}: {e}", f.display())))?,
        (None, None, None) => {
            return Err(usage(
                "no token: set UPLINK_TOKEN, pass --token or run `uplinkctl login`",
            ))
        }
    };
    let token = token.trim().to_string();
    if token.is_empty() || token.chars().any(|c| c.is_control() || c == ' ') {
        return Err(usage(
            "the token is empty or holds spaces or control characters",
        ));
    }
    Ok(Target {
        api_url: normalise_url(&api_url)?,
        token: Token::new(token),
    })
}

/// `http(s)://host[:port][/prefix]` without a trailing slash.
pub fn normalise_url(url: &str) -> Result<String> {
    let url = url.trim().trim_end_matches('/');
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
            if !u.username().is_empty() || u.password().is_some() || u.query().is_some() {
                return Err(usage(
                    "the API URL must not hold credentials or a query (give the token separately)",
                ));
            }
            Ok(url.to_string())
        }
        _ => Err(usage(format!(
            "API URL {url:?} is not an http:// or https:// URL"
        ))),
    }
}
