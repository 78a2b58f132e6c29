//! `bitsync chunks`: where the node's chunks are stored.

use clap::Subcommand;

use super::output::outln;
use super::progress_bar;
use crate::chunks::{BucketSpec, Location};
use crate::error::{Error, Result};
use crate::node::Node;

#[derive(Subcommand, Debug)]
pub(crate) enum ChunksCommand {
    /// Copy every chunk, re-hashed, to another store and switch the node to
    /// it (config.toml changes only once all are there; run again after an
    /// interruption to go on). The node must not be running. The old store
    /// is left as it was.
    Migrate {
        /// s3://bucket/prefix, or "local" for <data-dir>/chunks. Endpoint,
        /// region and credentials as for the node's store: [chunks] in
        /// config.toml, else the AWS environment
        #[arg(long, value_name = "URL")]
        to: String,
    },
}

pub(super) fn run(node: &Node, command: &ChunksCommand) -> Result<()> {
    match command {
        ChunksCommand::Migrate { to } => migrate(node, to),
    }
}

fn migrate(node: &Node, to: &str) -> Result<()> {
    let sock = node.paths.admin_socket();
    if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
        return Err(Error::exists(format!(
            "the node at {} is running (its admin socket answers): stop it, migrate, start it again",
            node.paths.root.display()
        )));
    }
    let (location, url) = if to == "local" {
        let at = Location::Dir {
            root: node.paths.chunks(),
            quarantine: node.paths.quarantine(),
        };
        (at, None)
    } else {
        BucketSpec::parse_url(to)?;
        let mut section = node.config.chunks.clone();
        section.url = Some(to.to_string());
        let at = section.location(
            &node.paths.root,
            node.paths.chunks(),
            node.paths.quarantine(),
        )?;
        (at, Some(to))
    };
    let pb = progress_bar(0, "migrating chunks");
    let report = crate::content::migrate::migrate(node, &location, url, &|done, total| {
        pb.set_length(total);
        pb.set_position(done);
    })?;
    pb.finish_and_clear();
    outln!(
        "migrated to the {}: {} chunks copied ({} bytes), {} already there; the old store was left as it was",
        report.to,
        report.copied,
        report.copied_bytes,
        report.already
    );
    Ok(())
}
