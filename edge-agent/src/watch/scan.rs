//! Scanning: the sorted, depth-first, bounded walk of a watch's root that finds the matching
//! regular files, and goes on after a cursor when a scan stops at its budget.

use std::path::{Path, PathBuf};

use globset::GlobMatcher;

use super::MAX_DEPTH;
use crate::hasher::FileIdentity;

/// A matching regular file a scan found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub path: PathBuf,
    pub identity: FileIdentity,
}

#[derive(Debug, Default)]
pub struct Scan {
    pub found: Vec<Found>,
    /// Directory entries examined.
    pub examined: usize,
    /// Where the next scan goes on (`None`: this one reached the end of the tree).
    pub resume_after: Option<PathBuf>,
    /// Directories that could not be read.
    pub errors: Vec<String>,
}

/// Names that are being written or are not meant to be uploaded.
pub fn ignored_name(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with('~')
        || [".tmp", ".part", ".partial"]
            .iter()
            .any(|s| name.ends_with(s))
}

struct Walker<'a> {
    root: &'a Path,
    matcher: &'a GlobMatcher,
    skip: &'a [PathBuf],
    cursor: Option<&'a Path>,
    budget: usize,
    last: Option<PathBuf>,
    scan: Scan,
}

impl Walker<'_> {
    /// Returns false when the budget ran out.
    fn dir(&mut self, dir: &Path, depth: usize) -> bool {
        let mut names = match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.file_name()))
                .collect::<Vec<_>>(),
            Err(e) => {
                self.scan.errors.push(format!("{}: {e}", dir.display()));
                return true;
            }
        };
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let Some(name) = name.to_str() else {
                continue; // not UTF-8: the job table and the policy work on UTF-8 paths
            };
            if ignored_name(name) || self.skip.iter().any(|s| path.starts_with(s)) {
                continue;
            }
            // Entries the previous, budget-limited scan examined come after it next time;
            // `path` orders exactly as this sorted depth-first walk visits.
            // The cursor is the last entry finished (a directory only once its whole subtree
            // is): skip it and everything before it, but enter the directories holding it.
            if let Some(cursor) = self.cursor {
                if path.as_path() <= cursor && (path == cursor || !cursor.starts_with(&path)) {
                    continue;
                }
            }
            if self.scan.examined >= self.budget {
                return false;
            }
            self.scan.examined += 1;
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue; // gone since read_dir
            };
            let ft = meta.file_type();
            if ft.is_dir() {
                if depth < MAX_DEPTH && !self.dir(&path, depth + 1) {
                    return false;
                }
            } else if ft.is_file() {
                let matches = path
                    .strip_prefix(self.root)
                    .is_ok_and(|rel| self.matcher.is_match(rel));
                if matches {
                    self.scan.found.push(Found {
                        identity: FileIdentity::of(&meta),
                        path: path.clone(),
                    });
                }
            }
            // Symlinks, FIFOs, sockets and devices are skipped.
            self.last = Some(path);
        }
        true
    }
}

/// Walks `root` (canonical) in sorted depth-first order, after `cursor` when given, examining
/// at most `budget` entries. Never follows symlinks.
pub fn walk(
    root: &Path,
    matcher: &GlobMatcher,
    skip: &[PathBuf],
    cursor: Option<&Path>,
    budget: usize,
) -> Scan {
    let mut w = Walker {
        root,
        matcher,
        skip,
        cursor,
        budget,
        last: None,
        scan: Scan::default(),
    };
    let complete = w.dir(root, 0);
    let mut scan = w.scan;
    if !complete {
        // Nothing examined past the cursor yet: keep it.
        scan.resume_after = w.last.or_else(|| cursor.map(Path::to_path_buf));
    }
    scan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::tests::{glob, tree, Tree};

    #[test]
    fn ignored_names() {
        for n in [
            ".hidden.mcap",
            ".run.mcap.Xy12",
            "a.mcap~",
            "a.tmp",
            "a.part",
            "a.partial",
        ] {
            assert!(ignored_name(n), "{n}");
        }
        for n in ["a.mcap", "tmp.mcap", "partial-run.bag"] {
            assert!(!ignored_name(n), "{n}");
        }
    }

    fn rel(t: &Tree, scan: &Scan) -> Vec<String> {
        scan.found
            .iter()
            .map(|f| {
                f.path
                    .strip_prefix(&t.root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }

    #[test]
    fn walk_finds_matching_regular_files_only() {
        use std::os::unix::fs::symlink;
        let t = tree(&[
            "a.mcap",
            "b.txt",
            "sub/c.mcap",
            "sub/deeper/d.mcap",
            ".hidden/e.mcap",
            "sub/.f.mcap.tmpXYZ",
            "sub/g.mcap.part",
            "state/agent.mcap",
        ]);
        symlink(t.root.join("a.mcap"), t.root.join("link.mcap")).unwrap();
        symlink(t.root.join("sub"), t.root.join("linkdir")).unwrap();
        std::fs::create_dir(t.root.join("dir.mcap")).unwrap();
        let skip = vec![t.root.join("state")];
        let scan = walk(&t.root, &glob("**/*.mcap"), &skip, None, 1000);
        assert_eq!(
            rel(&t, &scan),
            vec!["a.mcap", "sub/c.mcap", "sub/deeper/d.mcap"]
        );
        assert_eq!(scan.resume_after, None);
        assert!(scan.errors.is_empty());
        let top = walk(&t.root, &glob("*.mcap"), &skip, None, 1000);
        assert_eq!(rel(&t, &top), vec!["a.mcap"]);
    }

    #[test]
    fn a_limited_walk_goes_on_where_it_stopped_and_covers_everything() {
        let names: Vec<String> = (0..7)
            .flat_map(|d| (0..5).map(move |f| format!("d{d}/f{f}.bin")))
            .collect();
        let t = tree(&names.iter().map(String::as_str).collect::<Vec<_>>());
        // Entries that are not files count too and must not stall the cursor.
        for i in 0..9 {
            std::fs::create_dir_all(t.root.join(format!("d3/empty{i}"))).unwrap();
            std::os::unix::fs::symlink(t.root.join("d0"), t.root.join(format!("d5/link{i}")))
                .unwrap();
        }
        let g = glob("**/*.bin");
        let mut cursor: Option<PathBuf> = None;
        let mut seen = Vec::new();
        let mut scans = 0;
        loop {
            let scan = walk(&t.root, &g, &[], cursor.as_deref(), 4);
            assert!(scan.examined <= 4, "budget respected");
            seen.extend(rel(&t, &scan));
            scans += 1;
            match scan.resume_after {
                Some(c) => cursor = Some(c),
                None => break,
            }
            assert!(scans < 100, "walk never ends");
        }
        let mut want = names.clone();
        want.sort();
        assert_eq!(seen, want, "every file exactly once, in order");
        assert!(scans > 5);
    }
}
