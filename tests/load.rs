//! Load (issue 11, item 13): 50 `bitsync clone` processes at once from one
//! serving node, with its default limits but for `max_chunk_streams`, set
//! to 2. Two slow clones behind paced proxies hold both places until one of
//! the 50 has met the busy source (RESOURCE_EXHAUSTED) and retried, so the
//! retry path is always taken, not only when the 50 happen to overlap.
//! Every clone completes, every item verifies and matches the source's, and
//! the source's peak RSS is bounded.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use bitsync::proto::CreateInviteRequest;
use tempfile::TempDir;

use crate::support::*;

const CLONES: usize = 50;

/// Content ids and whether each is complete, from `ls --json`.
fn items(dir: &Path) -> BTreeSet<(String, bool)> {
    ls_json(dir)
        .iter()
        .map(|i| {
            let id = i["content_id"].as_str().unwrap().to_string();
            (id, i["complete"].as_bool().unwrap())
        })
        .collect()
}

/// Wait for every child (bounded); their exit codes, with the stderr files.
fn wait_all(children: Vec<(PathBuf, Child)>, secs: u64) -> Vec<(PathBuf, i32)> {
    let end = Instant::now() + Duration::from_secs(secs);
    children
        .into_iter()
        .map(|(dir, mut c)| loop {
            if let Some(st) = c.try_wait().unwrap() {
                break (dir, st.code().unwrap_or(-1));
            }
            if Instant::now() > end {
                let _ = c.kill();
                panic!("{} did not finish within {secs} s", dir.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        })
        .collect()
}

fn spawn_at(dir: &Path, args: &[&str]) -> Child {
    let err = std::fs::File::create(dir.with_extension("stderr")).unwrap();
    bitsync(dir)
        .args(args)
        .env("RUST_LOG", "bitsync=info")
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_clones_from_one_source_all_complete_and_verify() {
    let tmp = TempDir::new().unwrap();
    let src = tmp.path().join("source");
    ok_at(&src, &["init"]);
    set_limits(&src, "max_chunk_streams = 2\nstream_wait_ms = 500");
    for (i, len) in [(1, 4 << 20), (2, 300_000), (3, 10)] {
        let f = tmp.path().join(format!("item{i}"));
        std::fs::write(&f, data(i, len)).unwrap();
        ok_at(&src, &["put", f.to_str().unwrap()]);
    }
    let want: BTreeSet<_> = items(&src);
    let holders: Vec<PathBuf> = (0..2)
        .map(|i| tmp.path().join(format!("holder{i}")))
        .collect();
    for h in &holders {
        ok_at(h, &["init"]);
        let id = ok_at(h, &["id"]).last_line();
        ok_at(&src, &["peer", "add", &id, "127.0.0.1:9"]);
    }
    let server = Serve::start(&src);
    let pid = server.pid();
    let before = status_mib(pid, "VmRSS");

    let mut admin = admin_client(&server.socket()).await;
    let mut tokens = Vec::new();
    for _ in 0..CLONES {
        let r = admin
            .create_invite(CreateInviteRequest {
                ttl_seconds: 600,
                blind: false,
            })
            .await
            .unwrap();
        tokens.push(r.into_inner().token);
    }

    // Each holder clones through its own proxy at 128 KiB/s (the 4 MiB item
    // alone takes 30 s); once bytes flow through both, both places are taken.
    let proxies: Vec<_> = holders
        .iter()
        .map(|h| {
            let p = proxy(server.addr.parse().unwrap(), Some(128 << 10));
            ok_at(h, &["peer", "add", &server.node_id, &p.addr.to_string()]);
            p
        })
        .collect();
    let mut holding: Vec<_> = holders
        .iter()
        .map(|h| spawn_at(h, &["clone", &server.node_id]))
        .collect();
    wait_for(60, "both slow clones to be streaming chunks", || {
        proxies
            .iter()
            .all(|p| p.down.load(std::sync::atomic::Ordering::Relaxed) > 200 << 10)
            .then_some(())
    });

    // Each clone creates its own data dir (RSA key generation included).
    let t0 = Instant::now();
    let children: Vec<_> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let dir = tmp.path().join(format!("clone{i:02}"));
            let c = spawn_at(&dir, &["clone", t]);
            (dir, c)
        })
        .collect();
    let stderr = |i: usize| tmp.path().join(format!("clone{i:02}.stderr"));
    wait_for(120, "a clone to meet the busy source and retry", || {
        (0..CLONES)
            .any(|i| {
                std::fs::read_to_string(stderr(i)).is_ok_and(|e| e.contains("max_chunk_streams"))
            })
            .then_some(())
    });
    for h in &mut holding {
        h.kill().unwrap();
        h.wait().unwrap();
    }
    let done = tokio::task::spawn_blocking(|| wait_all(children, 300))
        .await
        .unwrap();
    let took = t0.elapsed();
    let peak = status_mib(pid, "VmHWM");
    let mut retried = 0;
    for (dir, code) in &done {
        let err = std::fs::read_to_string(dir.with_extension("stderr")).unwrap_or_default();
        assert_eq!(*code, 0, "clone into {} failed:\n{err}", dir.display());
        retried += err.contains("max_chunk_streams") as usize;
    }

    // Every clone holds every item, complete, and verifies clean.
    let verifies: Vec<_> = done
        .iter()
        .map(|(dir, _)| (dir.clone(), spawn_at(dir, &["verify"])))
        .collect();
    for (dir, code) in tokio::task::spawn_blocking(|| wait_all(verifies, 300))
        .await
        .unwrap()
    {
        let err = std::fs::read_to_string(dir.with_extension("stderr")).unwrap_or_default();
        assert_eq!(code, 0, "verify on {} failed:\n{err}", dir.display());
        assert_eq!(items(&dir), want, "{}", dir.display());
    }
    eprintln!(
        "{CLONES} concurrent clones of {} items in {took:?} ({retried} retried a busy source); \
         source RSS {before:.0} MiB before, peak (VmHWM) {peak:.0} MiB",
        want.len()
    );
    assert!(peak < before + 150.0, "source peak RSS {peak:.0} MiB");
}
