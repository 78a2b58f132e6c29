//! An S3-compatible bucket as a place to keep named objects: the client the
//! chunk store (`chunks::bucket`) and backup repositories in an object store
//! (`backup::repo::remote`) share.
//!
//! Apache Arrow's `object_store` does the signing, retries, multipart and
//! HTTP; this module adds what both callers need the same way: the settings
//! (config values over the standard AWS environment), bounded time per call,
//! a prefix every key lives under, size limits on what is read, and errors
//! that name the bucket and key and carry the kind a gRPC status or exit
//! code is made from (unreachable: UNAVAILABLE; full: RESOURCE_EXHAUSTED;
//! refused credentials: auth). Credentials never appear in an error, a log
//! line or a `Debug` output.
//!
//! `object_store` is async; its callers here are blocking threads (the data
//! path's workers, `spawn_blocking`, the offline commands). Each call is run
//! on one process-wide runtime kept for object-store I/O and waited for, so
//! the callers' threads never need a runtime of their own.

use std::fmt;
use std::future::Future;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as Key;
use object_store::{ClientConfigKey, ObjectStore, ObjectStoreExt, RetryConfig, WriteMultipart};
use zeroize::Zeroizing;

use crate::error::{Error, IoContext, Kind, Result};

pub(crate) use object_store::ObjectMeta;

/// Files larger than this are uploaded in parts of this size (S3 takes at
/// most 5 GiB in one PUT; parts keep the memory of an upload bounded).
const PART_BYTES: usize = 16 << 20;

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
    /// A spec for `url` with everything else from the AWS environment.
    pub fn from_env(url: &str) -> BucketSpec {
        BucketSpec {
            url: url.to_string(),
            ..Default::default()
        }
    }

    /// The bucket and the prefix (no leading or trailing `/`) of [`url`](Self::url).
    pub fn parse_url(url: &str) -> Result<(String, String)> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            Error::invalid(format!(
                "object store {url:?}: an object store is given as s3://bucket or s3://bucket/prefix"
            ))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.".contains(c);
        if bucket.len() < 3 || bucket.len() > 63 || !bucket.chars().all(valid) {
            return Err(Error::invalid(format!(
                "object store {url:?}: {bucket:?} is not an S3 bucket name (3 to 63 of a-z, 0-9, '-', '.')"
            )));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
            return Err(Error::invalid(format!(
                "object store {url:?}: the prefix has an empty, '.' or '..' part"
            )));
        }
        Ok((bucket.to_string(), prefix.to_string()))
    }
}

/// One bucket and prefix; keys given to its methods are relative to the prefix.
#[derive(Clone)]
pub(crate) struct Objects {
    store: Arc<dyn ObjectStore>,
    url: String,
    prefix: String,
}

impl fmt::Debug for Objects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Objects({})", self.url)
    }
}

impl Objects {
    /// A client for the bucket of `spec`. Makes no request: the caller's
    /// first read (a marker) is what reaches the store.
    pub(crate) fn new(spec: &BucketSpec) -> Result<Objects> {
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
        // No SHA-256 of each body for the request signature (SigV4's
        // UNSIGNED-PAYLOAD), unless AWS_UNSIGNED_PAYLOAD says otherwise:
        // measured, it was most of this node's CPU in a clone into
        // SeaweedFS (docs/BENCHMARKS.md), and it protects nothing bitsync
        // needs. What is stored is named or listed by its SHA-256 and
        // re-hashed on every read; over https TLS guards it.
        if std::env::var_os("AWS_UNSIGNED_PAYLOAD").is_none() {
            b = b.with_unsigned_payload(true);
        }
        // Bounded in time: a store that is down fails a call within about
        // half a minute (UNAVAILABLE) instead of the default three minutes.
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
            .map_err(|e| Error::invalid(format!("object store {}: {e}", spec.url)))?;
        let url = format!(
            "s3://{bucket}{}{prefix}",
            if prefix.is_empty() { "" } else { "/" }
        );
        Ok(Objects {
            store: Arc::new(store),
            url,
            prefix,
        })
    }

