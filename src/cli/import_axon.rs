//! `import-axon`: an Axon BBS backup into this node, item by item, with a
//! line per item saying what became of it.

use std::path::PathBuf;

use clap::Args;

use super::output::outln;
use super::Cli;
use crate::backup::import_axon;
use crate::error::{Error, Result};

#[derive(Args, Debug)]
pub(crate) struct ImportAxonArgs {
    /// The Axon backup directory (backup_YYYYMMDD_HHMMSS/)
    pub(crate) dir: PathBuf,
    /// The Axon instance's RSA private key (PEM): also decrypt, check and re-publish each item natively
    #[arg(long, value_name = "KEY.pem")]
    pub(crate) axon_key: Option<PathBuf>,
}

pub(super) fn import_axon(cli: &Cli, a: &ImportAxonArgs) -> Result<()> {
    let key = a
        .axon_key
        .as_deref()
        .map(import_axon::load_axon_key)
        .transpose()?;
    let node = cli.open_node()?;
    let report = import_axon::import(&node, &a.dir, key.as_ref(), &|label| {
        tracing::info!("importing {label}")
    })?;
    let mut applet = None;
    let (mut imported, mut already) = (0, 0);
    for it in &report.items {
        if applet.as_deref() != Some(it.applet.as_str()) {
            outln!("applet '{}'", it.applet);
            applet = Some(it.applet.clone());
        }
        let (was_imported, was_already) = print_item(it);
        imported += usize::from(was_imported);
        already += usize::from(was_already);
    }
    let skipped = report.skipped();
    eprintln!(
        "Axon backup of {}: {} item(s), {} imported ({} already here), {} not imported",
        report.backup_date,
        report.items.len(),
        imported,
        already,
        skipped
    );
    if skipped > 0 {
        return Err(Error::integrity(format!(
            "{skipped} Axon item(s) were incomplete or damaged and were not imported (see above); the rest were"
        )));
    }
    Ok(())
}

/// One line (and its notes) for an item; returns (imported, already here).
fn print_item(it: &import_axon::ItemReport) -> (bool, bool) {
    let what = match &it.kind {
        crate::axon::AxonItemKind::AppletCode => "code".to_string(),
        crate::axon::AxonItemKind::AppletData {
            instance_id,
            owner_username,
        } => {
            format!("data of {owner_username} (id {instance_id})")
        }
    };
    match &it.status {
        import_axon::Status::Imported {
            legacy,
            native,
            already: was,
            note,
        } => {
            let mut parts = Vec::new();
            if let Some(l) = legacy {
                parts.push(format!("legacy {}", l));
            }
            if let Some(n) = native {
                parts.push(format!("native {}", n));
            }
            outln!(
                "  {what}: complete, {}{}",
                if *was {
                    "already imported: "
                } else {
                    "imported: "
                },
                parts.join(", ")
            );
            if let Some(n) = note {
                outln!("    note: {n}");
            }
            (true, *was)
        }
        import_axon::Status::Incomplete { problems } => {
            let missing = problems.iter().any(|p| p.contains("is missing"));
            let corrupt = problems.iter().any(|p| !p.contains("is missing"));
            let state = match (missing, corrupt) {
                (true, true) => "MISSING and CORRUPT pieces",
                (true, false) => "MISSING pieces",
                _ => "CORRUPT",
            };
            outln!("  {what}: {state}, not imported");
            for p in problems {
                outln!("    {p}");
            }
            (false, false)
        }
        import_axon::Status::Failed { reason } => {
            outln!("  {what}: FAILED, not imported: {reason}");
            (false, false)
        }
    }
}
