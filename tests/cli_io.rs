//! The command line's own input and output (issue 11, bug 7): stdout whose
//! reader has gone (`bitsync id --cert | head -1`), and an invite token
//! given on stdin or in a file instead of as an argument (which every local
//! user can read in `ps`). Real binaries, real pipes, a real serving node.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;

use crate::support::*;

/// A pipe whose read end is already closed: the first write to the write
/// end fails with EPIPE, every time (`| head -1` does the same, but only
/// when `head` happens to exit before the write).
fn closed_pipe() -> Stdio {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills two fds we then own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both fds were just created and are owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(r);
    Stdio::from(w)
}

/// `bitsync <args>` on `dir` with stdout into a closed pipe.
fn into_closed_pipe(dir: &Path, args: &[&str]) -> Out {
    run_io(
        bitsync(dir).args(args),
        Stdio::null(),
        Some(closed_pipe()),
        CMD_TIMEOUT,
    )
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    ok_at(&dir, &["init"]);
    let node = open(&dir);
    let id = put(&node, "big", &data(7, 3 << 20)).to_hex();
    drop(node);
    for args in [
        vec!["id", "--cert"],
        vec!["id", "--public-key"],
        vec!["ls"],
        vec!["ls", "--json"],
        vec!["peer", "ls"],
        vec!["get", id.as_str()],
    ] {
        let o = into_closed_pipe(&dir, &args);
        assert_eq!(o.code, 0, "bitsync {args:?} into a closed pipe: {o:?}");
        assert!(
            o.stderr.is_empty(),
            "bitsync {args:?} printed: {}",
            o.stderr
        );
    }
    // The exit code of a failing command is still its own.
    let o = into_closed_pipe(&dir, &["get", &"0".repeat(64)]);
    assert_eq!(o.code, 3, "{o:?}");
}

/// `clone` with the token from stdin (`-`) or `--token-file`.
fn clone_with(dir: &Path, how: &str, token: &str, scratch: &Path) -> Out {
    let mut cmd = bitsync(dir);
    cmd.arg("clone");
    let stdin = match how {
        "stdin" => {
            let f = scratch.join("token-on-stdin");
            std::fs::write(&f, format!("{token}\n")).unwrap();
            cmd.arg("-");
            Stdio::from(std::fs::File::open(f).unwrap())
        }
        _ => {
            let f = scratch.join("token-in-a-file");
            std::fs::write(&f, format!("{token}\n")).unwrap();
            cmd.arg("--token-file").arg(&f);
            Stdio::null()
        }
    };
    run_io(&mut cmd, stdin, None, CMD_TIMEOUT)
}

#[test]
fn clone_reads_the_token_from_stdin_or_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    ok_at(&a, &["init"]);
    let node = open(&a);
    let id = put(&node, "x", b"hello over a token kept out of ps").to_hex();
    drop(node);
    let sa = Serve::start(&a);
    for how in ["stdin", "file"] {
        let dir = tmp.path().join(how);
        let o = clone_with(&dir, how, &sa.invite(), tmp.path());
        assert_eq!(o.code, 0, "clone with the token on {how}: {o:?}");
        assert!(ok_at(&dir, &["ls"]).text().contains(&id[..12]));
    }
    // Empty input is a clear usage error, not a search for a peer named "".
    let o = clone_with(&tmp.path().join("empty"), "stdin", "", tmp.path());
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("stdin holds no invite token"), "{o:?}");
    // A token argument and a token file together are refused by clap.
    let o = at(
        &tmp.path().join("both"),
        &["clone", "x", "--token-file", "/dev/null"],
    );
    assert_eq!(o.code, 2, "{o:?}");
}
