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

use super::{eventually_async, poll_async, poll_blocking, PATIENCE};
use fantoccini::{Client, ClientBuilder, Locator};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let driver = &mut browser.driver;
        let (connector, caps, url) = (&connector, &caps, &url);
        let client = poll_async(PATIENCE, || {
            let exited = driver.try_wait();
            async move {
                let connect = ClientBuilder::new(connector.clone())
                    .capabilities(caps.clone())
                    .connect(url)
                    .await;
                match connect {
                    Ok(c) => Ok(c),
                    Err(e) => {
                        if let Ok(Some(status)) = exited {
                            panic!("chromedriver exited ({status}) before a session: {e}");
                        }
                        Err(e.to_string())
                    }
                }
            }
        })
        .await
        .unwrap_or_else(|e| panic!("no WebDriver session after {PATIENCE:?}: {e}"));
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
        let client = self.client();
        eventually_async(&format!("{want:?} in {css}"), || async move {
            let Ok(e) = client.find(Locator::Css(css)).await else {
                return Err("(no such element)".to_string());
            };
            match e.text().await {
                Ok(t) if t.contains(want) => Ok(t),
                Ok(t) => Err(format!("{t:?}")),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
    }

    /// Clicks the first element matching `css` (waiting, bounded, for it to be shown).
    pub async fn click(&self, css: &str) {
        let client = self.client();
        eventually_async(&format!("a shown {css} to click"), || async move {
            match client.find(Locator::Css(css)).await {
                Ok(e) => e.is_displayed().await.unwrap_or(false) && e.click().await.is_ok(),
                Err(_) => false,
            }
        })
        .await
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
        let _ = poll_blocking(Duration::from_secs(5), || {
            matches!(self.driver.try_wait(), Ok(Some(_)))
        });
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .stderr(Stdio::null())
            .status();
        let _ = self.driver.wait();
    }
}
