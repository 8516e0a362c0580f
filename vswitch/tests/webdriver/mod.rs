//! A headless Chromium driven over the W3C WebDriver protocol (chromedriver
//! from the distribution): just the commands the web view's test needs —
//! open a page, find an element, type, click, run a script. The protocol is
//! JSON over HTTP; see docs/decisions.md for why this is not a crate.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{free_address, http};

/// The key W3C WebDriver uses for element references.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Where the distribution puts them.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Whether chromedriver and chromium are installed. In CI they must be
/// (scripts/test.sh installs them): missing there fails the test.
pub fn available() -> bool {
    let there =
        std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists();
    if !there {
        assert!(
            std::env::var_os("CI").is_none(),
            "the browser test cannot run in CI: {CHROMEDRIVER} or {CHROMIUM} missing (apt-get install chromium chromium-driver)"
        );
        eprintln!("skipping the browser test: chromium and chromium-driver are not installed");
    }
    there
}

/// chromedriver with one headless browser session; both end on drop.
pub struct Browser {
    driver: Child,
    addr: String,
    session: String,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and a headless session.
    pub fn start() -> Browser {
        let addr = free_address();
        let port = addr.rsplit_once(':').unwrap().1.to_string();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let mut b = Browser {
            driver,
            addr,
            session: String::new(),
        };
        let start = Instant::now();
        loop {
            let ready = std::net::TcpStream::connect(&b.addr).is_ok()
                && http(&b.addr, "GET", "/status", None)
                    .1
                    .contains("\"ready\":true");
            if ready {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "chromedriver did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--no-first-run", "--window-size=1400,1000"],
            },
        }}});
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_string();
        b
    }

    /// One WebDriver command; its `value`. Panics with the driver's error.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string());
        let (status, text) = http(&self.addr, method, path, body.as_deref());
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {status} {e}: {text}"));
        assert!(
            status == 200,
            "WebDriver {method} {path}: {status} {}",
            v["value"]
        );
        v["value"].clone()
    }

    fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    pub fn open(&self, url: &str) {
        self.session_call("POST", "/url", Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    pub fn script(&self, script: &str, args: Value) -> Value {
        self.session_call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// The first element matching a CSS selector.
    pub fn find(&self, css: &str) -> String {
        let v = self.session_call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    /// Types `text` into an element (as keystrokes).
    pub fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.session_call("POST", &format!("/element/{id}/clear"), Some(json!({})));
        self.session_call(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        );
    }

    pub fn click(&self, css: &str) {
        let id = self.find(css);
        self.session_call("POST", &format!("/element/{id}/click"), Some(json!({})));
    }

    /// A PNG of the window.
    pub fn screenshot(&self) -> Vec<u8> {
        let v = self.session_call("GET", "/screenshot", None);
        base64(v.as_str().unwrap_or_default())
    }

    /// Polls `script` every 25 ms until it returns something other than
    /// null/false, for at most `limit`; that value and how long it took.
    pub fn wait_for(
        &self,
        script: &str,
        args: Value,
        limit: Duration,
    ) -> Option<(Value, Duration)> {
        let start = Instant::now();
        loop {
            let v = self.script(script, args.clone());
            if !(v.is_null() || v == Value::Bool(false)) {
                return Some((v, start.elapsed()));
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http(
                &self.addr,
                "DELETE",
                &format!("/session/{}", self.session),
                None,
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Standard base64 (what WebDriver encodes screenshots in).
fn base64(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let bits: Vec<u8> = s.bytes().filter_map(value).collect();
    let mut out = Vec::with_capacity(bits.len() * 3 / 4);
    for c in bits.chunks(4) {
        let n = c.iter().fold(0u32, |acc, &b| acc << 6 | u32::from(b)) << (6 * (4 - c.len()));
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..c.len()]);
    }
    out
}
