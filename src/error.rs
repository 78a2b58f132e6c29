//! One error type for the whole node.
//!
//! Every failure is classified once, at the place that knows what went wrong,
//! and the class decides both the CLI exit code and the gRPC status code. The
//! message says what failed and, where there is one, what to do about it.

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
}

#[derive(Debug, Clone)]
pub struct Error {
    kind: Kind,
    message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(m: impl Into<String>) -> Self {
        Self::new(Kind::Invalid, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(Kind::NotFound, m)
    }
    pub fn exists(m: impl Into<String>) -> Self {
        Self::new(Kind::Exists, m)
    }
    pub fn integrity(m: impl Into<String>) -> Self {
        Self::new(Kind::Integrity, m)
    }
    pub fn auth(m: impl Into<String>) -> Self {
        Self::new(Kind::Auth, m)
    }
    pub fn denied(m: impl Into<String>) -> Self {
        Self::new(Kind::Denied, m)
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::new(Kind::Unavailable, m)
    }
    pub fn exhausted(m: impl Into<String>) -> Self {
        Self::new(Kind::Exhausted, m)
    }
    pub fn io(m: impl Into<String>) -> Self {
        Self::new(Kind::Io, m)
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefix the message with what was being done, keeping the kind.
    pub fn context(self, what: impl fmt::Display) -> Self {
        Error {
            kind: self.kind,
            message: format!("{what}: {}", self.message),
        }
    }

    /// The process exit code for this kind (2 is shared with clap's usage errors).
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
        }
    }

    pub fn code(&self) -> tonic::Code {
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
        }
    }

    /// Classify an I/O error about `what` (a path or a description).
    pub fn from_io(e: std::io::Error, what: impl fmt::Display) -> Self {
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

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.code(), e.message)
    }
}

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
pub trait IoContext<T> {
    fn ctx(self, what: impl fmt::Display) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| Error::from_io(e, what))
    }
}
