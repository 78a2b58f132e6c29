//! One error type for the whole node.
//!
//! Every failure is classified once, at the place that knows what went wrong,
//! and the class decides both the CLI exit code and the gRPC status code. The
//! message says what failed and, where there is one, what to do about it.
//!
//! ## The rules
//!
//! | [`Kind`]      | exit | gRPC status          | for example |
//! |---------------|-----:|----------------------|-------------|
//! | `Invalid`     |  2   | `INVALID_ARGUMENT`   | a malformed id, token, address or flag; a bad `config.toml` |
//! | `NotFound`    |  3   | `NOT_FOUND`          | no data dir, no such item, not a peer, a chunk not here |
//! | `Exists`      |  4   | `ALREADY_EXISTS`     | a destination that is not empty; a node already running |
//! | `Integrity`   |  5   | `DATA_LOSS`          | a hash, signature or GCM tag that fails; `verify` found problems |
//! | `Auth`        |  6   | `UNAUTHENTICATED`    | a wrong or missing passphrase; a bad, used or expired invite; no client certificate |
//! | `Denied`      |  7   | `PERMISSION_DENIED`  | a peer that does not trust us, or that we do not trust; the wrong node at an address; an Axon item imported without its key; a file we may not open |
//! | `Unavailable` |  8   | `UNAVAILABLE`        | a peer that cannot be reached; Tor not bootstrapped; a clone left incomplete |
//! | `Exhausted`   |  9   | `RESOURCE_EXHAUSTED` | a full disk; too many streams or ids in one request |
//! | `Io`          | 10   | `INTERNAL`           | any other local I/O or database failure |
//! | `NoKey`       | 11   | `FAILED_PRECONDITION` | `get` of an item this node mirrors blind or that awaits its key: it holds the item, verified, but no key (PROTOCOL.md §2.1, §2.3) |
//!
//! Exit code 0 is success, and 2 is also what clap uses for a usage error, so
//! a script can treat "the command line was wrong" alike either way. The
//! mapping to gRPC is the same on both services (Federation and Admin) and
//! in per-item `Problem`s, so a code seen by a peer, by grpcurl or by the
//! CLI means the same thing. Going the other way, a status received from a
//! peer becomes a `Kind` by `From<tonic::Status>`, so `bitsync clone` exits
//! 7 when the peer says `PERMISSION_DENIED`.
//!
//! Errors of the layers with their own error types fold in at the one place
//! that calls them:
//!
//! - `tor::TorError` (the Tor layer moves bytes only and knows nothing of
//!   this type): the transport turns a failed bootstrap, any failed onion
//!   connect (Arti or SOCKS5, after its retries) and a timeout into
//!   `Unavailable`, and a malformed onion address (`InvalidAddress`) into
//!   `Invalid`; `serve` logs a failed onion service launch (`Unavailable`)
//!   and keeps serving on TCP.
//! - `axon::AxonError` (the Axon reader is strict and names the file and the
//!   field): `import-axon` maps a backup that cannot be opened to `NotFound`
//!   when a file is missing, `Io` for other read failures, and `Invalid` for
//!   bad JSON or a bad field; per item, a damaged piece or a failed
//!   decryption is reported and skips the item, an envelope that does not
//!   open is a note, and the command ends with `Integrity` (exit 5) if any
//!   item was skipped.
//! - `std::io::Error` through [`Error::from_io`] / [`IoContext::ctx`],
//!   `rusqlite::Error` through `From`: see their comments.
//!
//! ## Messages
//!
//! A message is one line: what failed, the thing it failed on (a path, an
//! id, a count), and the fix where there is one. It is shown as it is: on
//! stderr by the CLI, to the operator by Admin, and **to the peer** by
//! Federation, which sends `message()` verbatim as the status message or in
//! a `Problem`. So a message never holds a secret: no key bytes, passphrase,
//! invite secret, plaintext or decrypted item name. Ids (node, content,
//! chunk) are public and are named in full; Federation errors name chunk
//! ids, not the paths of chunk files. What a message quotes of outside
//! input (a string that was meant to be an id, an address) goes through
//! [`quote`], which cuts it to 80 characters, and every status message is
//! cut to 512 characters, so a peer never gets its own megabyte back. A message received from a peer is
//! kept as received (see `From<tonic::Status>`), so it is the peer's text,
//! not ours.

use std::fmt;

