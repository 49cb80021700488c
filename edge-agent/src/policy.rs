//! Which files the agent may upload: regular files under the configured roots, reached
//! without `..` and without a symlink leading outside them.

use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("path {0} is not absolute")]
    NotAbsolute(String),
    #[error("path {0} contains a '..' component")]
    ParentComponent(String),
    #[error("path {0} does not exist or cannot be read: {1}")]
    Unreadable(String, String),
    #[error("path {0} is outside the allowed roots")]
    OutsideRoots(String),
    #[error("path {0} is not a regular file ({1})")]
    NotRegularFile(String, &'static str),
}

/// The checks that need no file system: absolute, no `..`, no NUL.
pub fn check_lexical(path: &str) -> Result<&Path, PolicyError> {
    let p = Path::new(path);
    if !p.is_absolute() || path.contains('\0') {
        return Err(PolicyError::NotAbsolute(path.into()));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(PolicyError::ParentComponent(path.into()));
    }
    Ok(p)
}

/// Whether `canonical` lies under one of `roots` (component-wise: `/data2` is not under `/data`).
/// Both sides must already be canonical.
pub fn is_under_roots(canonical: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|root| canonical.starts_with(root))
}

/// Applies the whole policy and returns the canonical path of the file to upload.
/// `roots` must be canonical (see [`crate::config::Loaded::roots`]).
pub fn check(path: &str, roots: &[PathBuf]) -> Result<PathBuf, PolicyError> {
    let p = check_lexical(path)?;
    let canonical = p
        .canonicalize()
        .map_err(|e| PolicyError::Unreadable(path.into(), e.kind().to_string()))?;
    if !is_under_roots(&canonical, roots) {
        return Err(PolicyError::OutsideRoots(path.into()));
    }
    let meta = std::fs::metadata(&canonical)
        .map_err(|e| PolicyError::Unreadable(path.into(), e.kind().to_string()))?;
    let ft = meta.file_type();
    if !ft.is_file() {
        return Err(PolicyError::NotRegularFile(path.into(), kind(&ft)));
    }
    Ok(canonical)
}

fn kind(ft: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Fixture {
        _dir: tempfile::TempDir,
        base: PathBuf,
        roots: Vec<PathBuf>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(base.join("data/rec")).unwrap();
        std::fs::create_dir_all(base.join("data2")).unwrap();
        std::fs::create_dir_all(base.join("outside")).unwrap();
        std::fs::write(base.join("data/rec/run.mcap"), b"bytes").unwrap();
        std::fs::write(base.join("data2/x.bin"), b"x").unwrap();
        std::fs::write(base.join("outside/secret"), b"s").unwrap();
        Fixture {
            roots: vec![base.join("data")],
            base,
            _dir: dir,
        }
    }

    fn s(p: PathBuf) -> String {
        p.to_string_lossy().into_owned()
    }

    #[test]
    fn regular_file_under_root_is_allowed() {
        let f = fixture();
        let p = f.base.join("data/rec/run.mcap");
        assert_eq!(check(&s(p.clone()), &f.roots), Ok(p));
    }

    #[test]
    fn relative_and_dotdot_are_refused() {
        let f = fixture();
        assert!(matches!(
            check("data/rec/run.mcap", &f.roots),
            Err(PolicyError::NotAbsolute(_))
        ));
        let p = format!("{}/data/../outside/secret", f.base.display());
        assert!(matches!(
            check(&p, &f.roots),
            Err(PolicyError::ParentComponent(_))
        ));
        // Even when `..` would stay inside the root.
        let p = format!("{}/data/rec/../rec/run.mcap", f.base.display());
        assert!(matches!(
            check(&p, &f.roots),
            Err(PolicyError::ParentComponent(_))
        ));
    }

    #[test]
    fn outside_roots_is_refused() {
        let f = fixture();
        assert_eq!(
            check("/etc/passwd", &f.roots),
            Err(PolicyError::OutsideRoots("/etc/passwd".into()))
        );
        assert_eq!(
            check("/etc/passwd", &f.roots).unwrap_err().to_string(),
            "path /etc/passwd is outside the allowed roots"
        );
        // String prefix is not enough: data2 is not under data.
        let p = s(f.base.join("data2/x.bin"));
        assert_eq!(
            check(&p, &f.roots),
            Err(PolicyError::OutsideRoots(p.clone()))
        );
    }

    #[test]
    fn symlink_escape_is_refused_and_inner_symlink_allowed() {
        let f = fixture();
        let link = f.base.join("data/escape");
        symlink(f.base.join("outside/secret"), &link).unwrap();
        assert!(matches!(
            check(&s(link), &f.roots),
            Err(PolicyError::OutsideRoots(_))
        ));
        let dir_link = f.base.join("data/outdir");
        symlink(f.base.join("outside"), &dir_link).unwrap();
        assert!(matches!(
            check(&s(dir_link.join("secret")), &f.roots),
            Err(PolicyError::OutsideRoots(_))
        ));
        let inner = f.base.join("data/inner");
        symlink(f.base.join("data/rec/run.mcap"), &inner).unwrap();
        assert_eq!(
            check(&s(inner), &f.roots),
            Ok(f.base.join("data/rec/run.mcap"))
        );
    }

    #[test]
    fn non_regular_files_are_refused() {
        let f = fixture();
        let err = check(&s(f.base.join("data/rec")), &f.roots).unwrap_err();
        assert_eq!(
            err,
            PolicyError::NotRegularFile(s(f.base.join("data/rec")), "a directory")
        );
        assert!(err.to_string().contains("is not a regular file"));

        let fifo = f.base.join("data/fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(
            check(&s(fifo.clone()), &f.roots),
            Err(PolicyError::NotRegularFile(s(fifo), "a FIFO"))
        );

        let sock = f.base.join("data/sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert_eq!(
            check(&s(sock.clone()), &f.roots),
            Err(PolicyError::NotRegularFile(s(sock), "a socket"))
        );

        // A device reached through a symlink inside the root is still outside the roots;
        // with /dev as a root it is refused as a device.
        let dev_roots = vec![PathBuf::from("/dev")];
        assert_eq!(
            check("/dev/null", &dev_roots),
            Err(PolicyError::NotRegularFile("/dev/null".into(), "a device"))
        );
    }

    #[test]
    fn missing_file_is_refused() {
        let f = fixture();
        assert!(matches!(
            check(&s(f.base.join("data/nope")), &f.roots),
            Err(PolicyError::Unreadable(_, _))
        ));
    }

    #[test]
    fn root_prefix_is_component_wise() {
        let roots = vec![PathBuf::from("/data")];
        assert!(is_under_roots(Path::new("/data/a"), &roots));
        assert!(is_under_roots(Path::new("/data"), &roots));
        assert!(!is_under_roots(Path::new("/data2/a"), &roots));
        assert!(!is_under_roots(Path::new("/dat"), &roots));
    }
}
