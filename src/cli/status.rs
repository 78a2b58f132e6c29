//! `status`: what the running node is doing, asked over its Admin socket.
//!
//! By default a short table for a person: who the node is and where it
//! listens, its peers, its mirrors with their lag, its jobs with progress.
//! `--json` prints the object scripts and tests read, unchanged from before
//! the table existed; new facts go to the table (and to Admin/Status for
//! programs), not into that object.

use std::path::Path;
use std::time::Duration;

use indicatif::HumanBytes;

use super::output::outln;
use super::runtime;
use super::table::Table;
use crate::error::{Error, Result};
use crate::node::Paths;
use crate::proto::admin_client::AdminClient;
use crate::proto::progress::Phase;
use crate::proto::{Job, ListPeersRequest, PeerInfo, StatusRequest, StatusResponse};
use crate::transport::admin_channel;

/// Longest error shown in a table cell; the whole text is in `--json` and the log.
const MAX_ERROR_CHARS: usize = 80;

pub(super) fn status(data_dir: &Path, json: bool) -> Result<()> {
    runtime()?.block_on(async {
        let sock = Paths::new(data_dir).admin_socket();
        let mut admin = AdminClient::new(admin_channel(&sock).await?);
        let s = admin
            .status(StatusRequest {})
            .await
            .map_err(Error::from)?
            .into_inner();
        if json {
            print_json(&s);
            return Ok(());
        }
        let peers = admin
            .list_peers(ListPeersRequest {})
            .await
            .map_err(Error::from)?
            .into_inner()
            .peers;
        print_table(&s, &peers, crate::manifest::now_ms());
        Ok(())
    })
}

fn print_json(s: &StatusResponse) {
    let jobs: Vec<_> = s
        .jobs
        .iter()
        .map(|j| {
            let p = j.progress.clone().unwrap_or_default();
            let phase = Phase::try_from(p.phase)
                .map(|ph| ph.as_str_name())
                .unwrap_or("PHASE_UNSPECIFIED");
            serde_json::json!({"kind": j.kind, "peer": j.peer, "phase": phase, "items_done": p.items_done,
                "bytes_done": p.bytes_done, "last_error": p.errors.last()})
        })
        .collect();
    let v = serde_json::json!({
        "node_id": s.node_id, "name": s.name, "version": s.version, "listen_address": s.listen_address,
        "onion_address": s.onion_address, "manifests": s.manifests, "chunks": s.chunks,
        "stored_bytes": s.stored_bytes, "head_seq": s.head_seq, "trusted_peers": s.trusted_peers,
        "jobs": jobs, "uptime_ms": s.uptime_ms, "chunk_store": s.chunk_store,
    });
    outln!("{}", serde_json::to_string_pretty(&v).expect("json"));
}

