//! A private Tor network for tests, driven by tests/tornet/tornet.sh.
//!
//! The network is built in a temp dir and torn down by a drop guard; every
//! tor daemon also watches this process (TORNET_OWNER_PID) and exits if the
//! test is killed. After a failure the directory (torrcs, every node's
//! notice.log) is kept and its path printed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub const NETWORK_TIMEOUT_S: u64 = 120;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tornet/tornet.sh")
}

/// Point a fresh data dir at the private network: federation on
/// 127.0.0.1:0, and `tor_section` as its whole `[tor]` section.
pub fn configure_node(dir: &Path, tor_section: &str) {
    let cfg = dir.join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text.replace("listen = \"127.0.0.1:7450\"", "listen = \"127.0.0.1:0\"");
    let head = &text[..text.find("[tor]").expect("config has a [tor] section")];
    std::fs::write(&cfg, format!("{head}[tor]\n{tor_section}\n")).unwrap();
}

/// Run a tornet.sh subcommand; return its stdout, or the full output as the error.
pub fn tornet(args: &[&str], envs: &[(&str, String)]) -> Result<String, String> {
    let mut cmd = Command::new("bash");
    cmd.arg(script()).args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("running tornet.sh {args:?}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "tornet.sh {args:?} failed ({}):\n{stdout}\n{stderr}",
            out.status
        ))
    }
}

/// A running private network.
pub struct Network {
    dir: Option<tempfile::TempDir>,
}

impl Network {
    pub fn path(&self) -> &str {
        let dir = self.dir.as_ref().expect("network dir");
        dir.path().to_str().expect("utf-8 temp path")
    }

    /// `up` on a port base derived from our PID and `salt` (so parallel runs
    /// rarely collide), moving to another base if the script reports a port in use.
    pub fn up(salt: u32) -> Network {
        let dir = tempfile::Builder::new()
            .prefix("tornet-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().to_str().expect("utf-8 temp path").to_string();
        let net = Network { dir: Some(dir) };
        let pid = std::process::id();
        let mut last_err = String::new();
        for attempt in 0..4u32 {
            let base = 20000 + ((pid + salt * 101 + attempt * 37) % 200) * 50;
            let envs = [
                ("TORNET_PORT_BASE", base.to_string()),
                ("TORNET_OWNER_PID", pid.to_string()),
            ];
            match tornet(&["up", &path], &envs) {
                Ok(_) => return net,
                Err(e) if e.contains("is in use") => last_err = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("no free port range for the test network: {last_err}");
    }

    /// Wait (bounded) for the consensus and write the arti config; returns its path.
    pub fn ready(&self) -> PathBuf {
        if let Err(e) = tornet(&["wait", self.path(), &NETWORK_TIMEOUT_S.to_string()], &[]) {
            panic!("private Tor network did not come up: {e}");
        }
        PathBuf::from(tornet(&["arti-config", self.path()], &[]).expect("arti-config"))
    }

    /// Start the network's C tor client; returns its SOCKS address.
    pub fn client(&self) -> String {
        tornet(&["client", self.path(), "90"], &[]).expect("C tor client")
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        if let Err(e) = tornet(&["down", self.path()], &[]) {
            eprintln!("teardown: {e}");
        }
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                eprintln!("test failed: network logs kept in {}", dir.keep().display());
            }
        }
    }
}
