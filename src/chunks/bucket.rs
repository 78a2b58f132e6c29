//! The object-store backend: chunks as objects in an S3-compatible bucket
//! (SeaweedFS, Garage, MinIO, Ceph RGW, AWS S3, B2), through Apache Arrow's
//! `object_store` crate, which does the signing, retries and HTTP.
//!
//! Layout under `s3://<bucket>/<prefix>` (docs/FORMAT.md §6.2):
//! `chunks/<first two hex chars>/<64 hex chars>`, `quarantine/<64 hex>`, and
//! a marker object `bitsync-chunk-store` naming the layout. An S3 PUT is
//! atomic (an object is visible whole or not at all) and durable once it
//! returns, so there is no temp object and [`Backend::sync`] has nothing to do.
//!
//! `object_store` is async; the chunk store is called from blocking threads
//! (the data path's workers, `spawn_blocking`). Each call is run on one
//! process-wide runtime kept for object-store I/O and waited for here, so the
//! callers' threads never need a runtime of their own.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as Key;
use object_store::{ClientConfigKey, ObjectMeta, ObjectStore, ObjectStoreExt, RetryConfig};
use zeroize::Zeroizing;

use super::{Backend, Stamp, MAX_CHUNK_BYTES};
use crate::crypto::{ChunkId, Hash};
use crate::error::{Error, Kind, Result};

/// The marker object's name and first line: what makes a prefix a chunk store.
const MARKER: &str = "bitsync-chunk-store";
const MARKER_TEXT: &str = "bitsync chunk store, layout 1\n";

/// Stamps of objects carry this in `dev`, which no local filesystem uses, so
/// a check recorded for a file never matches an object or the reverse.
const OBJECT_DEV: u64 = u64::MAX;

/// Objects fetched ahead by one chunk stream: enough to hide a round trip to
/// a remote store behind the sending of the chunks before it.
const READ_AHEAD: usize = 8;

/// Where a bucket is and how to sign for it. Unset fields come from the
/// standard AWS environment (`AWS_ENDPOINT_URL`, `AWS_REGION`,
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`, ...);
/// set ones win over it.
#[derive(Clone, Default)]
pub struct BucketSpec {
    /// `s3://bucket` or `s3://bucket/prefix`.
    pub url: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub allow_http: Option<bool>,
    pub credentials: Option<Credentials>,
}

#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: Zeroizing<String>,
    pub session_token: Option<Zeroizing<String>>,
}

/// Never the credentials: a spec is logged and shown in errors.
impl fmt::Debug for BucketSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BucketSpec")
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("allow_http", &self.allow_http)
            .field("credentials", &self.credentials.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl BucketSpec {
    /// The bucket and the prefix (no leading or trailing `/`) of [`url`](Self::url).
    pub fn parse_url(url: &str) -> Result<(String, String)> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            Error::invalid(format!(
                "chunk store {url:?}: an object store is given as s3://bucket or s3://bucket/prefix"
            ))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.".contains(c);
        if bucket.len() < 3 || bucket.len() > 63 || !bucket.chars().all(valid) {
            return Err(Error::invalid(format!(
                "chunk store {url:?}: {bucket:?} is not an S3 bucket name (3 to 63 of a-z, 0-9, '-', '.')"
            )));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
            return Err(Error::invalid(format!(
                "chunk store {url:?}: the prefix has an empty, '.' or '..' part"
            )));
        }
        Ok((bucket.to_string(), prefix.to_string()))
    }
}

pub(super) struct Bucket {
    store: Arc<dyn ObjectStore>,
    url: String,
    prefix: String,
}

impl fmt::Debug for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bucket({})", self.url)
    }
}

