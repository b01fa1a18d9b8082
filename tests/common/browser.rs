//! A real browser for tests: Debian's headless Chromium driven through WebDriver
//! (`/usr/bin/chromedriver`, the `chromium-driver` package; `.ci/run` installs both).
//!
//! [`Browser::start`] starts chromedriver on a free loopback port in a process group of its
//! own, and one headless Chromium session through it (`--no-sandbox`: CI runs as root).
//! [`Browser::close`] (or dropping it) ends the session and stops chromedriver and the
//! browser by that process group's id: nothing else is touched. Every wait is bounded by
//! [`super::PATIENCE`].
//!
//! The API is small on purpose: open a URL or a file, read text, click, type, wait for text,
//! take a screenshot; [`Browser::client`] gives the full fantoccini client for the rest.

use super::PATIENCE;
use fantoccini::{Client, ClientBuilder, Locator};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The WebDriver server (package `chromium-driver`).
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The browser (package `chromium`).
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// A headless Chromium session and the chromedriver behind it.
pub struct Browser {
    client: Option<Client>,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a fresh profile, window 1280×900.
    pub async fn start() -> Browser {
        for bin in [CHROMEDRIVER, CHROMIUM] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: apt-get install -y chromium chromium-driver (.ci/run does)"
            );
        }
        // A free port: bound, read, released, then given to chromedriver.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        use std::os::unix::process::CommandExt;
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        let profile = tempfile::tempdir().expect("a profile directory");
        let caps = serde_json::json!({
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,900", "--no-first-run", "--disable-extensions",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }
        });
        let caps = match caps {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("an object literal"),
        };
        let url = format!("http://127.0.0.1:{port}");
        let mut browser = Browser {
            client: None,
            driver,
            _profile: profile,
        };
        let t0 = Instant::now();
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = loop {
            match ClientBuilder::new(connector.clone())
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) if t0.elapsed() >= PATIENCE => {
                    panic!("no WebDriver session after {PATIENCE:?}: {e}")
                }
                Err(e) => {
                    if let Ok(Some(status)) = browser.driver.try_wait() {
                        panic!("chromedriver exited ({status}) before a session: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
            }
        };
        browser.client = Some(client);
        browser
    }

    /// The fantoccini client, for what this API does not cover.
    pub fn client(&self) -> &Client {
        self.client.as_ref().expect("a session until closed")
    }

    /// Opens `url`.
    pub async fn open(&self, url: &str) {
        self.client()
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// Opens a local file (an HTML report).
    pub async fn open_file(&self, path: &Path) {
        let path = path.canonicalize().expect("the file exists");
        self.open(&format!("file://{}", path.display())).await;
    }

    /// The visible text of the first element matching the CSS selector, waiting (bounded)
    /// for it to exist.
    pub async fn text(&self, css: &str) -> String {
        self.wait_text(css, "").await
    }

    /// The visible text of the whole page.
    pub async fn page_text(&self) -> String {
        self.text("body").await
    }

    /// Waits (bounded) until the first element matching `css` exists and its visible text
    /// contains `want`; returns the text.
    pub async fn wait_text(&self, css: &str, want: &str) -> String {
        let t0 = Instant::now();
        let mut last = String::from("(no such element)");
        loop {
            if let Ok(e) = self.client().find(Locator::Css(css)).await {
                if let Ok(t) = e.text().await {
                    if t.contains(want) {
                        return t;
                    }
                    last = t;
                }
            }
            if t0.elapsed() >= PATIENCE {
                panic!(
                    "gave up after {PATIENCE:?} waiting for {want:?} in {css}; last seen: {last:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the first element matching `css` (waiting, bounded, for it to be shown).
    pub async fn click(&self, css: &str) {
        let t0 = Instant::now();
        loop {
            if let Ok(e) = self.client().find(Locator::Css(css)).await {
                if e.is_displayed().await.unwrap_or(false) && e.click().await.is_ok() {
                    return;
                }
            }
            if t0.elapsed() >= PATIENCE {
                panic!("gave up after {PATIENCE:?} waiting to click {css}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clears the input matching `css` and types `text` into it (for a file input: its path).
    pub async fn fill(&self, css: &str, text: &str) {
        let e = self
            .client()
            .wait()
            .at_most(PATIENCE)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"));
        if e.attr("type").await.ok().flatten().as_deref() != Some("file") {
            e.clear()
                .await
                .unwrap_or_else(|e| panic!("clear {css}: {e}"));
        }
        e.send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// Writes a PNG screenshot of the window to `path` (parent folders created).
    pub async fn screenshot(&self, path: &Path) {
        let png = self
            .client()
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot folder");
        }
        std::fs::write(path, png).expect("screenshot written");
    }

    /// Ends the session, then stops chromedriver and the browser.
    pub async fn close(mut self) {
        if let Some(c) = self.client.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), c.close()).await;
        }
        // Drop stops the processes.
    }
}

impl Drop for Browser {
    /// Stops chromedriver and the browser it started: the process group chromedriver leads
    /// (its id is chromedriver's PID), then reaps chromedriver.
    fn drop(&mut self) {
        let pgid = self.driver.id();
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{pgid}")])
            .stderr(Stdio::null())
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.driver.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .stderr(Stdio::null())
            .status();
        let _ = self.driver.wait();
    }
}
