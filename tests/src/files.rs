//! Source files with known content, SHA-256, and objects downloaded from S3.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

use crate::env::TestEnv;

#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: PathBuf,
    pub size: u64,
    /// Lower-case hex SHA-256 of the content.
    pub sha256: String,
}

impl SourceFile {
    pub fn path_str(&self) -> &str {
        self.path.to_str().expect("test paths are UTF-8")
    }
}

/// Writes `size` pseudo-random bytes (seeded from the path) and returns their SHA-256.
pub async fn write_random_file(path: &Path, size: u64) -> SourceFile {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("create source dir");
        }
        let seed = u64::from_le_bytes(
            Sha256::digest(path.as_os_str().as_encoded_bytes())[..8]
                .try_into()
                .expect("8 bytes"),
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(&path).unwrap_or_else(|e| panic!("create {path:?}: {e}")),
        );
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            rng.fill_bytes(&mut buf[..n]);
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).expect("write source file");
            left -= n as u64;
        }
        file.into_inner()
            .expect("flush source file")
            .sync_all()
            .expect("sync source file");
        SourceFile {
            path,
            size,
            sha256: hex::encode(hasher.finalize()),
        }
    })
    .await
    .expect("write_random_file task")
}

/// SHA-256 (hex) and length of a file.
pub fn sha256_file(path: &Path) -> (String, u64) {
    let mut file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    (hex::encode(hasher.finalize()), len)
}

/// Downloads `bucket/key` with a SigV4-signed GET (curl `--aws-sigv4`) into `dest` and
/// returns the HTTP status.
pub async fn s3_download(env: &TestEnv, bucket: &str, key: &str, dest: &Path) -> u16 {
    let url = format!("{}/{bucket}/{key}", env.s3_endpoint);
    let out = tokio::process::Command::new("curl")
        .arg("-sS")
        .arg("--max-time")
        .arg("120")
        .arg("-o")
        .arg(dest)
        .arg("-w")
        .arg("%{http_code}")
        // Signed in; AWS S3 and Garage refuse a request without it (400).
        .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
        .arg("--aws-sigv4")
        .arg(format!("aws:amz:{}:s3", env.s3_region))
        .arg("--user")
        .arg(format!("{}:{}", env.s3_access_key, env.s3_secret_key))
        .arg(&url)
        .output()
        .await
        .expect("run curl");
    let code = String::from_utf8_lossy(&out.stdout);
    code.trim().parse().unwrap_or_else(|_| {
        panic!(
            "curl GET {url} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Deletes `bucket/key` with a SigV4-signed DELETE (curl `--aws-sigv4`); returns the HTTP
/// status (204 when deleted).
pub async fn s3_delete(env: &TestEnv, bucket: &str, key: &str) -> u16 {
    let url = format!("{}/{bucket}/{key}", env.s3_endpoint);
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "60",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["-X", "DELETE"])
        .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
        .arg("--aws-sigv4")
        .arg(format!("aws:amz:{}:s3", env.s3_region))
        .arg("--user")
        .arg(format!("{}:{}", env.s3_access_key, env.s3_secret_key))
        .arg(&url)
        .output()
        .await
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}
