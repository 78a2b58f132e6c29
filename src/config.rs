//! The node's settings file, `<data-dir>/config.toml`.
//!
//! Every field is optional; `bitsync init` writes [`DEFAULT_CONFIG`], which
//! documents each one. Unknown keys are an error, so a typo never silently
//! falls back to a default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::chunks::{BucketSpec, Credentials, Location};
use crate::error::{Error, IoContext, Result};

/// The port literal, once: a macro because `concat!` (which builds the
/// default listen address and the documented config file at compile time)
/// takes literals, not constants.
macro_rules! default_port {
    () => {
        7450
    };
}

/// The Federation port: what `listen` binds by default, and what a peer's
/// bare `xxx.onion` address means (every other place derives from this).
pub(crate) const DEFAULT_PORT: u16 = default_port!();

pub(crate) const DEFAULT_LISTEN: &str = concat!("127.0.0.1:", default_port!());

pub(crate) const DEFAULT_CONFIG: &str = concat!(
    r#"# bitsync node configuration.
# Every setting is optional; the values shown are the defaults.

# A name other nodes see for this node.
name = ""

# Federation listener (gRPC over mutual TLS). Port 0 picks a free port;
# the bound address is logged and shown by `grpcurl ... bitsync.v1.Admin/Status`.
listen = "127.0.0.1:"#,
    default_port!(),
    r#""

# Addresses written into invite tokens. Empty: the bound listen address
# (and the onion address when Tor is on).
advertise = []

# Admin is always on <data-dir>/admin.sock. To reach it over TCP as well, set an
# address; callers then need mutual TLS with this node's key or a node id listed
# in admin_peers.
# admin_listen = "127.0.0.1:7451"
admin_peers = []

# Prometheus metrics (/metrics) and a live status page (/) over plain HTTP, with
# no authentication: keep it on loopback (or behind a proxy that authenticates).
# Off unless set here or given as `serve --metrics HOST:PORT`.
# metrics_listen = "127.0.0.1:9450"

# Plaintext bytes per chunk for new items (4096 ..= 2097152).
chunk_size = 1048576

# While serving, re-hash chunk files in the background at most this many MiB/s
# (0: never). A chunk checked within the last day is skipped; one whose file is
# unchanged since a check in the last 7 days is sent without a re-hash.
scrub_mib_per_sec = 32

# Log lines on stderr: "text" for people, "json" (one object per line) for
# log shippers. `--log-format` overrides it; RUST_LOG sets the levels.
log_format = "text"

[limits]
# Concurrent streaming calls (StreamChunks, Watch) one peer may hold open.
max_streams_per_peer = 16
# Deadline for one unary call, server and client side.
request_timeout_secs = 60
# Largest ListManifests page the server returns.
list_page_max = 1000
# Most chunk ids in one StreamChunks request.
max_chunks_per_request = 4096
# Connections (per listener: federation, and admin_listen apart). Over a cap a
# new connection is closed at once. Connections still in their TLS handshake:
max_handshakes = 128
max_handshakes_per_address = 32
# A handshake must finish within this (a silent or trickling client is dropped).
handshake_timeout_secs = 10
# Established connections; the last reserved_for_trusted of them only for
# trusted peers (and admin_peers on admin_listen), so others cannot exhaust them.
max_connections = 512
reserved_for_trusted = 64
# Established connections from one address that are not a trusted peer's.
max_connections_per_address = 64
# A connection with no gRPC call open for this long is closed.
idle_timeout_secs = 300
# Failed Join attempts (bad or used invites) allowed per minute, from one
# address and from everyone; beyond them Join is refused RESOURCE_EXHAUSTED.
join_failures_per_minute_per_address = 10
join_failures_per_minute = 60
# StreamChunks calls open at once (all peers), and chunk bytes queued for them.
max_chunk_streams = 128
max_bytes_in_flight_mib = 128
# How long a StreamChunks call waits for a free stream before RESOURCE_EXHAUSTED.
stream_wait_ms = 2000

[tor]
# Serve Federation on an onion service with embedded Tor (arti); no tor daemon needed.
enabled = false
# Dial .onion peers through an external tor's SOCKS5 port instead of embedded Tor.
# socks = "127.0.0.1:9050"
# Extra arti configuration (TOML), merged over the defaults: e.g. a private test network.
# arti_config = "/path/to/arti.toml"
bootstrap_timeout_secs = 120
connect_timeout_secs = 60

# Where chunks are stored. Unset: <data-dir>/chunks on this disk. An
# S3-compatible bucket (`bitsync init --chunks s3://bucket/prefix` sets it):
# [chunks]
# url = "s3://bucket/prefix"
# endpoint = "http://127.0.0.1:8333"   # else AWS_ENDPOINT_URL, else AWS S3
# region = "us-east-1"                 # else AWS_REGION
# allow_http = false                   # true for a plain-HTTP endpoint
# credentials_file = "/path/to/credentials"  # mode 0600, AWS format; else
#                                      # AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY

# Mirror sources: `bitsync serve` keeps a Watch stream open to each and pulls what is new.
# [[mirror]]
# peer = "<node id of a trusted peer>"
"#
);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Config {
    pub(crate) name: String,
    pub(crate) listen: String,
    pub(crate) advertise: Vec<String>,
    pub(crate) admin_listen: Option<String>,
    pub(crate) admin_peers: Vec<String>,
    pub(crate) metrics_listen: Option<String>,
    pub(crate) chunk_size: u32,
    pub(crate) scrub_mib_per_sec: u32,
    pub(crate) log_format: LogFormat,
    pub(crate) limits: Limits,
    pub(crate) tor: TorConfig,
    pub(crate) mirror: Vec<MirrorConfig>,
    pub(crate) chunks: ChunksConfig,
}