impl Bucket {
    /// Connect and check the store at once (reachable, credentials accepted,
    /// the prefix a chunk store or empty), so a wrong setting fails at start
    /// rather than at the first write. `create` writes the marker into an
    /// empty prefix; otherwise an unmarked prefix is refused.
    pub(super) fn open(spec: &BucketSpec, create: bool) -> Result<Bucket> {
        let (bucket, prefix) = BucketSpec::parse_url(&spec.url)?;
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&bucket);
        if let Some(e) = &spec.endpoint {
            b = b.with_endpoint(e);
        }
        if let Some(r) = &spec.region {
            b = b.with_region(r);
        }
        if let Some(a) = spec.allow_http {
            b = b.with_allow_http(a);
        }
        if let Some(c) = &spec.credentials {
            b = b
                .with_access_key_id(&c.access_key_id)
                .with_secret_access_key(c.secret_access_key.as_str());
            if let Some(t) = &c.session_token {
                b = b.with_token(t.as_str());
            }
        }
        // Bounded in time: a store that is down fails a call within about
        // half a minute (UNAVAILABLE) instead of the default three minutes.
        // No SHA-256 of each body for the request signature (SigV4's
        // UNSIGNED-PAYLOAD), unless AWS_UNSIGNED_PAYLOAD says otherwise:
        // measured, it was most of this node's CPU in a clone into
        // SeaweedFS (docs/BENCHMARKS.md), and it protects nothing a chunk
        // needs. A chunk is named by the SHA-256 of its bytes and re-hashed
        // on every read, so an object changed on the way in is caught and
        // quarantined like one changed at rest; over https TLS guards it.
        if std::env::var_os("AWS_UNSIGNED_PAYLOAD").is_none() {
            b = b.with_unsigned_payload(true);
        }
        // Set key by key: `with_client_options` would drop what the
        // environment set (AWS_ALLOW_HTTP is a client option).
        b = b
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                "5s",
            )
            .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), "60s");
        let retry = RetryConfig {
            max_retries: 3,
            retry_timeout: Duration::from_secs(20),
            ..Default::default()
        };
        let store = b
            .with_retry(retry)
            .build()
            .map_err(|e| Error::invalid(format!("chunk store {}: {e}", spec.url)))?;
        let url = format!(
            "s3://{bucket}{}{prefix}",
            if prefix.is_empty() { "" } else { "/" }
        );
        let me = Bucket {
            store: Arc::new(store),
            url,
            prefix,
        };
        me.check_marker(create)?;
        Ok(me)
    }

    fn key(&self, rel: &str) -> Key {
        if self.prefix.is_empty() {
            Key::from(rel)
        } else {
            Key::from(format!("{}/{rel}", self.prefix))
        }
    }

    fn chunk_key(&self, id: &ChunkId) -> Key {
        let hex = id.to_hex();
        self.key(&format!("chunks/{}/{hex}", &hex[..2]))
    }

    fn check_marker(&self, create: bool) -> Result<()> {
        let key = self.key(MARKER);
        let store = self.store.clone();
        let k = key.clone();
        let got = run(async move {
            match store.get(&k).await {
                Ok(r) => r.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .map_err(|e| self.error(e, &key))?;
        match got {
            Some(text) if text.starts_with(MARKER_TEXT.as_bytes()) => Ok(()),
            Some(_) => Err(Error::invalid(format!(
                "{}/{MARKER} is not a bitsync chunk store marker (layout 1)",
                self.url
            ))),
            None if create => {
                let store = self.store.clone();
                let k = key.clone();
                run(async move { store.put(&k, MARKER_TEXT.as_bytes().to_vec().into()).await })
                    .map_err(|e| self.error(e, &key))?;
                Ok(())
            }
            None => Err(Error::not_found(format!(
                "{} holds no bitsync chunk store (no {MARKER} object); create it with `bitsync init --chunks {}`",
                self.url, self.url
            ))),
        }
    }

    /// An object-store error as this crate's: named by bucket and key, of
    /// the kind that gives a peer the right status.
    fn error(&self, e: object_store::Error, key: &Key) -> Error {
        let kind = match &e {
            object_store::Error::NotFound { .. } => Kind::NotFound,
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => Kind::Auth,
            _ => classify(&chain(&e)),
        };
        let hint = match kind {
            Kind::Auth => " (the store refused this node's credentials)",
            Kind::Unavailable => " (the object store cannot be reached)",
            Kind::Exhausted => " (the object store is full or over its quota)",
            _ => "",
        };
        Error::new(
            kind,
            format!("object store {}, key {key}{hint}: {}", self.url, chain(&e)),
        )
    }
}

/// `e` and its sources, one line, each said once (the layers of an HTTP
/// error often repeat the one below them).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let part = c.to_string();
        if !s.contains(&part) {
            s.push_str(": ");
            s.push_str(&part);
        }
        cur = c.source();
    }
    s
}

