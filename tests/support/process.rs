//! The real `bitsync` binary as a child process: a clean environment, a
//! deadline on every run, and what it printed kept for the failure message.

use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_bitsync");
/// The passphrase tests seal node keys with.
pub const PASS: &str = "correct horse battery staple";
/// How long one command may run before the test fails (a debug build on 2 busy cores).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(120);

/// A `bitsync` command with a clean environment: private HOME, no inherited
/// data dir or passphrase, `RUST_LOG=warn`, stdin from /dev/null (so: no terminal).
pub fn command(home: &Path) -> Command {
    let mut c = Command::new(BIN);
    clean_env(&mut c, home);
    c
}

/// The clean environment of [`command`], on any command that runs `bitsync`
/// (e.g. through `ip netns exec`).
pub fn clean_env(c: &mut Command, home: &Path) {
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
}

/// [`command`] on the data dir `dir` (`--data-dir`), with the directory
/// holding it as HOME.
pub fn bitsync(dir: &Path) -> Command {
    let mut c = command(dir.parent().unwrap_or(dir));
    c.arg("--data-dir").arg(dir);
    c
}

/// What one run did: its exit code (-1: killed by a signal) and output.
pub struct Out {
    pub status: ExitStatus,
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Out {
    /// stdout as text (it must be UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8(self.stdout.clone()).expect("stdout is UTF-8")
    }

    /// The last non-empty stdout line (put prints the content id last).
    pub fn last_line(&self) -> String {
        self.text()
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_string()
    }

    /// Insist on exit 0; returns stdout.
    #[track_caller]
    pub fn ok(self, what: &str) -> String {
        assert!(self.status.success(), "{what} failed: {self:?}");
        self.text()
    }
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {} ({})\n--- stdout\n{}\n--- stderr\n{}",
            self.code,
            self.status,
            String::from_utf8_lossy(&self.stdout),
            self.stderr
        )
    }
}

/// Run `cmd` to completion within [`CMD_TIMEOUT`].
#[track_caller]
pub fn run(cmd: &mut Command) -> Out {
    run_within(cmd, CMD_TIMEOUT)
}

/// Run `cmd` to completion (stdin from /dev/null), killing it and failing
/// the test after `timeout`.
#[track_caller]
pub fn run_within(cmd: &mut Command, timeout: Duration) -> Out {
    run_io(cmd, Stdio::null(), None, timeout)
}

/// [`run_within`] with `stdin` as the child's stdin and, if given, `stdout`
/// as its stdout (then [`Out::stdout`] is empty): for a token on stdin, or
/// a pipe whose reader is gone.
#[track_caller]
pub fn run_io(cmd: &mut Command, stdin: Stdio, stdout: Option<Stdio>, timeout: Duration) -> Out {
    let captured = stdout.is_none();
    let mut child = cmd
        .stdin(stdin)
        .stdout(stdout.unwrap_or_else(Stdio::piped))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = r.read_to_end(&mut b);
            b
        })
    };
    let so = match child.stdout.take() {
        Some(o) if captured => drain(Box::new(o)),
        _ => drain(Box::new(std::io::empty())),
    };
    let se = drain(Box::new(child.stderr.take().unwrap()));
    let end = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            let err = String::from_utf8_lossy(&se.join().unwrap()).into_owned();
            panic!("{cmd:?} did not finish within {timeout:?}; stderr:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Out {
        status,
        code: status.code().unwrap_or(-1),
        stdout: so.join().unwrap(),
        stderr: String::from_utf8_lossy(&se.join().unwrap()).into_owned(),
    }
}

/// Run and require exit 0; returns the run.
#[track_caller]
pub fn ok(cmd: &mut Command) -> Out {
    let r = run(cmd);
    assert_eq!(r.code, 0, "{cmd:?} failed: {r:?}");
    r
}

/// `bitsync --data-dir <dir> <args>`, run to completion.
#[track_caller]
pub fn at(dir: &Path, args: &[&str]) -> Out {
    run(bitsync(dir).args(args))
}

/// [`at`], requiring exit 0.
#[track_caller]
pub fn ok_at(dir: &Path, args: &[&str]) -> Out {
    let o = at(dir, args);
    assert_eq!(
        o.code,
        0,
        "bitsync {args:?} on {} failed: {o:?}",
        dir.display()
    );
    o
}

/// The items of `ls --json` on `dir`, one JSON object each.
pub fn ls_json(dir: &Path) -> Vec<serde_json::Value> {
    let o = ok_at(dir, &["ls", "--json"]);
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("ls --json: {e}: {o:?}"))
}
