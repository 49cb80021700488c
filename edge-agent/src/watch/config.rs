//! The `[[watch]]` entries: as written, their globs, and their validation into [`Watch`]es.

use std::path::PathBuf;
use std::time::Duration;

use globset::{GlobBuilder, GlobMatcher};
use serde::Deserialize;
use uplink_protocol::ops::valid_dataset;

use super::MIN_ENTRIES_PER_SCAN;
use crate::policy;

/// What to do with a watched file once its upload is done.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AfterUpload {
    #[default]
    Keep,
    Delete,
}

impl AfterUpload {
    pub fn as_str(self) -> &'static str {
        match self {
            AfterUpload::Keep => "keep",
            AfterUpload::Delete => "delete",
        }
    }
}

/// One `[[watch]]` entry as written.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WatchConfig {
    /// Directory to scan; must lie inside `allowed_roots`.
    pub root: PathBuf,
    /// Pattern matched against the path relative to `root` (`*` stays within a directory,
    /// `**` crosses them), e.g. `**/*.mcap`.
    pub glob: String,
    /// Label sent with each upload; a segment of the object key.
    pub dataset: String,
    /// A file counts as finished once its size and mtime have not changed for this long.
    #[serde(default = "default_settle_secs")]
    pub settle_secs: u64,
    #[serde(default)]
    pub after_upload: AfterUpload,
    #[serde(default = "default_scan_interval_secs")]
    pub scan_interval_secs: u64,
    /// Directory entries examined per scan at most; larger trees take several scans.
    #[serde(default = "default_max_entries_per_scan")]
    pub max_entries_per_scan: usize,
}

fn default_settle_secs() -> u64 {
    30
}
fn default_scan_interval_secs() -> u64 {
    10
}
fn default_max_entries_per_scan() -> usize {
    10_000
}

/// A validated watch.
#[derive(Debug, Clone)]
pub struct Watch {
    /// Canonical.
    pub root: PathBuf,
    pub glob: String,
    pub matcher: GlobMatcher,
    pub dataset: String,
    pub settle: Duration,
    pub after_upload: AfterUpload,
    pub scan_interval: Duration,
    pub max_entries: usize,
}

/// Compiles a watch glob: relative to the root, `*` does not cross `/`.
pub fn compile_glob(glob: &str) -> Result<GlobMatcher, String> {
    if glob.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if glob.starts_with('/') {
        return Err(format!(
            "{glob:?} is absolute; it is matched against paths relative to root"
        ));
    }
    GlobBuilder::new(glob)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("{glob:?} is not a valid glob: {e}"))
}

