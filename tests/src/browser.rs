//! A real browser for the web console's tests: Debian's headless Chromium driven over
//! WebDriver by `chromedriver`, started on a free 127.0.0.1 port for one test and stopped
//! when the [`Browser`] is dropped. `scripts/lib.sh ensure_deps` installs both
//! (`chromium`, `chromium-driver`); a test without them fails and says so.

use std::path::PathBuf;
use std::time::Duration;

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::process::Process;
use crate::stack::free_port;

/// How long a step waits for the page by default.
pub const WAIT: Duration = Duration::from_secs(30);

fn find_program(names: &[&str], env: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    for name in names {
        for dir in std::env::var("PATH").unwrap_or_default().split(':') {
            let p = PathBuf::from(dir).join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "{} not found (set {env}, or install it: `. scripts/lib.sh && ensure_deps` \
         installs Debian's chromium and chromium-driver)",
        names[0]
    )
}

pub struct Browser {
    pub client: Client,
    // Dropped after the client: chromedriver is killed last.
    _driver: Process,
    profile: tempfile::TempDir,
}

impl Drop for Browser {
    /// A test that panicked never closed its session: stop its Chromium by the process id
    /// in the profile's `SingletonLock` (`{host}-{pid}`), since killing chromedriver leaves
    /// the browser running.
    fn drop(&mut self) {
        let lock = self.profile.path().join("profile").join("SingletonLock");
        if let Some(pid) = std::fs::read_link(&lock)
            .ok()
            .and_then(|t| {
                t.to_str()
                    .and_then(|t| t.rsplit('-').next())
                    .map(str::to_owned)
            })
            .and_then(|p| p.parse::<u32>().ok())
        {
            std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .ok();
        }
    }
}

impl Browser {
    /// Starts chromedriver and a headless Chromium window of `width`×`height`.
    pub async fn start_sized(width: u32, height: u32) -> Browser {
        let chromium = find_program(&["chromium", "chromium-browser"], "UPLINK_CHROMIUM");
        let driver_bin = find_program(&["chromedriver"], "UPLINK_CHROMEDRIVER");
        let profile = tempfile::Builder::new()
            .prefix("uplink-chromium-")
            .tempdir()
            .expect("profile dir");
        let port = free_port();
        let mut driver = Process::new(
            "chromedriver",
            &driver_bin,
            &[&format!("--port={port}"), "--allowed-ips=127.0.0.1"],
            profile.path().join("chromedriver.log"),
        );
        driver.start();
        let url = format!("http://127.0.0.1:{port}");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-extensions", "--disable-background-networking",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", profile.path().join("profile").display()),
                ],
            }),
        );
        let deadline = tokio::time::Instant::now() + WAIT;
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "chromedriver at {url} did not open a Chromium session within {WAIT:?}: {e} \
                         (log: {})",
                        profile.path().join("chromedriver.log").display()
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        Browser {
            client,
            _driver: driver,
            profile,
        }
    }

    pub async fn start() -> Browser {
        Browser::start_sized(1280, 900).await
    }

    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// Navigates within the console (`#/fleet`, `#/uploads`, …) without reloading.
    pub async fn goto_hash(&self, hash: &str) {
        self.eval(&format!(
            "location.hash = {}; return null",
            serde_json::json!(hash)
        ))
        .await;
    }

    /// The first element matching `css`, waiting for it to exist and be displayed.
    pub async fn find(&self, css: &str) -> Element {
        self.find_within(css, WAIT).await
    }

    pub async fn find_within(&self, css: &str, timeout: Duration) -> Element {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(e) = self.client.find(Locator::Css(css)).await {
                if e.is_displayed().await.unwrap_or(false) {
                    return e;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let text = self.page_text().await;
                panic!("no visible {css} within {timeout:?}; the page says:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether some element matching `css` is displayed now.
    pub async fn visible(&self, css: &str) -> bool {
        for e in self
            .client
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_default()
        {
            if e.is_displayed().await.unwrap_or(false) {
                return true;
            }
        }
        false
    }

    pub async fn click(&self, css: &str) {
        let mut attempt = 0;
        loop {
            match self.find(css).await.click().await {
                Ok(()) => return,
                // Re-rendered between finding and clicking (a live update): as a person
                // would, click the new one.
                Err(e) if attempt < 5 && e.to_string().contains("stale element") => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("click {css}: {e}"),
            }
        }
    }

    /// Clears the input matching `css` and types `text` into it.
    pub async fn fill(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        e.clear()
            .await
            .unwrap_or_else(|e| panic!("clear {css}: {e}"));
        e.send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    pub async fn text(&self, css: &str) -> String {
        self.find(css)
            .await
            .text()
            .await
            .unwrap_or_else(|e| panic!("text of {css}: {e}"))
    }

    pub async fn attr(&self, css: &str, name: &str) -> Option<String> {
        self.find(css)
            .await
            .attr(name)
            .await
            .unwrap_or_else(|e| panic!("attribute {name} of {css}: {e}"))
    }

    /// Waits until the text of `css` satisfies `ok`; returns it.
    pub async fn wait_text(
        &self,
        css: &str,
        timeout: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = String::new();
        loop {
            if let Ok(e) = self.client.find(Locator::Css(css)).await {
                if let Ok(t) = e.text().await {
                    if ok(&t) {
                        return t;
                    }
                    last = t;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "{css} did not reach the expected text within {timeout:?}; last: {last:?}; page:\n{}",
                    self.page_text().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs `script` in the page (as a function body) and returns its value.
    pub async fn eval(&self, script: &str) -> serde_json::Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script {script:?}: {e}"))
    }

    pub async fn page_text(&self) -> String {
        match self.client.find(Locator::Css("body")).await {
            Ok(b) => b.text().await.unwrap_or_default(),
            Err(e) => format!("(no body: {e})"),
        }
    }

    /// A PNG of the window.
    pub async fn screenshot(&self) -> Vec<u8> {
        self.client.screenshot().await.expect("screenshot")
    }

    /// With `UPLINK_SCREENSHOTS_DIR` set (scripts/screenshots), saves a PNG of the window
    /// there as `{name}.png`, for the docs; otherwise does nothing.
    pub async fn snapshot(&self, name: &str) {
        if let Ok(dir) = std::env::var("UPLINK_SCREENSHOTS_DIR") {
            let path = PathBuf::from(dir).join(format!("{name}.png"));
            std::fs::write(&path, self.screenshot().await)
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        }
    }

    /// Ends the WebDriver session (Chromium exits) before chromedriver is stopped.
    pub async fn close(self) {
        self.client.clone().close().await.ok();
    }

    /// Signs in to the console at `api_url` with `token`; waits for the fleet page.
    pub async fn sign_in(&self, api_url: &str, token: &str) {
        self.goto(&format!("{api_url}/console/")).await;
        self.fill("#token", token).await;
        self.click("#signin button[type=submit]").await;
        self.find("#nav a[href='#/fleet']").await;
    }
}