    /// `s3://bucket/prefix`, without credentials.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, rel: &str) -> Key {
        if self.prefix.is_empty() {
            Key::from(rel)
        } else {
            Key::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// The object at `rel` and its metadata, refused unread if larger than
    /// `max` bytes (an Integrity error); `None` if there is none.
    pub(crate) fn get(&self, rel: &str, max: u64) -> Result<Option<(Vec<u8>, ObjectMeta)>> {
        let key = self.key(rel);
        let (store, k) = (self.store.clone(), key.clone());
        let got = run(async move {
            let r = match store.get(&k).await {
                Ok(r) => r,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            if r.meta.size > max {
                return Ok(Some(Err(r.meta.size)));
            }
            let meta = r.meta.clone();
            Ok(Some(Ok((r.bytes().await?.to_vec(), meta))))
        })
        .map_err(|e| self.error(e, &key))?;
        match got {
            None => Ok(None),
            Some(Ok(v)) => Ok(Some(v)),
            Some(Err(size)) => Err(self.too_big(&key, size, max)),
        }
    }

    /// The object at `rel` streamed into the new file `dest` (mode 0600,
    /// synced), refused unread if larger than `max`. Returns its size.
    pub(crate) fn get_to_file(&self, rel: &str, dest: &Path, max: u64) -> Result<u64> {
        use std::os::unix::fs::OpenOptionsExt;
        let key = self.key(rel);
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .ctx(format!("creating {}", dest.display()))?;
        let (store, k) = (self.store.clone(), key.clone());
        let r = run(async move { store.get(&k).await }).map_err(|e| self.error(e, &key))?;
        if r.meta.size > max {
            return Err(self.too_big(&key, r.meta.size, max));
        }
        // Piece by piece: each is awaited on the runtime, written here.
        let mut stream = r.into_stream();
        let mut n = 0u64;
        loop {
            let (piece, back) = run(async move {
                use futures::StreamExt;
                (stream.next().await, stream)
            });
            stream = back;
            let Some(piece) = piece else { break };
            let piece = piece.map_err(|e| self.error(e, &key))?;
            out.write_all(&piece)
                .ctx(format!("writing {}", dest.display()))?;
            n += piece.len() as u64;
        }
        out.sync_all().ctx(format!("syncing {}", dest.display()))?;
        Ok(n)
    }

    /// The metadata of the object at `rel`; `None` if there is none.
    pub(crate) fn head(&self, rel: &str) -> Result<Option<ObjectMeta>> {
        let key = self.key(rel);
        let (store, k) = (self.store.clone(), key.clone());
        match run(async move { store.head(&k).await }) {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(e, &key)),
        }
    }

    /// Store `data` at `rel` in one PUT: visible whole or not at all, and
    /// durable once this returns.
    pub(crate) fn put(&self, rel: &str, data: Vec<u8>) -> Result<()> {
        let key = self.key(rel);
        let (store, k) = (self.store.clone(), key.clone());
        run(async move { store.put(&k, data.into()).await })
            .map(|_| ())
            .map_err(|e| self.error(e, &key))
    }

    /// Store the file at `src` at `rel`; past [`PART_BYTES`] as a multipart
    /// upload, which becomes visible whole when it completes (an upload
    /// that fails is aborted).
    pub(crate) fn put_file(&self, rel: &str, src: &Path) -> Result<()> {
        let mut f = std::fs::File::open(src).ctx(format!("opening {}", src.display()))?;
        let len = f.metadata().ctx(format!("{}", src.display()))?.len();
        if len <= PART_BYTES as u64 {
            let mut data = Vec::with_capacity(len as usize);
            f.read_to_end(&mut data)
                .ctx(format!("reading {}", src.display()))?;
            return self.put(rel, data);
        }
        let key = self.key(rel);
        let (store, k) = (self.store.clone(), key.clone());
        let upload =
            run(async move { store.put_multipart(&k).await }).map_err(|e| self.error(e, &key))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut buf = vec![0u8; PART_BYTES];
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    let _ = run(async move { w.abort().await });
                    return Err(Error::from_io(e, format!("reading {}", src.display())));
                }
            };
            // `write` starts part uploads as tasks: it must run on the
            // runtime. At most two parts in flight: memory stays at a few parts.
            let piece = buf[..n].to_vec();
            let (ready, back) = run(async move {
                w.write(&piece);
                let r = w.wait_for_capacity(2).await;
                (r, w)
            });
            w = back;
            if let Err(e) = ready {
                let _ = run(async move { w.abort().await });
                return Err(self.error(e, &key));
            }
        }
        run(async move { w.finish().await })
            .map(|_| ())
            .map_err(|e| self.error(e, &key))
    }

    /// Every object under `rel` + `/` (the whole prefix for `""`), keys
    /// relative to the prefix.
    pub(crate) fn list(&self, rel: &str) -> Result<Vec<(String, ObjectMeta)>> {
        let key = if rel.is_empty() {
            (!self.prefix.is_empty()).then(|| Key::from(self.prefix.as_str()))
        } else {
            Some(self.key(rel))
        };
        let store = self.store.clone();
        let k = key.clone();
        let metas = run(async move {
            use futures::TryStreamExt;
            store.list(k.as_ref()).try_collect::<Vec<_>>().await
        })
        .map_err(|e| self.error(e, &key.clone().unwrap_or_default()))?;
        let skip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        Ok(metas
            .into_iter()
            .map(|m| (m.location.as_ref()[skip..].to_string(), m))
            .collect())
    }

    /// Copy the object at `from` to `to` inside the store; `false` if there
    /// was none.
    pub(crate) fn copy(&self, from: &str, to: &str) -> Result<bool> {
        let (f, t) = (self.key(from), self.key(to));
        let (store, fk) = (self.store.clone(), f.clone());
        match run(async move { store.copy(&fk, &t).await }) {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.error(e, &f)),
        }
    }

    /// Delete the object at `rel` (nothing to do if there is none).
    pub(crate) fn delete(&self, rel: &str) -> Result<()> {
        let key = self.key(rel);
        let (store, k) = (self.store.clone(), key.clone());
        match run(async move { store.delete(&k).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(e, &key)),
        }
    }

    /// An object larger than its caller allows.
    fn too_big(&self, key: &Key, size: u64, max: u64) -> Error {
        Error::integrity(format!(
            "object store {}, key {key}: {size} bytes, more than the {max} it may be",
            self.url
        ))
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