/// Checks every entry against the canonical `roots`; returns the watches and the problems
/// (each message names the entry: `watch[0] root: …`).
pub fn validate(entries: &[WatchConfig], roots: &[PathBuf]) -> (Vec<Watch>, Vec<String>) {
    let mut watches = Vec::new();
    let mut problems = Vec::new();
    for (i, w) in entries.iter().enumerate() {
        let mut bad = |field: &str, message: String| {
            problems.push(format!("watch[{i}] {field}: {message}"));
        };
        let root = if !w.root.is_absolute() {
            bad(
                "root",
                format!("{} is not an absolute path", w.root.display()),
            );
            None
        } else {
            match w.root.canonicalize() {
                Ok(c) if !c.is_dir() => {
                    bad("root", format!("{} is not a directory", w.root.display()));
                    None
                }
                Ok(c) if !policy::is_under_roots(&c, roots) => {
                    bad(
                        "root",
                        format!(
                            "{} is outside allowed_roots (a watch may only cover files the agent may upload)",
                            w.root.display()
                        ),
                    );
                    None
                }
                Ok(c) => Some(c),
                Err(e) => {
                    bad("root", format!("{}: {e}", w.root.display()));
                    None
                }
            }
        };
        let matcher = match compile_glob(&w.glob) {
            Ok(m) => Some(m),
            Err(e) => {
                bad("glob", e);
                None
            }
        };
        if !valid_dataset(&w.dataset) {
            bad(
                "dataset",
                format!(
                    "{:?} is not a valid dataset label (1-64 of A-Z a-z 0-9 . _ -, not starting with a dot)",
                    w.dataset
                ),
            );
        }
        if !(1..=86_400).contains(&w.settle_secs) {
            bad(
                "settle_secs",
                format!("{} is outside 1..=86400", w.settle_secs),
            );
        }
        if !(1..=3600).contains(&w.scan_interval_secs) {
            bad(
                "scan_interval_secs",
                format!("{} is outside 1..=3600", w.scan_interval_secs),
            );
        }
        if !(MIN_ENTRIES_PER_SCAN..=10_000_000).contains(&w.max_entries_per_scan) {
            bad(
                "max_entries_per_scan",
                format!(
                    "{} is outside {MIN_ENTRIES_PER_SCAN}..=10000000",
                    w.max_entries_per_scan
                ),
            );
        }
        if let (Some(root), Some(matcher)) = (root, matcher) {
            if watches
                .iter()
                .any(|o: &Watch| o.root == root && o.glob == w.glob)
            {
                bad(
                    "root",
                    format!("{} with glob {:?} is watched twice", root.display(), w.glob),
                );
                continue;
            }
            watches.push(Watch {
                root,
                glob: w.glob.clone(),
                matcher,
                dataset: w.dataset.clone(),
                settle: Duration::from_secs(w.settle_secs),
                after_upload: w.after_upload,
                scan_interval: Duration::from_secs(w.scan_interval_secs),
                max_entries: w.max_entries_per_scan,
            });
        }
    }
    if !problems.is_empty() {
        watches.clear();
    }
    (watches, problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::tests::{glob, tree};

    #[test]
    fn globs_match_relative_paths() {
        let g = glob("**/*.mcap");
        assert!(g.is_match("a.mcap"));
        assert!(g.is_match("2024/11/run.mcap"));
        assert!(!g.is_match("run.mcap.tmp"));
        let top = glob("*.bag");
        assert!(top.is_match("x.bag"));
        assert!(!top.is_match("sub/x.bag"), "* must not cross directories");
        assert!(compile_glob("").is_err());
        assert!(compile_glob("/abs/*.mcap").is_err());
        assert!(compile_glob("a[").is_err());
    }

    #[test]
    fn validation_names_each_bad_field() {
        let t = tree(&["inside/x"]);
        let roots = vec![t.root.join("inside")];
        let good = WatchConfig {
            root: t.root.join("inside"),
            glob: "**/*.mcap".into(),
            dataset: "field-tests".into(),
            settle_secs: 5,
            after_upload: AfterUpload::Delete,
            scan_interval_secs: 2,
            max_entries_per_scan: 100,
        };
        let (ws, problems) = validate(std::slice::from_ref(&good), &roots);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(ws.len(), 1);
        assert_eq!(ws[0].settle, Duration::from_secs(5));

        let cases = [
            (
                WatchConfig {
                    root: t.root.clone(),
                    ..good.clone()
                },
                "watch[0] root: ",
            ),
            (
                WatchConfig {
                    root: "rel".into(),
                    ..good.clone()
                },
                "watch[0] root: ",
            ),
            (
                WatchConfig {
                    root: t.root.join("inside/missing"),
                    ..good.clone()
                },
                "watch[0] root: ",
            ),
            (
                WatchConfig {
                    glob: "a[".into(),
                    ..good.clone()
                },
                "watch[0] glob: ",
            ),
            (
                WatchConfig {
                    dataset: "a/b".into(),
                    ..good.clone()
                },
                "watch[0] dataset: ",
            ),
            (
                WatchConfig {
                    settle_secs: 0,
                    ..good.clone()
                },
                "watch[0] settle_secs: ",
            ),
            (
                WatchConfig {
                    scan_interval_secs: 0,
                    ..good.clone()
                },
                "watch[0] scan_interval_secs: ",
            ),
            (
                WatchConfig {
                    max_entries_per_scan: 0,
                    ..good.clone()
                },
                "watch[0] max_entries_per_scan: ",
            ),
        ];
        for (cfg, want) in cases {
            let (ws, problems) = validate(&[cfg], &roots);
            assert!(ws.is_empty());
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].starts_with(want), "{problems:?} vs {want}");
        }
        let (_, problems) = validate(&[good.clone(), good], &roots);
        assert_eq!(problems.len(), 1, "duplicate: {problems:?}");
        assert!(problems[0].starts_with("watch[1] root: "));
    }

    #[test]
    fn the_commented_example_in_the_default_config_is_valid() {
        let text = crate::cli::DEFAULT_CONFIG;
        let start = text.find("# [[watch]]").expect("an example [[watch]]");
        let example: String = text[start..]
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let cfg: crate::config::Config =
            toml::from_str(&format!("{}\n{example}", &text[..start])).unwrap();
        assert_eq!(cfg.watch.len(), 1);
        assert_eq!(cfg.watch[0].dataset, "field-tests");
        let t = tree(&[]);
        let entry = WatchConfig {
            root: t.root.clone(),
            ..cfg.watch[0].clone()
        };
        let (_, problems) = validate(&[entry], std::slice::from_ref(&t.root));
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn watch_entries_parse_from_toml() {
        let w: WatchConfig = toml::from_str(
            r#"
root = "/data/rec"
glob = "**/*.mcap"
dataset = "field-tests"
after_upload = "delete"
"#,
        )
        .unwrap();
        assert_eq!(w.after_upload, AfterUpload::Delete);
        assert_eq!(
            (w.settle_secs, w.scan_interval_secs, w.max_entries_per_scan),
            (30, 10, 10_000)
        );
        assert!(toml::from_str::<WatchConfig>(
            "root='/d'\nglob='*'\ndataset='x'\nafter_upload='shred'"
        )
        .is_err());
        assert!(
            toml::from_str::<WatchConfig>("root='/d'\nglob='*'\ndataset='x'\nsettle='1'").is_err()
        );
    }
}
