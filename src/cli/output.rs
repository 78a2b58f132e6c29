//! Writing results to stdout when its reader may leave early.
//!
//! `bitsync id --cert | head -1` closes the pipe after one line; Rust
//! ignores SIGPIPE, so the next write fails with EPIPE and `println!`
//! panics. A reader that has seen enough is not a failure of the command:
//! once stdout's reader is gone, further output is dropped and the command
//! ends as it would have (the same exit code, errors still on stderr).
//! Resetting SIGPIPE to its default instead would also kill the process on
//! a write to a closed Admin socket, with no message; this keeps the signal
//! ignored and handles the pipe where stdout is written.
//!
//! Any other write error (a full disk under `> file`) is kept and reported
//! by [`check`] when the command has otherwise succeeded.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Set once a write to stdout failed with EPIPE.
static GONE: AtomicBool = AtomicBool::new(false);
/// The first other error writing stdout.
static FAILED: Mutex<Option<std::io::Error>> = Mutex::new(None);

/// Print `args` on stdout (what `out!` and `outln!` call).
pub(crate) fn print(args: std::fmt::Arguments<'_>) {
    if gone() {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|_| out.flush()) {
        note(e);
    }
}

/// Whether stdout's reader has gone.
pub(crate) fn gone() -> bool {
    GONE.load(Ordering::Relaxed)
}

fn note(e: std::io::Error) {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        GONE.store(true, Ordering::Relaxed);
    } else {
        let mut f = FAILED.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(e);
    }
}

/// A writer onto stdout (for `get`'s stream) that records EPIPE, so the
/// caller can tell "the reader left" from a failure.
pub(crate) struct Stdout<W>(pub(crate) W);

impl<W: Write> Write for Stdout<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf).inspect_err(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                GONE.store(true, Ordering::Relaxed);
            }
        })
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush().inspect_err(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                GONE.store(true, Ordering::Relaxed);
            }
        })
    }
}

/// The command's result, with a failed write to stdout (other than EPIPE)
/// turned into an error if the command had none of its own.
pub(crate) fn check(r: Result<()>) -> Result<()> {
    r?;
    let failed = FAILED.lock().unwrap_or_else(|p| p.into_inner()).take();
    match failed {
        Some(e) => Err(Error::from_io(e, "writing to stdout")),
        None => Ok(()),
    }
}

/// `print!` onto stdout through [`print`].
macro_rules! out {
    ($($arg:tt)*) => { $crate::cli::output::print(format_args!($($arg)*)) };
}

/// `println!` onto stdout through [`print`].
macro_rules! outln {
    () => { $crate::cli::output::print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::output::print(format_args!("{}\n", format_args!($($arg)*))) };
}

pub(crate) use {out, outln};