/// What kind of failure this is. Each kind has its own exit code and gRPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The caller asked for something malformed (bad id, bad token, bad flag).
    Invalid,
    /// The thing named does not exist (file, data dir, content id, peer).
    NotFound,
    /// The target already exists and would be overwritten.
    Exists,
    /// Stored or received bytes failed a hash, signature or MAC check.
    Integrity,
    /// A secret was wrong or missing (passphrase, invite secret, client certificate).
    Auth,
    /// The caller is known but not allowed (untrusted or revoked peer).
    Denied,
    /// A peer or service could not be reached; retrying may help.
    Unavailable,
    /// A limit was hit: disk full, too many streams, a request too large.
    Exhausted,
    /// Local I/O or database failure not covered above.
    Io,
    /// The item is here and verified, but this node holds no key for it:
    /// it mirrors it blind. Not `Denied` (7): nobody refused anything, and
    /// a script must tell "cannot read this here, by design" from "not allowed".
    NoKey,
}

#[derive(Debug, Clone)]
pub struct Error {
    kind: Kind,
    message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }
    pub(crate) fn invalid(m: impl Into<String>) -> Self {
        Self::new(Kind::Invalid, m)
    }
    pub(crate) fn not_found(m: impl Into<String>) -> Self {
        Self::new(Kind::NotFound, m)
    }
    pub(crate) fn exists(m: impl Into<String>) -> Self {
        Self::new(Kind::Exists, m)
    }
    pub(crate) fn integrity(m: impl Into<String>) -> Self {
        Self::new(Kind::Integrity, m)
    }
    pub(crate) fn auth(m: impl Into<String>) -> Self {
        Self::new(Kind::Auth, m)
    }
    pub(crate) fn denied(m: impl Into<String>) -> Self {
        Self::new(Kind::Denied, m)
    }
    pub(crate) fn unavailable(m: impl Into<String>) -> Self {
        Self::new(Kind::Unavailable, m)
    }
    pub(crate) fn exhausted(m: impl Into<String>) -> Self {
        Self::new(Kind::Exhausted, m)
    }
    pub(crate) fn io(m: impl Into<String>) -> Self {
        Self::new(Kind::Io, m)
    }
    pub(crate) fn no_key(m: impl Into<String>) -> Self {
        Self::new(Kind::NoKey, m)
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefix the message with what was being done, keeping the kind.
    pub(crate) fn context(self, what: impl fmt::Display) -> Self {
        Error {
            kind: self.kind,
            message: format!("{what}: {}", self.message),
        }
    }

    /// The process exit code for this kind (2 is shared with clap's usage
    /// errors). The numbers are part of the interface: scripts and the tests
    /// check them, and the README names 7, 8 and 9. Never renumber; a new
    /// kind takes the next free number.
    pub fn exit_code(&self) -> i32 {
        match self.kind {
            Kind::Invalid => 2,
            Kind::NotFound => 3,
            Kind::Exists => 4,
            Kind::Integrity => 5,
            Kind::Auth => 6,
            Kind::Denied => 7,
            Kind::Unavailable => 8,
            Kind::Exhausted => 9,
            Kind::Io => 10,
            Kind::NoKey => 11,
        }
    }

    /// The gRPC status code for this kind, used for every status and
    /// `Problem` this node sends. One code per kind, so that the code a peer
    /// sends comes back as the same kind (see `From<tonic::Status>`), except
    /// `NoKey`: its `FAILED_PRECONDITION` comes back as `Invalid`, the kind
    /// a peer's FAILED_PRECONDITION has always had (no node sends `NoKey`
    /// to a peer: it is a local verdict).
    pub(crate) fn code(&self) -> tonic::Code {
        match self.kind {
            Kind::Invalid => tonic::Code::InvalidArgument,
            Kind::NotFound => tonic::Code::NotFound,
            Kind::Exists => tonic::Code::AlreadyExists,
            Kind::Integrity => tonic::Code::DataLoss,
            Kind::Auth => tonic::Code::Unauthenticated,
            Kind::Denied => tonic::Code::PermissionDenied,
            Kind::Unavailable => tonic::Code::Unavailable,
            Kind::Exhausted => tonic::Code::ResourceExhausted,
            Kind::Io => tonic::Code::Internal,
            Kind::NoKey => tonic::Code::FailedPrecondition,
        }
    }

    /// Classify an I/O error about `what` (a path or a description).
    ///
    /// The OS error decides the kind: a missing file is `NotFound`, an
    /// existing one `Exists`, `EACCES`/`EPERM` `Denied` (with a hint to check
    /// owner and mode), a full disk or quota (`ENOSPC` also when std does not
    /// name it) `Exhausted` (with the promise every writer keeps: nothing
    /// half-written was kept), anything else `Io`. `what` should name the
    /// file or the step, never its contents.
    pub(crate) fn from_io(e: std::io::Error, what: impl fmt::Display) -> Self {
        use std::io::ErrorKind as K;
        let kind = match e.kind() {
            K::NotFound => Kind::NotFound,
            K::AlreadyExists => Kind::Exists,
            K::PermissionDenied => Kind::Denied,
            K::StorageFull | K::QuotaExceeded => Kind::Exhausted,
            _ if e.raw_os_error() == Some(libc::ENOSPC) => Kind::Exhausted,
            _ => Kind::Io,
        };
        let hint = match kind {
            Kind::Exhausted => {
                " (free some space and run the command again; nothing half-written was kept)"
            }
            Kind::Denied => " (check the owner and mode of the file or directory)",
            _ => "",
        };
        Error::new(kind, format!("{what}: {e}{hint}"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// SQLite failures: a full disk is `Exhausted` and a damaged database file
/// `Integrity` (both with what to do); everything else, including a lock
/// held past the 30-second busy timeout, is `Io`.
impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        if let rusqlite::Error::SqliteFailure(f, _) = &e {
            match f.code {
                rusqlite::ErrorCode::DiskFull => {
                    return Error::exhausted(format!("database: {e} (free some space and retry)"))
                }
                rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase => {
                    return Error::integrity(format!(
                        "database is corrupt: {e} (restore from a backup)"
                    ))
                }
                _ => {}
            }
        }
        Error::io(format!("database: {e}"))
    }
}

/// What a service sends: [`Error::code`] and the message, verbatim (see
/// "Messages" above: it must hold nothing secret).
///
/// The message is cut to [`MAX_STATUS_MESSAGE`] characters: it travels in
/// the `grpc-message` header, and whatever a message quotes of a request
/// should already be cut by [`quote`]; this is the backstop for any that is not.
impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let code = e.code();
        let message = match e.message.char_indices().nth(MAX_STATUS_MESSAGE) {
            Some((at, _)) => format!("{}…", &e.message[..at]),
            None => e.message,
        };
        tonic::Status::new(code, message)
    }
}

