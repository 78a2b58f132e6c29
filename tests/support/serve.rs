//! `bitsync serve` as a child process: ready when `start` returns, stopped
//! when dropped (SIGTERM, then SIGKILL if it does not exit), so a failing
//! test never leaves a node running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::process::{at, bitsync};
use super::wait::wait_for;

/// A serving node. Its log (stderr) is `<dir>.serve.log`, appended to across
/// restarts, and printed when a test fails with the node still up.
pub struct Serve {
    child: Child,
    pub dir: PathBuf,
    pub log: PathBuf,
    /// The bound federation address, from `bitsync status`.
    pub addr: String,
    pub node_id: String,
}

impl Serve {
    /// `serve --listen 127.0.0.1:0`, logging at info.
    pub fn start(dir: &Path) -> Serve {
        Serve::spawn(dir, &["--listen", "127.0.0.1:0"], "info")
    }

    /// `serve <args>` with `RUST_LOG=<rust_log>`; waits (at most 60 s) until
    /// the node answers `bitsync status` on its admin socket, i.e. has bound
    /// its federation port.
    pub fn spawn(dir: &Path, args: &[&str], rust_log: &str) -> Serve {
        Serve::spawn_env(dir, args, rust_log, &[])
    }

    /// [`Serve::spawn`] with `env` set for the node (e.g. `BITSYNC_PASSPHRASE`
    /// for a sealed key).
    pub fn spawn_env(dir: &Path, args: &[&str], rust_log: &str, env: &[(&str, &str)]) -> Serve {
        let mut cmd = bitsync(dir);
        cmd.envs(env.iter().copied());
        let s = Serve::spawn_cmd(cmd, dir, args, rust_log);
        assert!(s.addr.starts_with("127.0.0.1:"), "bound {}", s.addr);
        s
    }

    /// [`Serve::spawn`] with `cmd` as the `bitsync --data-dir <dir>` to run
    /// (e.g. inside a network namespace); readiness is still checked from
    /// here, on the admin socket.
    pub fn spawn_cmd(mut cmd: Command, dir: &Path, args: &[&str], rust_log: &str) -> Serve {
        let log = dir.with_extension("serve.log");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = cmd
            .arg("serve")
            .args(args)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap();
        let mut s = Serve {
            child,
            dir: dir.to_path_buf(),
            log,
            addr: String::new(),
            node_id: String::new(),
        };
        let status = s.wait_ready();
        s.addr = status["listen_address"].as_str().unwrap().to_string();
        s.node_id = status["node_id"].as_str().unwrap().to_string();
        assert!(!s.addr.ends_with(":0"), "{status}");
        s
    }

    /// Poll `bitsync status` (over the admin socket) until it answers.
    pub fn wait_ready(&mut self) -> serde_json::Value {
        let what = format!("{} to answer `bitsync status`", self.dir.display());
        wait_for(60, &what, || {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!(
                    "bitsync serve on {} exited early ({st}):\n{}",
                    self.dir.display(),
                    self.log()
                );
            }
            if !self.socket().exists() {
                return None;
            }
            let out = at(&self.dir, &["status", "--json"]);
            (out.code == 0).then(|| {
                serde_json::from_slice(&out.stdout)
                    .unwrap_or_else(|e| panic!("status is not JSON ({e}): {out:?}"))
            })
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    /// A fresh invite token (`bitsync invite` on the running node).
    pub fn invite(&self) -> String {
        self.invite_with(&[])
    }

    /// A fresh invite token valid for `ttl` (`bitsync invite --ttl <ttl>`).
    pub fn invite_for(&self, ttl: &str) -> String {
        self.invite_with(&["--ttl", ttl])
    }

    fn invite_with(&self, args: &[&str]) -> String {
        let mut cmd = vec!["invite"];
        cmd.extend_from_slice(args);
        let t = super::process::ok_at(&self.dir, &cmd).last_line();
        assert!(t.starts_with("bitsync-invite:"), "invite printed {t:?}");
        t
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    pub fn terminate(&mut self, secs: u64) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "bitsync serve did not exit within {secs} s of SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if std::thread::panicking() {
            eprintln!("--- node log {} ---\n{}", self.log.display(), self.log());
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!(
            "(serve on {} did not stop on SIGTERM; killed)",
            self.dir.display()
        );
    }
}
