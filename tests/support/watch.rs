//! Watching nodes from outside: plain HTTP to a node's metrics listener,
//! parsing the Prometheus text format, `promtool`, a real Prometheus server
//! in a temp dir, and headless Chromium (flags from STACK.md).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::net::free_port;
use super::process::{run_within, Out};
use super::wait::wait_for;

/// `GET path` on `addr` (HTTP/1.1, one request per connection): (status, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    // The listener answers small bodies with a length, not chunked.
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    Ok((status, body.to_string()))
}

/// `/metrics` of a node's listener, in the classic text format.
pub fn scrape(addr: &str) -> String {
    let (status, body) = http_get(addr, "/metrics").unwrap();
    assert_eq!(status, 200, "scraping {addr}: {body}");
    body
}

/// `/status.json` of a node's listener.
pub fn status_json(addr: &str) -> serde_json::Value {
    let (status, body) = http_get(addr, "/status.json").unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The value of the sample `name` whose labels include all of `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        let want = labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        (n == name && want).then(|| value.parse().unwrap())
    })
}

/// The tool `name` from Debian's `prometheus` / `chromium` packages
/// (`.ci/test` installs them).
pub fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed; .ci/test installs it (apt prometheus, chromium)");
}

/// `promtool check metrics` on `text` (stdin).
pub fn promtool_check_metrics(text: &str) -> Out {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    let stdin = std::fs::File::open(f.path()).unwrap();
    super::process::run_io(
        Command::new(tool("promtool")).args(["check", "metrics"]),
        Stdio::from(stdin),
        None,
        Duration::from_secs(30),
    )
}

/// `promtool <args>`.
pub fn promtool(args: &[&str]) -> Out {
    run_within(
        Command::new(tool("promtool")).args(args),
        Duration::from_secs(30),
    )
}

/// A Prometheus server scraping `targets` every second, on a free port,
/// with its own config and storage in `dir`; killed on drop.
pub struct Prometheus {
    child: Child,
    pub addr: String,
    log: PathBuf,
}

impl Prometheus {
    pub fn start(dir: &Path, targets: &[&str]) -> Prometheus {
        std::fs::create_dir_all(dir).unwrap();
        let list: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: bitsync\n    \
             static_configs:\n      - targets: [{}]\n",
            list.join(", ")
        );
        let cfg = dir.join("prometheus.yml");
        std::fs::write(&cfg, config).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.join("prometheus.log");
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let p = Prometheus { child, addr, log };
        wait_for(60, "Prometheus to be ready", || {
            matches!(http_get(&p.addr, "/-/ready"), Ok((200, _))).then_some(())
        });
        p
    }

    /// An instant query: each series' labels and value.
    pub fn query(&self, expr: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let (status, body) = http_get(&self.addr, &format!("/api/v1/query?query={}", encode(expr)))
            .unwrap_or_else(|e| panic!("querying Prometheus: {e}\n{}", self.log()));
        assert_eq!(status, 200, "{expr}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect();
                (labels, r["value"][1].as_str().unwrap().parse().unwrap())
            })
            .collect()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encode a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Headless Chromium on `url` with a fresh profile in `profile`, letting
/// the page run for `budget_ms` of virtual time, then `extra` (e.g.
/// `--dump-dom`, `--screenshot=...`). Returns what it printed.
pub fn chromium(profile: &Path, url: &str, budget_ms: u32, extra: &[&str]) -> Out {
    let out = run_within(
        Command::new(tool("chromium"))
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("--virtual-time-budget={budget_ms}"))
            .args(extra)
            .arg(url),
        Duration::from_secs(90),
    );
    assert_eq!(out.code, 0, "chromium failed: {out:?}");
    out
}

/// `serve --listen <listen> --metrics 127.0.0.1:<free port>`: the node and
/// its metrics listener's address.
pub fn serve_watched(dir: &Path, listen: &str) -> (super::serve::Serve, String) {
    let metrics = format!("127.0.0.1:{}", free_port());
    let s = super::serve::Serve::spawn(dir, &["--listen", listen, "--metrics", &metrics], "info");
    (s, metrics)
}