/// What a peer (or the node's own Admin service) answered, as a local error.
///
/// The inverse of [`Error::code`] on the nine codes it produces; of the
/// others, the "your request was wrong" codes (`FAILED_PRECONDITION`,
/// `OUT_OF_RANGE`) are `Invalid`, the "try again" codes (`DEADLINE_EXCEEDED`,
/// `CANCELLED`, `ABORTED`) are `Unavailable`, and `UNKNOWN`, `INTERNAL`,
/// `UNIMPLEMENTED` are `Io`. The peer's message is kept (or the code's name
/// when it sent none), so the CLI shows what the peer said.
impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code as C;
        let kind = match s.code() {
            C::InvalidArgument | C::FailedPrecondition | C::OutOfRange => Kind::Invalid,
            C::NotFound => Kind::NotFound,
            C::AlreadyExists => Kind::Exists,
            C::DataLoss => Kind::Integrity,
            C::Unauthenticated => Kind::Auth,
            C::PermissionDenied => Kind::Denied,
            C::Unavailable | C::DeadlineExceeded | C::Cancelled | C::Aborted => Kind::Unavailable,
            C::ResourceExhausted => Kind::Exhausted,
            _ => Kind::Io,
        };
        let msg = if s.message().is_empty() {
            format!("{:?}", s.code())
        } else {
            s.message().to_string()
        };
        Error::new(kind, msg)
    }
}

/// Attach "what" to an I/O result, classifying the error.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl fmt::Display) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| Error::from_io(e, what))
    }
}

/// Run blocking work (disk, SQLite, RSA) on tokio's blocking pool, so it never
/// stalls the threads that drive connections. A panic in `f` comes back as an
/// `Io` error instead of unwinding into the caller.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::io(format!("worker failed: {e}")))?
}

/// The most characters of outside input (an id, an address, a name from a
/// request or a file) that a message quotes; the rest is cut and marked "…".
pub(crate) const MAX_QUOTED: usize = 80;

/// The most characters of a status message this node sends.
pub(crate) const MAX_STATUS_MESSAGE: usize = 512;

/// `s` quoted as `{:?}` does, cut to [`MAX_QUOTED`] characters of input, for
/// a message that names what a peer or a file gave us. A peer that sends a
/// 1 MB "chunk id" gets back its first 80 characters, not the whole of it
/// in `grpc-message`; the length says how much there was.
pub(crate) fn quote(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTED) {
        Some((at, _)) => format!("{:?}… ({} bytes)", &s[..at], s.len()),
        None => format!("{s:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_cuts_long_input_and_keeps_short_input() {
        assert_eq!(quote("abc"), "\"abc\"");
        let long = "é".repeat(1000);
        let q = quote(&long);
        assert!(
            q.starts_with(&format!("{:?}", "é".repeat(MAX_QUOTED))),
            "{q}"
        );
        assert!(q.ends_with("… (2000 bytes)"), "{q}");
    }

    #[test]
    fn status_messages_are_bounded() {
        let s = tonic::Status::from(Error::invalid("x".repeat(100_000)));
        assert_eq!(s.message().chars().count(), MAX_STATUS_MESSAGE + 1);
        assert_eq!(
            tonic::Status::from(Error::invalid("short")).message(),
            "short"
        );
    }
}