/// The kind of a store error that `object_store` leaves generic, from what
/// its HTTP client and the store said: a connection that failed or a 5xx
/// that outlived the retries is UNAVAILABLE, a full store or quota
/// RESOURCE_EXHAUSTED.
fn classify(text: &str) -> Kind {
    let t = text.to_ascii_lowercase();
    let any = |words: &[&str]| words.iter().any(|w| t.contains(w));
    if any(&[
        "quota",
        "insufficient storage",
        "507",
        "no space",
        "entitytoolarge",
    ]) {
        Kind::Exhausted
    } else if any(&[
        "connect",
        "timed out",
        "timeout",
        "dns",
        "error sending request",
        "503",
        "502",
        "500 internal",
        "service unavailable",
        "slow down",
        "broken pipe",
        "reset by peer",
    ]) {
        Kind::Unavailable
    } else {
        Kind::Io
    }
}

fn stamp(meta: &ObjectMeta) -> Stamp {
    let tag = |s: &Option<String>| {
        s.as_deref().map_or(0, |t| {
            let h = Hash::of(t.as_bytes());
            u64::from_le_bytes(h.0[..8].try_into().expect("8 bytes"))
        })
    };
    Stamp {
        dev: OBJECT_DEV,
        ino: tag(&meta.e_tag),
        size: meta.size,
        mtime_ns: meta.last_modified.timestamp_nanos_opt().unwrap_or(0),
        ctime_ns: tag(&meta.version) as i64,
    }
}

impl Backend for Bucket {
    fn describe(&self) -> String {
        format!("object store {}", self.url)
    }

    fn url(&self) -> Option<&str> {
        Some(&self.url)
    }

    fn read_ahead(&self) -> usize {
        READ_AHEAD
    }

    /// No stamp: a PUT's answer lacks the Last-Modified time a stamp
    /// holds, and a HEAD per chunk to learn it would cost a round trip on
    /// every write. The first send or scrub pass records the check instead.
    fn place(&self, id: &ChunkId, data: &[u8]) -> Result<Option<Stamp>> {
        let key = self.chunk_key(id);
        let (store, k) = (self.store.clone(), key.clone());
        let body = data.to_vec();
        run(async move { store.put(&k, body.into()).await })
            .map(|_| None)
            .map_err(|e| self.error(e, &key))
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn fetch(&self, id: &ChunkId) -> Result<(Vec<u8>, Stamp)> {
        let key = self.chunk_key(id);
        let (store, k) = (self.store.clone(), key.clone());
        let got = run(async move {
            let r = store.get(&k).await?;
            if r.meta.size > MAX_CHUNK_BYTES as u64 {
                return Ok(Err(r.meta.size));
            }
            let meta = r.meta.clone();
            let bytes = r.bytes().await?;
            Ok(Ok((bytes.to_vec(), stamp(&meta))))
        })
        .map_err(|e| self.error(e, &key))?;
        got.map_err(|size| super::oversized(id, size))
    }

    fn stamp(&self, id: &ChunkId) -> Result<Option<Stamp>> {
        let key = self.chunk_key(id);
        let (store, k) = (self.store.clone(), key.clone());
        match run(async move { store.head(&k).await }) {
            Ok(m) => Ok(Some(stamp(&m))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(e, &key)),
        }
    }

    fn quarantine(&self, id: &ChunkId) -> Result<bool> {
        let from = self.chunk_key(id);
        let to = self.key(&format!("quarantine/{}", id.to_hex()));
        let (store, f, t) = (self.store.clone(), from.clone(), to);
        match run(async move {
            store.copy(&f, &t).await?;
            store.delete(&f).await
        }) {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.error(e, &from)),
        }
    }

    fn remove(&self, id: &ChunkId) -> Result<()> {
        let key = self.chunk_key(id);
        let (store, k) = (self.store.clone(), key.clone());
        match run(async move { store.delete(&k).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(e, &key)),
        }
    }
}

/// Run `f` on the object-store runtime and wait for it. Callable from any
/// thread that may block (not from inside an async task).
fn run<T: Send + 'static>(f: impl Future<Output = T> + Send + 'static) -> T {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let rt = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bitsync-objects")
            .enable_all()
            .build()
            .expect("starting the object-store runtime")
    });
    match futures::executor::block_on(rt.spawn(f)) {
        Ok(t) => t,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}
