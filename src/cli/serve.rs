//! `serve`, and `invite`, which asks the running node over its Admin socket
//! (as `status` does, in its own file).

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

pub(super) fn invite(data_dir: &Path, ttl: Duration, blind: bool) -> Result<()> {
    runtime()?.block_on(async {
        let sock = Paths::new(data_dir).admin_socket();
        let mut admin = AdminClient::new(admin_channel(&sock).await?);
        let r = admin
            .create_invite(crate::proto::CreateInviteRequest {
                ttl_seconds: ttl.as_secs().max(1),
                blind,
            })
            .await
            .map_err(Error::from)?
            .into_inner();
        eprintln!(
            "one-time invite{}, valid for {}; on the other node, give it to `bitsync clone -` on stdin \
             (or `--token-file F`): as an argument, every local user can read it in `ps`",
            if blind {
                " for a blind peer (it may hold and serve this instance, never read it)"
            } else {
                ""
            },
            humantime::format_duration(ttl)
        );
        outln!("{}", r.token);
        Ok(())
    })
}