/// How log lines are written: one format for the whole process, chosen
/// before the node is opened (`--log-format`, else `log_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `tracing`'s human format: time, level, message, then `key=value` fields.
    Text,
    /// One JSON object per line, the fields at its top level.
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Limits {
    pub(crate) max_streams_per_peer: u32,
    pub(crate) request_timeout_secs: u64,
    pub(crate) list_page_max: u32,
    pub(crate) max_chunks_per_request: u32,
    pub(crate) max_handshakes: u32,
    pub(crate) max_handshakes_per_address: u32,
    pub(crate) handshake_timeout_secs: u64,
    pub(crate) max_connections: u32,
    pub(crate) reserved_for_trusted: u32,
    pub(crate) max_connections_per_address: u32,
    pub(crate) idle_timeout_secs: u64,
    pub(crate) join_failures_per_minute_per_address: u32,
    pub(crate) join_failures_per_minute: u32,
    pub(crate) max_chunk_streams: u32,
    pub(crate) max_bytes_in_flight_mib: u32,
    pub(crate) stream_wait_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct TorConfig {
    pub(crate) enabled: bool,
    pub(crate) socks: Option<String>,
    pub(crate) arti_config: Option<PathBuf>,
    pub(crate) bootstrap_timeout_secs: u64,
    pub(crate) connect_timeout_secs: u64,
}

/// Where the chunks are: `<data-dir>/chunks` unless `url` names a bucket.
/// Credentials are never in this file (it goes into backups): they come
/// from the AWS environment or from `credentials_file`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ChunksConfig {
    pub(crate) url: Option<String>,
    pub(crate) endpoint: Option<String>,
    pub(crate) region: Option<String>,
    pub(crate) allow_http: Option<bool>,
    pub(crate) credentials_file: Option<PathBuf>,
}

impl ChunksConfig {
    /// The chunk store this section describes for the data dir `root`, whose
    /// own chunk and quarantine dirs are `dir` and `quarantine`. A relative
    /// `credentials_file` is relative to the data dir.
    pub(crate) fn location(
        &self,
        root: &Path,
        dir: PathBuf,
        quarantine: PathBuf,
    ) -> Result<Location> {
        let Some(url) = &self.url else {
            return Ok(Location::Dir {
                root: dir,
                quarantine,
            });
        };
        let credentials = match &self.credentials_file {
            None => None,
            Some(f) => Some(read_credentials(&root.join(f))?),
        };
        Ok(Location::Bucket(BucketSpec {
            url: url.clone(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            allow_http: self.allow_http,
            credentials,
        }))
    }
}

/// Set (or, with `None`, remove) `[chunks] url` in the config file at
/// `path`, keeping every other line and comment, in one atomic write. The
/// result must load as a valid config, or nothing is written.
pub(crate) fn set_chunks_url(path: &Path, url: Option<&str>) -> Result<()> {
    let text = std::fs::read_to_string(path).ctx(format!("reading {}", path.display()))?;
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
    match url {
        Some(u) => {
            let t = doc
                .entry("chunks")
                .or_insert_with(|| toml_edit::Item::Table(toml_edit::Table::new()))
                .as_table_mut()
                .ok_or_else(|| {
                    Error::invalid(format!("{}: chunks is not a table", path.display()))
                })?;
            t["url"] = toml_edit::value(u);
        }
        None => {
            if let Some(t) = doc.get_mut("chunks").and_then(|c| c.as_table_mut()) {
                t.remove("url");
            }
        }
    }
    let out = doc.to_string();
    Config::parse(&out).map_err(|e| e.context(path.display()))?;
    crate::durable::write_atomic(path, out.as_bytes(), 0o600)
}

/// Read an AWS shared-credentials file (`aws_access_key_id`,
/// `aws_secret_access_key`, optional `aws_session_token`, in its
/// `[default]` section or before any section). Refused unless only its
/// owner can read it, as ssh does with keys.
fn read_credentials(path: &Path) -> Result<Credentials> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let meta = std::fs::metadata(path).ctx(format!("credentials file {shown}"))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(Error::denied(format!(
            "credentials file {shown} can be read by others (mode {:o}); run `chmod 600 {shown}`",
            meta.permissions().mode() & 0o777
        )));
    }
    if meta.len() > 64 * 1024 {
        return Err(Error::invalid(format!(
            "credentials file {shown} is larger than 64 KiB"
        )));
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).ctx(format!("reading credentials file {shown}"))?,
    );
    let (mut id, mut secret, mut token) = (None, None, None);
    let mut in_default = true;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_default = line == "[default]";
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if !in_default {
            continue;
        }
        let v = v.trim().to_string();
        match k.trim() {
            "aws_access_key_id" => id = Some(v),
            "aws_secret_access_key" => secret = Some(zeroize::Zeroizing::new(v)),
            "aws_session_token" => token = Some(zeroize::Zeroizing::new(v)),
            _ => {}
        }
    }
    match (id, secret) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(Credentials {
            access_key_id,
            secret_access_key,
            session_token: token,
        }),
        _ => Err(Error::invalid(format!(
            "credentials file {shown} has no aws_access_key_id and aws_secret_access_key in its [default] section"
        ))),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MirrorConfig {
    pub(crate) peer: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: String::new(),
            listen: DEFAULT_LISTEN.to_string(),
            advertise: Vec::new(),
            admin_listen: None,
            admin_peers: Vec::new(),
            metrics_listen: None,
            chunk_size: crate::manifest::DEFAULT_CHUNK_SIZE,
            scrub_mib_per_sec: 32,
            log_format: LogFormat::Text,
            limits: Limits::default(),
            tor: TorConfig::default(),
            mirror: Vec::new(),
            chunks: ChunksConfig::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_streams_per_peer: 16,
            request_timeout_secs: 60,
            list_page_max: 1000,
            max_chunks_per_request: 4096,
            max_handshakes: 128,
            max_handshakes_per_address: 32,
            handshake_timeout_secs: 10,
            max_connections: 512,
            reserved_for_trusted: 64,
            max_connections_per_address: 64,
            idle_timeout_secs: 300,
            join_failures_per_minute_per_address: 10,
            join_failures_per_minute: 60,
            max_chunk_streams: 128,
            max_bytes_in_flight_mib: 128,
            stream_wait_ms: 2000,
        }
    }
}

