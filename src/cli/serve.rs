//! `serve`, and the commands that talk to a running node over its Admin
//! socket: `invite` and `status`.

use std::path::Path;
use std::time::Duration;

use super::output::outln;
use super::{runtime, Cli};
use crate::error::{Error, Result};
use crate::node::Paths;
use crate::proto::admin_client::AdminClient;
use crate::transport::admin_channel;

pub(super) fn serve(cli: &Cli, opts: crate::server::ServeOptions) -> Result<()> {
    let n = cli.open_node()?;
    runtime()?.block_on(crate::server::serve(n, opts))
}

pub(super) fn invite(data_dir: &Path, ttl: Duration) -> Result<()> {
    runtime()?.block_on(async {
        let sock = Paths::new(data_dir).admin_socket();
        let mut admin = AdminClient::new(admin_channel(&sock).await?);
        let r = admin
            .create_invite(crate::proto::CreateInviteRequest {
                ttl_seconds: ttl.as_secs().max(1),
            })
            .await
            .map_err(Error::from)?
            .into_inner();
        eprintln!(
            "one-time invite, valid for {}; on the other node, give it to `bitsync clone -` on stdin \
             (or `--token-file F`): as an argument, every local user can read it in `ps`",
            humantime::format_duration(ttl)
        );
        outln!("{}", r.token);
        Ok(())
    })
}

pub(super) fn status(data_dir: &Path) -> Result<()> {
    runtime()?.block_on(async {
        let sock = Paths::new(data_dir).admin_socket();
        let mut admin = AdminClient::new(admin_channel(&sock).await?);
        let s = admin
            .status(crate::proto::StatusRequest {})
            .await
            .map_err(Error::from)?
            .into_inner();
        let jobs: Vec<_> = s
            .jobs
            .iter()
            .map(|j| {
                let p = j.progress.clone().unwrap_or_default();
                let phase = crate::proto::progress::Phase::try_from(p.phase)
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
            "jobs": jobs, "uptime_ms": s.uptime_ms,
        });
        outln!("{}", serde_json::to_string_pretty(&v).expect("json"));
        Ok(())
    })
}