fn print_table(s: &StatusResponse, peers: &[PeerInfo], now_ms: i64) {
    let mut head = Table::plain();
    head.row(["node".into(), s.node_id.clone()]);
    head.row(["name".into(), s.name.clone()]);
    head.row([
        "version".into(),
        format!("{}, up {}", s.version, secs(s.uptime_ms / 1000)),
    ]);
    head.row(["listen".into(), s.listen_address.clone()]);
    head.row(["onion".into(), s.onion_address.clone()]);
    head.row([
        "stored".into(),
        format!(
            "{} items, {} chunks, {} (head seq {})",
            s.manifests,
            s.chunks,
            HumanBytes(s.stored_bytes),
            s.head_seq
        ),
    ]);
    head.row(["chunks in".into(), s.chunk_store.clone()]);
    head.print();

    outln!();
    if peers.is_empty() {
        outln!("no peers: add one with `bitsync peer add` or `bitsync clone <invite>`");
    } else {
        // ROLE: what that node gives this one (keyed, or blind: this node
        // mirrors it without a key), once it has answered a fetch.
        let mut t = Table::new(&["PEER", "STATE", "ROLE", "MIRROR", "ADDRESS", "NAME"]);
        for p in peers {
            t.row([
                short(&p.node_id).into(),
                // A blind peer (PROTOCOL.md §2.1) says so; keyed is the default.
                if p.level == "blind" {
                    format!("{} (blind)", p.state)
                } else {
                    p.state.clone()
                },
                if p.role.is_empty() {
                    "-".to_string()
                } else {
                    p.role.clone()
                },
                yes(p.mirror),
                p.address.clone(),
                p.name.clone(),
            ]);
        }
        t.print();
    }

    let (mirrors, jobs): (Vec<&Job>, Vec<&Job>) = s.jobs.iter().partition(|j| j.kind == "mirror");
    if !mirrors.is_empty() {
        outln!();
        let mut t = Table::new(&["MIRROR", "STATE", "LAG", "LAST SYNC", "LAST ERROR"]);
        for j in mirrors {
            t.row(mirror_row(j, now_ms));
        }
        t.print();
    }
    outln!();
    if jobs.is_empty() {
        outln!("no jobs running");
    } else {
        let mut t = Table::new(&[
            "JOB",
            "PEER",
            "PHASE",
            "ITEMS",
            "BYTES",
            "RATE",
            "LAST ERROR",
        ]);
        for j in jobs {
            t.row(job_row(j));
        }
        t.print();
    }
}

/// A mirror: up to date (lag 0) while DONE, else behind since its last
/// successful sync.
fn mirror_row(j: &Job, now_ms: i64) -> [String; 5] {
    let p = j.progress.clone().unwrap_or_default();
    let phase = Phase::try_from(p.phase).unwrap_or(Phase::Unspecified);
    let state = match phase {
        Phase::Done => "up to date".to_string(),
        Phase::Failed => "failed, retrying".to_string(),
        other => format!("syncing ({})", other.as_str_name()),
    };
    let since = |ms: i64| secs((now_ms - ms).max(0) / 1000);
    let (lag, last) = match (phase, j.last_synced_at_ms) {
        (Phase::Done, t) if t > 0 => ("0s".to_string(), format!("{} ago", since(t))),
        (_, 0) => (String::new(), "never".to_string()),
        (_, t) => (since(t), format!("{} ago", since(t))),
    };
    let err = if phase == Phase::Done {
        String::new()
    } else {
        last_error(&p.errors)
    };
    [short(&j.peer).into(), state, lag, last, err]
}

fn job_row(j: &Job) -> [String; 7] {
    let p = j.progress.clone().unwrap_or_default();
    let phase = Phase::try_from(p.phase).map_or("PHASE_UNSPECIFIED", |ph| ph.as_str_name());
    let items = if p.items_total > 0 {
        format!("{}/{}", p.items_done, p.items_total)
    } else {
        p.items_done.to_string()
    };
    let bytes = if p.bytes_total > 0 {
        format!(
            "{}/{} ({}%)",
            HumanBytes(p.bytes_done),
            HumanBytes(p.bytes_total),
            p.bytes_done.saturating_mul(100) / p.bytes_total
        )
    } else {
        HumanBytes(p.bytes_done).to_string()
    };
    [
        j.kind.clone(),
        short(&j.peer).into(),
        phase.into(),
        items,
        bytes,
        format!("{}/s", HumanBytes(p.bytes_per_second as u64)),
        last_error(&p.errors),
    ]
}

fn last_error(errors: &[String]) -> String {
    let Some(e) = errors.last() else {
        return String::new();
    };
    if e.chars().count() <= MAX_ERROR_CHARS {
        return e.clone();
    }
    let cut: String = e.chars().take(MAX_ERROR_CHARS - 1).collect();
    format!("{cut}…")
}

/// A node id's short form, as in log lines (`peer=` fields).
fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

fn secs(s: i64) -> String {
    humantime::format_duration(Duration::from_secs(s.max(0) as u64)).to_string()
}