impl Default for TorConfig {
    fn default() -> Self {
        TorConfig {
            enabled: false,
            socks: None,
            arti_config: None,
            bootstrap_timeout_secs: 120,
            connect_timeout_secs: 60,
        }
    }
}

impl Config {
    pub(crate) fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).ctx(format!("reading {}", path.display()))?;
        Config::parse(&text).map_err(|e| e.context(path.display()))
    }

    pub(crate) fn parse(text: &str) -> Result<Config> {
        let c: Config =
            toml::from_str(text).map_err(|e| Error::invalid(format!("bad configuration: {e}")))?;
        let m = crate::manifest::MIN_CHUNK_SIZE..=crate::manifest::MAX_CHUNK_SIZE;
        if !m.contains(&c.chunk_size) {
            return Err(Error::invalid(format!(
                "chunk_size {} is outside {m:?}",
                c.chunk_size
            )));
        }
        let l = &c.limits;
        let counts = [
            l.list_page_max,
            l.max_chunks_per_request,
            l.max_streams_per_peer,
            l.max_handshakes,
            l.max_handshakes_per_address,
            l.max_connections,
            l.max_connections_per_address,
            l.join_failures_per_minute_per_address,
            l.join_failures_per_minute,
            l.max_chunk_streams,
            l.max_bytes_in_flight_mib,
        ];
        if counts.contains(&0) || l.handshake_timeout_secs == 0 || l.idle_timeout_secs == 0 {
            return Err(Error::invalid("limits must be positive"));
        }
        if l.reserved_for_trusted >= l.max_connections {
            return Err(Error::invalid(format!(
                "[limits] reserved_for_trusted ({}) must be below max_connections ({})",
                l.reserved_for_trusted, l.max_connections
            )));
        }

        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_parses_to_defaults() {
        let c = Config::parse(DEFAULT_CONFIG).unwrap();
        assert_eq!(c.listen, DEFAULT_LISTEN);
        assert_eq!(c.chunk_size, crate::manifest::DEFAULT_CHUNK_SIZE);
        assert!(!c.tor.enabled);
        let (l, d) = (&c.limits, Limits::default());
        assert_eq!(
            (
                l.max_handshakes,
                l.max_connections,
                l.idle_timeout_secs,
                l.max_chunk_streams
            ),
            (
                d.max_handshakes,
                d.max_connections,
                d.idle_timeout_secs,
                d.max_chunk_streams
            )
        );
    }

    #[test]
    fn log_format_is_text_or_json() {
        assert_eq!(Config::parse("").unwrap().log_format, LogFormat::Text);
        let c = Config::parse("log_format = \"json\"").unwrap();
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(Config::parse("log_format = \"xml\"").is_err());
    }

    #[test]
    fn typo_is_an_error() {
        assert!(Config::parse("lisen = \"x\"").is_err());
    }
}
