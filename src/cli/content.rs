//! `put`, `get`, `ls` and `verify`: items in this node's store.

use std::path::Path;

use super::output::outln;
use super::{progress_bar, Cli};
use crate::content::{self, Listed, Output, PutOptions};
use crate::crypto::Hash;
use crate::error::{Error, IoContext, Result};
use crate::node::Node;

pub(super) fn put(cli: &Cli, file: &Path, kind: &str, name: Option<&str>) -> Result<()> {
    let n = cli.open_node()?;
    let (mut input, total, default_name): (Box<dyn std::io::Read>, u64, String) =
        if file == Path::new("-") {
            (Box::new(std::io::stdin().lock()), 0, String::new())
        } else {
            let f = std::fs::File::open(file).ctx(format!("input file {}", file.display()))?;
            let meta = f.metadata().ctx(format!("input file {}", file.display()))?;
            if meta.is_dir() {
                return Err(Error::invalid(format!(
                    "{} is a directory; put takes a file",
                    file.display()
                )));
            }
            let nm = file
                .file_name()
                .and_then(|s| s.to_str())
                .unwrap_or("")
                .to_string();
            (Box::new(f), meta.len(), nm)
        };
    crate::manifest::check_item_size(total, n.config.chunk_size)?;
    let pb = progress_bar(total, "put");
    let opts = PutOptions {
        kind: kind.to_string(),
        name: name.map(str::to_string).unwrap_or(default_name),
    };
    let id = content::put(&n, &mut input, &opts, &|done| pb.set_position(done))?;
    pb.finish_and_clear();
    outln!("{id}");
    Ok(())
}

pub(super) fn get(cli: &Cli, content_id: &str, output: Option<&Path>) -> Result<()> {
    let n = cli.open_node()?;
    let id = Hash::parse(content_id, "content id")?;
    let m = content::load_manifest(&n, &id)?;
    let pb = progress_bar(m.body().size, "get");
    let progress = |done| pb.set_position(done);
    match output {
        Some(p) if p != Path::new("-") => {
            content::get(&n, &id, Output::File(p), &progress)?;
        }
        _ => {
            let mut out = super::output::Stdout(std::io::stdout().lock());
            match content::get(&n, &id, Output::Stream(&mut out), &progress) {
                // The reader took what it wanted (`get ID | head -c 100`).
                Err(_) if super::output::gone() => {}
                r => {
                    r?;
                }
            }
        }
    }
    pb.finish_and_clear();
    Ok(())
}

pub(super) fn verify(n: &Node) -> Result<()> {
    let pb = progress_bar(0, "verify");
    let report = content::verify(n, &|done, total| {
        pb.set_length(total);
        pb.set_position(done);
    })?;
    pb.finish_and_clear();
    for p in &report.problems {
        outln!("{p}");
    }
    eprintln!(
        "checked {} chunks and {} manifests: {} problem(s)",
        report.chunks_checked,
        report.manifests_checked,
        report.problems.len()
    );
    if !report.problems.is_empty() {
        return Err(Error::integrity(format!(
            "verify found {} problem(s)",
            report.problems.len()
        )));
    }
    Ok(())
}

pub(super) fn list(n: &Node, json: bool) -> Result<()> {
    let mut rows = Vec::new();
    let mut after = 0;
    loop {
        let page = content::list(n, after, 1000)?;
        let Some(last) = page.last() else { break };
        after = last.summary.seq;
        rows.extend(page);
    }
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|Listed { summary: s, name, complete, blind, awaiting_key }| {
                serde_json::json!({
                    "content_id": s.content_id.to_hex(), "seq": s.seq, "kind": s.kind, "name": name,
                    "size": s.size, "chunks": s.chunk_count, "created_at_ms": s.created_at_ms,
                    "publisher": s.publisher.to_hex(), "complete": complete, "blind": blind,
                    "awaiting_key": awaiting_key,
                })
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return Ok(());
    }
    // SEQ and PUBLISHER are what a blind item shows beside its kind and
    // size (its name is encrypted); NAME says "(blind: no key)" then, or
    // "(awaiting key)" for one that came from a blind mirror.
    outln!(
        "{:<64}  {:<8} {:>12}  {:<8}  {:>8}  {:<12}  NAME",
        "CONTENT ID",
        "KIND",
        "SIZE",
        "STATE",
        "SEQ",
        "PUBLISHER"
    );
    for Listed {
        summary: s,
        name,
        complete,
        blind,
        awaiting_key,
    } in rows
    {
        outln!(
            "{:<64}  {:<8} {:>12}  {:<8}  {:>8}  {:<12}  {}",
            s.content_id,
            s.kind,
            s.size,
            if complete { "ok" } else { "partial" },
            s.seq,
            s.publisher.short(),
            match (blind, awaiting_key) {
                (true, true) => "(awaiting key)",
                (true, false) => "(blind: no key)",
                _ => name.as_str(),
            }
        );
    }
    Ok(())
}
