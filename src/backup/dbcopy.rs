//! Consistent copies of a live database. What backup, restore and
//! clone-instance then read from (and change in) such a copy goes through the
//! store, which owns the schema: [`Db::open_read_only`], [`Db::facts`],
//! [`crate::store::integrity_problems`], [`Db::open_copy`] and [`Db::rekey`].
//!
//! A copy is taken with SQLite's online backup API in one step: the source
//! connection holds a single read transaction for the whole copy, which in WAL
//! mode never blocks the node's writer and sees every committed transaction,
//! including those still only in the `-wal` file (a file copy of `bitsync.db`
//! would lose those). The copy is switched to rollback-journal mode so it is
//! one self-contained file, checked with `PRAGMA integrity_check`, and fsynced.

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::error::{Error, Result};
use crate::store::Db;

/// How long a copy waits for the source to become readable (WAL recovery, a
/// checkpoint holding an exclusive lock) before giving up.
const BUSY_WAIT: Duration = Duration::from_secs(30);

fn ctx(e: rusqlite::Error, what: impl std::fmt::Display) -> Error {
    Error::from(e).context(what)
}

/// Copy the database at `src` (which may be in use by a running node) to the
/// new file `dst`, consistently. `dst` must not exist.
pub(crate) fn snapshot_db(src: &Path, dst: &Path) -> Result<()> {
    if dst.exists() {
        return Err(Error::exists(format!("{} already exists", dst.display())));
    }
    // Opening checks the schema: a file that is not a bitsync database fails
    // here, with a clear message, before anything is created.
    let db = Db::open_read_only(src)?;
    let from = db.backup_source();
    let result = (|| {
        let mut to =
            Connection::open(dst).map_err(|e| ctx(e, format!("creating {}", dst.display())))?;
        {
            let b = rusqlite::backup::Backup::new(&from, &mut to)
                .map_err(|e| ctx(e, format!("starting the copy of {}", src.display())))?;
            let started = Instant::now();
            loop {
                use rusqlite::backup::StepResult::*;
                match b
                    .step(-1)
                    .map_err(|e| ctx(e, format!("copying {}", src.display())))?
                {
                    Done => break,
                    More => continue,
                    Busy | Locked if started.elapsed() < BUSY_WAIT => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        return Err(Error::unavailable(format!(
                            "{} stayed locked for {}s; retry when the node is less busy",
                            src.display(),
                            BUSY_WAIT.as_secs()
                        )))
                    }
                }
            }
        }
        // One self-contained file: no -wal or -shm beside it.
        let mode: String = to
            .query_row("PRAGMA journal_mode=DELETE", [], |r| r.get(0))
            .map_err(|e| ctx(e, format!("{}", dst.display())))?;
        if !mode.eq_ignore_ascii_case("delete") {
            return Err(Error::io(format!(
                "{}: could not leave WAL mode (journal mode is {mode})",
                dst.display()
            )));
        }
        to.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| ctx(e, dst.display()))?;
        drop(to);
        super::fsync_file(dst)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
        let _ = std::fs::remove_file(dst.with_extension("db-journal"));
    }
    result
}
