//! `backup` (and `backup verify|ls`) and `restore`: snapshots in a backup
//! repository, and a data dir made from one.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::output::outln;
use super::{progress_bar, Cli};
use crate::backup::{human_bytes, repo, restore};
use crate::error::{Error, Result};
use crate::node::Paths;

/// `bitsync backup --repo DIR` makes a snapshot; `bitsync backup verify|ls --repo DIR` read the repository.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub(crate) struct BackupArgs {
    #[command(subcommand)]
    pub(crate) command: Option<BackupCommand>,
    /// Backup repository: a directory, or s3://bucket/prefix with the AWS
    /// environment (created on first use; must be empty or a repository)
    #[arg(long, value_name = "REPO", required = true)]
    pub(crate) repo: Option<PathBuf>,
    /// After the snapshot, keep only the newest N snapshots and the chunks they need
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) keep_last: Option<u32>,
    /// Include the node key, sealed with a passphrase (terminal prompt, --passphrase-file or BITSYNC_PASSPHRASE)
    #[arg(long)]
    pub(crate) with_identity: bool,
}

#[derive(Subcommand, Debug)]
pub(crate) enum BackupCommand {
    /// Re-hash every file a snapshot needs and check its database; non-zero exit on any problem
    Verify {
        #[arg(long, value_name = "REPO")]
        repo: PathBuf,
        /// Snapshot id (or unique prefix, or `latest`) [default: every snapshot]
        #[arg(long, value_name = "ID")]
        snapshot: Option<String>,
    },
    /// List the snapshots of a repository
    Ls {
        #[arg(long, value_name = "REPO")]
        repo: PathBuf,
        /// One JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub(crate) struct RestoreArgs {
    /// Backup repository
    #[arg(long, value_name = "REPO")]
    pub(crate) repo: PathBuf,
    /// Snapshot id (or unique prefix) [default: the latest taken --with-identity]
    #[arg(long, value_name = "ID")]
    pub(crate) snapshot: Option<String>,
    /// Give the restored node a new key; every item is re-wrapped for it
    #[arg(long)]
    pub(crate) new_identity: bool,
    /// Where the restored node keeps its chunks: s3://bucket/prefix, or
    /// "local" for <data-dir>/chunks [default: where the snapshot's node
    /// kept them]. Endpoint, region and credentials as for any object store:
    /// [chunks] in the snapshot's config.toml, else the AWS environment
    #[arg(long, value_name = "URL")]
    pub(crate) chunks: Option<String>,
}

/// Progress for the backup room's `(done, total)` byte callbacks.
pub(super) fn bytes_bar(what: &str) -> impl Fn(u64, u64) + Sync {
    let pb = progress_bar(0, what);
    move |done, total| {
        pb.set_length(total);
        pb.set_position(done);
        if done >= total {
            pb.finish_and_clear();
        }
    }
}

pub(super) fn backup(cli: &Cli, a: &BackupArgs) -> Result<()> {
    match &a.command {
        Some(BackupCommand::Verify { repo, snapshot }) => return verify(repo, snapshot.as_deref()),
        Some(BackupCommand::Ls { repo, json }) => return list(repo, *json),
        None => {}
    }
    let repo_dir = a
        .repo
        .as_ref()
        .ok_or_else(|| Error::invalid("--repo DIR is required"))?;
    let data_dir = cli.data_dir();
    let paths = Paths::new(&data_dir);
    // The key is read only with --with-identity; a plain backup needs no passphrase.
    let mut held = None;
    if a.with_identity {
        repo::data_dir_node_id(&data_dir)?;
        let key_text = std::fs::read_to_string(paths.key())
            .map_err(|e| Error::from_io(e, format!("node key {}", paths.key().display())))?;
        let sealed_on_node = crate::identity::is_sealed_pem(&key_text);
        drop(zeroize::Zeroizing::new(key_text));
        // One passphrase: it opens a sealed node key and seals the backup's copy.
        let pass = cli.passphrase(!sealed_on_node)?;
        let identity = crate::identity::Identity::load(&paths.key(), &|| Ok(pass.clone()))?;
        held = Some((identity, pass, sealed_on_node));
    }
    let opts = repo::BackupOptions {
        keep_last: a.keep_last.map(|n| n as usize),
        identity: held
            .as_ref()
            .map(|(identity, pass, sealed_on_node)| repo::WithIdentity {
                identity,
                passphrase: pass.as_str(),
                sealed_on_node: *sealed_on_node,
            }),
    };
    let started = std::time::Instant::now();
    let out = repo::backup(&data_dir, repo_dir, &opts, &bytes_bar("backup"))?;
    let s = &out.snapshot;
    eprintln!(
        "snapshot {} of node {}: {} items, {} chunks ({}); {} new chunks ({}) copied, {} already in the repository; {}; {:.1} s",
        s.id,
        &s.node_id[..12],
        s.counts.manifests,
        s.counts.chunks,
        human_bytes(s.counts.chunk_bytes),
        out.new_chunks.copied,
        human_bytes(out.new_chunks.copied_bytes),
        out.new_chunks.skipped,
        if s.identity.is_some() { "node key included, sealed" } else { "no node key (add --with-identity to restore with it)" },
        started.elapsed().as_secs_f64()
    );
    if let Some(p) = &out.pruned {
        eprintln!(
            "pruned {} snapshot(s){}, {} chunk(s) ({}) no snapshot needs",
            p.removed_snapshots.len(),
            if p.removed_snapshots.is_empty() {
                String::new()
            } else {
                format!(" ({})", p.removed_snapshots.join(", "))
            },
            p.removed_chunks,
            human_bytes(p.removed_bytes)
        );
        if let Some(w) = &p.chunk_gc_skipped {
            eprintln!("warning: {w}");
        }
    }
    outln!("{}", s.id);
    Ok(())
}

fn verify(repo_dir: &std::path::Path, snapshot: Option<&str>) -> Result<()> {
    let r = repo::verify(repo_dir, snapshot, &bytes_bar("verify"))?;
    for p in &r.problems {
        outln!("{p}");
    }
    eprintln!(
        "checked {} snapshot(s): {} files, {} chunks ({}): {} problem(s)",
        r.snapshots.len(),
        r.files_checked,
        r.chunks_checked,
        human_bytes(r.bytes_checked),
        r.problems.len()
    );
    if !r.problems.is_empty() {
        return Err(Error::integrity(format!(
            "backup verify found {} problem(s) in {}",
            r.problems.len(),
            repo_dir.display()
        )));
    }
    Ok(())
}

fn list(repo_dir: &std::path::Path, json: bool) -> Result<()> {
    let r = repo::Repo::open(repo_dir)?;
    let (all, bad) = r.list()?;
    if json {
        let v: Vec<_> = all
            .iter()
            .map(|m| {
                serde_json::json!({"id": m.id, "node_id": m.node_id, "created_at": m.created_at,
                    "created_at_ms": m.created_at_ms, "manifests": m.counts.manifests, "chunks": m.counts.chunks,
                    "chunk_bytes": m.counts.chunk_bytes, "with_identity": m.identity.is_some()})
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&v).expect("json"));
    } else {
        outln!(
            "{:<22}  {:<20}  {:<12}  {:>8}  {:>8}  {:>10}  KEY",
            "SNAPSHOT",
            "TIME",
            "NODE",
            "ITEMS",
            "CHUNKS",
            "SIZE"
        );
        for m in &all {
            outln!(
                "{:<22}  {:<20}  {:<12}  {:>8}  {:>8}  {:>10}  {}",
                m.id,
                m.created_at,
                &m.node_id[..12.min(m.node_id.len())],
                m.counts.manifests,
                m.counts.chunks,
                human_bytes(m.counts.chunk_bytes),
                if m.identity.is_some() { "sealed" } else { "-" }
            );
        }
    }
    for (name, e) in &bad {
        eprintln!("snapshots/{name}: unreadable: {e}");
    }
    Ok(())
}

pub(super) fn restore(cli: &Cli, a: &RestoreArgs) -> Result<()> {
    let dest = cli.data_dir();
    let opts = restore::RestoreOptions {
        snapshot: a.snapshot.as_deref(),
        new_identity: a.new_identity,
        chunks: a.chunks.as_deref(),
    };
    let out = restore::restore(
        &a.repo,
        &dest,
        &opts,
        &|| cli.passphrase(false),
        &bytes_bar("restore"),
    )?;
    eprintln!(
        "restored snapshot {} into {}: {} items, {} chunks ({})",
        out.snapshot,
        out.data_dir.display(),
        out.manifests,
        out.chunks,
        human_bytes(out.chunk_bytes)
    );
    if let Some(r) = &out.rekey {
        eprintln!(
            "new identity {} (was {}): {} item key(s) re-wrapped for it{}",
            out.node_id,
            out.old_node_id,
            r.rewrapped,
            if r.without_key > 0 {
                format!(
                    ", {} item(s) had no key for the old node and stay unreadable here",
                    r.without_key
                )
            } else {
                String::new()
            }
        );
        if out.peers_to_retrust.is_empty() {
            eprintln!("no trusted peers: nothing else to do");
        } else {
            eprintln!(
                "these peers trusted the old id {} and must now trust the new one; on each, run:",
                out.old_node_id
            );
            for (id, name, address) in &out.peers_to_retrust {
                let label = if name.is_empty() {
                    String::new()
                } else {
                    format!(" ({name})")
                };
                eprintln!(
                    "  peer {id}{label} at {address}: bitsync peer add {} <this node's HOST:PORT>",
                    out.node_id
                );
            }
        }
    }
    outln!("{}", out.node_id);
    Ok(())
}
