//! A running stack's services: waiting for them to come up, noticing one that died,
//! stopping, restarting and killing them, and their logs when a test fails.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Mutex;
use std::time::Duration;

use super::{lock, Service, Stack};
use crate::process::{log_tail, Process};

impl Stack {
    pub(super) async fn wait_api_healthy(&self, timeout: Duration) {
        self.wait_instance_healthy(0, timeout).await;
    }

    /// Waits until API instance `i` answers `GET /healthz` with 200.
    pub(super) async fn wait_instance_healthy(&self, i: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.with_instance(Service::Api, i, |p| p.exited()) {
                panic!("uplink-api instance {i} exited during start-up ({status})");
            }
            if let Ok(resp) = self
                .http
                .get(format!("{}/healthz", self.api_instance_urls[i]))
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                if resp.status().is_success() {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "uplink-api: GET /healthz not 200 within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub(super) async fn wait_tcp(&self, name: &str, port: u16, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.assert_alive();
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}: 127.0.0.1:{port} does not accept connections within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Panics when a service the test did not stop has exited.
    pub fn assert_alive(&self) {
        if let Some(status) = lock(&self.api).exited() {
            panic!("uplink-api exited unexpectedly ({status})");
        }
        if let Some(status) = lock(&self.bridge).exited() {
            panic!("uplink-bridge exited unexpectedly ({status})");
        }
        if let Some(status) = lock(&self.mosquitto).as_mut().and_then(|m| m.exited()) {
            panic!("mosquitto exited unexpectedly ({status})");
        }
        for (which, more) in [
            ("uplink-api", &self.more_apis),
            ("uplink-bridge", &self.more_bridges),
        ] {
            for (i, p) in lock(more).iter_mut().enumerate() {
                if let Some(status) = p.exited() {
                    panic!("{which} instance {} exited unexpectedly ({status})", i + 1);
                }
            }
        }
        for (id, agent) in lock(&self.agents).iter_mut() {
            if let Some(status) = agent.exited() {
                panic!("uplink-agent of {id} exited unexpectedly ({status})");
            }
        }
    }

    /// Sends SIGTERM to the API or the bridge.
    pub fn terminate(&self, which: Service) {
        lock(self.service(which)).terminate();
    }

    /// The log of the API or the bridge so far.
    pub fn log_of(&self, which: Service) -> String {
        let path = lock(self.service(which)).log.clone();
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// Waits until the API or the bridge has exited on its own: its status, or `None` if it
    /// is still running after `timeout`.
    pub async fn wait_exit(&self, which: Service, timeout: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = lock(self.service(which)).exited() {
                return Some(status);
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(super) fn service(&self, which: Service) -> &Mutex<Process> {
        match which {
            Service::Api => &self.api,
            Service::Bridge => &self.bridge,
        }
    }

    pub fn kill_api(&self) {
        lock(&self.api).kill();
    }

    pub async fn restart_api(&self) {
        self.restart_api_with(&[]).await;
    }

    /// Restarts the API with `env` set (kept for later restarts until set again).
    pub async fn restart_api_with(&self, env: &[(&str, &str)]) {
        {
            let mut api = lock(&self.api);
            api.kill();
            for (k, v) in env {
                api.set_env(k, v);
            }
            api.start();
        }
        self.wait_api_healthy(Duration::from_secs(60)).await;
    }

    pub fn kill_bridge(&self) {
        lock(&self.bridge).kill();
    }

    pub async fn restart_bridge(&self) {
        {
            let mut bridge = lock(&self.bridge);
            bridge.kill();
            bridge.start();
        }
        self.wait_tcp("uplink-bridge", self.mqtt_port, Duration::from_secs(30))
            .await;
    }

    /// Prints every process's log (tail) to stderr.
    pub fn dump_logs(&self) {
        let mut logs: Vec<(String, PathBuf)> = vec![
            ("uplink-api".into(), lock(&self.api).log.clone()),
            ("uplink-bridge".into(), lock(&self.bridge).log.clone()),
        ];
        for (which, more) in [
            ("uplink-api", &self.more_apis),
            ("uplink-bridge", &self.more_bridges),
        ] {
            for (i, p) in lock(more).iter().enumerate() {
                logs.push((format!("{which} instance {}", i + 1), p.log.clone()));
            }
        }
        if let Some(m) = lock(&self.mosquitto).as_ref() {
            logs.push(("mosquitto".into(), m.log.clone()));
        }
        for (id, agent) in lock(&self.agents).iter() {
            logs.push((format!("uplink-agent {id}"), agent.log.clone()));
        }
        for (name, path) in logs {
            eprintln!(
                "\n----- {name} log ({}) -----\n{}",
                path.display(),
                log_tail(&path, 48 * 1024)
            );
        }
        eprintln!(
            "----- proxy: {} bytes from agents, {} bytes back, {} connections -----",
            self.proxy.bytes_sent(),
            self.proxy.bytes_received(),
            self.proxy.connections()
        );
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for agent in lock(&self.agents).values_mut() {
            agent.kill();
        }
        lock(&self.bridge).kill();
        for p in lock(&self.more_bridges).iter_mut() {
            p.kill();
        }
        if let Some(m) = lock(&self.mosquitto).as_mut() {
            m.kill();
        }
        lock(&self.api).kill();
        for p in lock(&self.more_apis).iter_mut() {
            p.kill();
        }
        if std::thread::panicking() {
            eprintln!("\n===== test failed: logs of its processes =====");
            self.dump_logs();
        }
        if std::env::var("UPLINK_TEST_KEEP").as_deref() == Ok("1") {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
            eprintln!("keeping {}", dir.keep().display());
        }
    }
}
