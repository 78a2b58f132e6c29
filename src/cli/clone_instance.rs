//! `clone-instance`: a verified, consistent copy of this node's database and
//! chunks to other paths.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;

use super::backup::bytes_bar;
use super::output::outln;
use super::{confirm, Cli};
use crate::backup::{clone_instance, human_bytes};
use crate::error::{Error, Result};
use crate::node::Paths;

#[derive(Args, Debug)]
pub(crate) struct CloneInstanceArgs {
    /// Database to copy [default: this node's, <data-dir>/bitsync.db]
    #[arg(long, value_name = "FILE")]
    pub(crate) source_db: Option<PathBuf>,
    /// Where the copy of the database goes
    #[arg(long, value_name = "FILE")]
    pub(crate) dest_db: PathBuf,
    /// Chunk directory to copy [default: this node's, <data-dir>/chunks]
    #[arg(long, value_name = "DIR")]
    pub(crate) source_attachments: Option<PathBuf>,
    /// Where the copy of the chunks goes
    #[arg(long, value_name = "DIR")]
    pub(crate) dest_attachments: PathBuf,
    /// Replace an existing destination without asking
    #[arg(long)]
    pub(crate) force: bool,
    /// Give the copy its own key (node.key next to --dest-db), to run it beside the original
    #[arg(long)]
    pub(crate) new_identity: bool,
}

pub(super) fn clone_instance(cli: &Cli, a: &CloneInstanceArgs) -> Result<()> {
    let data_dir = cli.data_dir();
    let paths = Paths::new(&data_dir);
    let o = clone_instance::CloneOptions {
        source_db: a.source_db.clone().unwrap_or_else(|| paths.db()),
        source_attachments: a
            .source_attachments
            .clone()
            .unwrap_or_else(|| paths.chunks()),
        dest_db: a.dest_db.clone(),
        dest_attachments: a.dest_attachments.clone(),
        force: a.force,
        new_identity: a.new_identity,
    };
    let plan = clone_instance::plan(&o)?;
    eprint!("{}", clone_instance::describe(&o, &plan));
    let mut o = o;
    if !plan.existing.is_empty() && !o.force {
        if !std::io::stdin().is_terminal() {
            return Err(Error::exists(format!(
                "{} exists and there is no terminal to confirm on: pass --force to replace it (nothing was changed)",
                plan.existing[0].display()
            )));
        }
        if !confirm("Replace the existing destination?")? {
            return Err(Error::exists(
                "not replaced: the destination was left as it was",
            ));
        }
        o.force = true;
    }
    let source_key = a.source_db.as_ref().map(|p| {
        p.parent()
            .unwrap_or(std::path::Path::new("."))
            .join("node.key")
    });
    let source_key = source_key.unwrap_or_else(|| paths.key());
    let pass = || cli.passphrase(false);
    let out = clone_instance::run(
        &o,
        &plan,
        Some((&source_key, &pass)),
        &bytes_bar("clone-instance"),
    )?;
    eprintln!(
        "cloned in {:.1} s: database {} (integrity_check ok), {} chunks ({}) copied and re-hashed",
        out.elapsed.as_secs_f64(),
        human_bytes(out.db_bytes),
        out.chunks.copied,
        human_bytes(out.chunks.copied_bytes)
    );
    match (&out.rekey, &out.key_path) {
        (Some(r), Some(k)) => {
            eprintln!(
                "the copy is node {} (source {}): new key {}, {} item key(s) re-wrapped",
                out.node_id,
                out.source_node_id,
                k.display(),
                r.rewrapped
            );
            if let Some(c) = &out.config_path {
                eprintln!("copied the source's configuration to {}: change `listen` there before running the copy beside the original", c.display());
            }
        }
        _ => eprintln!(
            "the copy keeps node id {}: it needs the original node.key and node.mlkem to run, and must never run at the same time as the original (use --new-identity for that)",
            out.source_node_id
        ),
    }
    outln!("{}", out.node_id);
    Ok(())
}
