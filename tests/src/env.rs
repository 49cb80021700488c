//! What `scripts/test` exports for the end-to-end tests.

use std::path::PathBuf;

/// The test environment. Every variable is required: a missing one fails the test.
#[derive(Debug, Clone)]
pub struct TestEnv {
    /// Superuser URL to the throw-away cluster's `postgres` database.
    pub database_url: String,
    pub s3_endpoint: String,
    pub s3_access_key: String,
    pub s3_secret_key: String,
    pub s3_bucket: String,
    pub s3_region: String,
    /// Directory holding `uplink-api`, `uplink-bridge` and `uplink-agent`.
    pub bin_dir: PathBuf,
    /// Path of the mosquitto binary (external-broker tests).
    pub mosquitto: PathBuf,
}

const HOW: &str = "the end-to-end tests need the dev stack: run `scripts/test` \
     (it starts PostgreSQL and SeaweedFS, builds the services and exports the UPLINK_TEST_* variables)";

fn var(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!("{name} is not set: {HOW}"),
    }
}

impl TestEnv {
    /// Reads the environment, panicking with instructions when anything is missing.
    pub fn from_env() -> TestEnv {
        let env = TestEnv {
            database_url: var("UPLINK_TEST_DATABASE_URL"),
            s3_endpoint: var("UPLINK_TEST_S3_ENDPOINT")
                .trim_end_matches('/')
                .to_string(),
            s3_access_key: var("UPLINK_TEST_S3_ACCESS_KEY"),
            s3_secret_key: var("UPLINK_TEST_S3_SECRET_KEY"),
            s3_bucket: var("UPLINK_TEST_S3_BUCKET"),
            s3_region: std::env::var("UPLINK_TEST_S3_REGION")
                .unwrap_or_else(|_| "us-east-1".to_string()),
            bin_dir: PathBuf::from(var("UPLINK_BIN_DIR")),
            mosquitto: PathBuf::from(var("UPLINK_TEST_MOSQUITTO")),
        };
        assert!(
            env.mosquitto.is_file(),
            "UPLINK_TEST_MOSQUITTO={} is not a file: {HOW}",
            env.mosquitto.display()
        );
        env
    }

    /// Panics unless the three service binaries exist in `bin_dir`.
    pub fn require_binaries(&self) {
        for bin in ["uplink-api", "uplink-bridge", "uplink-agent"] {
            let path = self.bin(bin);
            assert!(
                path.is_file(),
                "{} does not exist (UPLINK_BIN_DIR={}): build the services first \
                 (`cargo build -p uplink-api -p uplink-bridge -p uplink-agent`) or {HOW}",
                path.display(),
                self.bin_dir.display()
            );
        }
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// Mosquitto's password-file tool: `UPLINK_TEST_MOSQUITTO_PASSWD`, else
    /// `mosquitto_passwd` beside Mosquitto ([`TestEnv::mosquitto_tool`]).
    pub fn mosquitto_passwd(&self) -> PathBuf {
        match std::env::var("UPLINK_TEST_MOSQUITTO_PASSWD") {
            Ok(p) => PathBuf::from(p),
            Err(_) => self.mosquitto_tool("mosquitto_passwd"),
        }
    }

    /// A tool that comes with Mosquitto (`mosquitto_passwd`, `mosquitto_ctrl`): next to the
    /// mosquitto binary, in `../bin` from it (Debian puts the broker in /usr/sbin and the
    /// tools in /usr/bin) or on `PATH`.
    pub fn mosquitto_tool(&self, name: &str) -> PathBuf {
        let beside = self.mosquitto.parent().map(PathBuf::from);
        let path_var = std::env::var_os("PATH").unwrap_or_default();
        let candidates = beside
            .iter()
            .flat_map(|d| [d.clone(), d.join("../bin")])
            .chain(std::env::split_paths(&path_var))
            .map(|d| d.join(name));
        for path in candidates {
            if path.is_file() {
                return path;
            }
        }
        panic!(
            "{name} not found next to {} nor on PATH (it comes with Mosquitto): {HOW}",
            self.mosquitto.display()
        )
    }
}
