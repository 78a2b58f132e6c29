//! A data dir and the node opened from it.
//!
//! ```text
//! <data-dir>/config.toml   settings (commented defaults written by init)
//!            node.key      RSA-3072 private key, PKCS#8 PEM or sealed (0600)
//!            node.mlkem    ML-KEM-768 key, PEM or sealed like node.key (0600)
//!            bitsync.db    SQLite database (+ -wal, -shm)
//!            chunks/       encrypted chunks by id, chunks/tmp/ for writes in progress
//!            quarantine/   chunks that failed their hash
//!            tor/          embedded Tor state, including the onion service key
//!            admin.sock    Admin gRPC socket while `bitsync serve` runs (0600)
//! ```
//!
//! `init` never leaves a half-made data dir: a new one is built beside its
//! final path and renamed into place; in an existing empty directory (as
//! systemd's StateDirectory creates) the database, which marks a finished
//! init, is written last.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::chunks::{Chunks, Location};
use crate::config::{Config, DEFAULT_CONFIG};
use crate::crypto::{ContentId, ItemKey, NodeId};
use crate::error::{Error, IoContext, Kind, Result};
use crate::identity::{Identity, KemKey};
use crate::keyring::Keyring;
use crate::metrics::Metrics;
use crate::store::Db;

/// How long a recorded hash check of an unchanged chunk file spares a
/// re-hash when the chunk is sent (7 days; the scrub renews checks daily).
pub(crate) const CHECK_TRUSTED_MS: i64 = 7 * 24 * 3600 * 1000;

#[derive(Debug, Clone)]
pub struct Paths {
    pub root: PathBuf,
}

impl Paths {
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub(crate) fn new(root: impl Into<PathBuf>) -> Paths {
        Paths { root: root.into() }
    }
    pub(crate) fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    pub fn key(&self) -> PathBuf {
        self.root.join("node.key")
    }
    /// The ML-KEM-768 key (FORMAT.md §1.4), beside `node.key`.
    pub fn kem_key(&self) -> PathBuf {
        self.root.join("node.mlkem")
    }
    pub fn db(&self) -> PathBuf {
        self.root.join("bitsync.db")
    }
    pub(crate) fn chunks(&self) -> PathBuf {
        self.root.join("chunks")
    }
    pub fn quarantine(&self) -> PathBuf {
        self.root.join("quarantine")
    }
    /// Where this data dir's chunks are, by its configuration.
    pub(crate) fn chunk_location(&self, config: &Config) -> Result<Location> {
        config
            .chunks
            .location(&self.root, self.chunks(), self.quarantine())
    }
    pub(crate) fn tor(&self) -> PathBuf {
        self.root.join("tor")
    }
    pub(crate) fn admin_socket(&self) -> PathBuf {
        self.root.join("admin.sock")
    }
    fn is_initialized(&self) -> bool {
        self.config().is_file() && self.key().is_file() && self.db().is_file()
    }
}

/// `$BITSYNC_DATA_DIR` is handled by clap; this is the fallback:
/// `$XDG_DATA_HOME/bitsync`, else `~/.local/share/bitsync`.
pub(crate) fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("bitsync");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(h) => PathBuf::from(h).join(".local/share/bitsync"),
        None => PathBuf::from(".bitsync"),
    }
}

pub enum InitOutcome {
    Created(NodeId),
    AlreadyInitialized(NodeId),
}

/// Create a data dir with a new identity. An existing, complete data dir is
/// left untouched (so `bitsync init && bitsync serve` can be run every time).
pub fn init(root: &Path, passphrase: Option<&str>) -> Result<InitOutcome> {
    init_with(root, passphrase, None)
}

/// [`init`], with the chunks in the object store at `chunks`
/// (`s3://bucket/prefix`) instead of `<data-dir>/chunks`. The store is
/// reached and marked as a chunk store before the data dir is made, so a
/// wrong URL, endpoint or credential fails here.
pub fn init_with(
    root: &Path,
    passphrase: Option<&str>,
    chunks: Option<&str>,
) -> Result<InitOutcome> {
    let paths = Paths::new(root);
    if paths.is_initialized() {
        let db = Db::open(&paths.db())?;
        let id = db
            .setting("node_id")?
            .ok_or_else(|| Error::integrity("database has no node id"))?;
        return Ok(InitOutcome::AlreadyInitialized(crate::crypto::Hash::parse(
            &id, "node id",
        )?));
    }
    let identity = Identity::generate()?;
    if root.exists() {
        let entries: Vec<_> = fs::read_dir(root)
            .ctx(format!("reading {}", root.display()))?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        if entries.iter().any(|n| !redoable(n)) {
            return Err(Error::exists(format!(
                "{} exists and is not a bitsync data dir; choose an empty or new directory",
                root.display()
            )));
        }
        // Temp files are named after the pid that wrote them: a dead
        // process's are never renamed into place, so they go.
        for n in entries.iter().filter(|n| is_stale_temp(n)) {
            let _ = fs::remove_file(root.join(n));
        }
        fill(&paths, &identity, passphrase, chunks)?;
    } else {
        let parent = root
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(parent).ctx(format!("creating {}", parent.display()))?;
        let name = root
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("bitsync");
        let tmp = parent.join(format!(".{name}.init-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let result = fs::create_dir(&tmp)
            .ctx(format!("creating {}", tmp.display()))
            .and_then(|_| fill(&Paths::new(&tmp), &identity, passphrase, chunks))
            .and_then(|_| {
                fs::rename(&tmp, root).ctx(format!("moving the new data dir to {}", root.display()))
            })
            .and_then(|_| crate::durable::sync_dir(parent));
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result?;
    }
    Ok(InitOutcome::Created(identity.id()))
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// What an interrupted [`fill`] may leave in an existing directory, all of
/// which a new `init` redoes.
fn redoable(name: &std::ffi::OsStr) -> bool {
    matches!(
        name.to_str(),
        Some(
            "config.toml"
                | "node.key"
                | "node.mlkem"
                | "chunks"
                | "quarantine"
                | ".bitsync.db.init"
                | ".bitsync.db.init-wal"
                | ".bitsync.db.init-shm"
                | ".bitsync.db.init-journal"
        )
    ) || is_stale_temp(name)
}

/// A temp file of [`crate::durable::write_atomic`] for a key or the config,
/// or of [`crate::durable::write_new`] for `node.mlkem`.
fn is_stale_temp(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|n| {
        n.starts_with(".node.key.tmp-")
            || n.starts_with(".node.mlkem.tmp-")
            || n.starts_with(".node.mlkem.new-")
            || n.starts_with(".config.toml.tmp-")
    })
}

fn fill(
    paths: &Paths,
    identity: &Identity,
    passphrase: Option<&str>,
    chunks: Option<&str>,
) -> Result<()> {
    let mut config = DEFAULT_CONFIG.to_string();
    if let Some(url) = chunks {
        crate::chunks::BucketSpec::parse_url(url)?;
        config.push_str(&format!("\n[chunks]\nurl = {}\n", toml_string(url)));
        let parsed = Config::parse(&config)?;
        Chunks::open(&paths.chunk_location(&parsed)?, true)?;
    }
    fs::set_permissions(&paths.root, fs::Permissions::from_mode(0o700))
        .ctx(format!("setting mode 0700 on {}", paths.root.display()))?;
    identity.save(&paths.key(), passphrase)?;
    KemKey::generate()?.save(&paths.kem_key(), passphrase)?;
    crate::durable::write_atomic(&paths.config(), config.as_bytes(), 0o600)?;
    for d in [paths.chunks(), paths.quarantine()] {
        fs::create_dir_all(&d).ctx(format!("creating {}", d.display()))?;
    }
    let tmp_db = paths.root.join(".bitsync.db.init");
    let _ = fs::remove_file(&tmp_db);
    drop(Db::create(&tmp_db, &identity.id())?);
    fs::rename(&tmp_db, paths.db()).ctx("moving the new database into place")?;
    crate::durable::sync_dir(&paths.root)
}

/// An opened data dir: configuration, identity, database and chunks.
///
/// Outside the crate the parts are read through methods, never replaced: a
/// `Node` is only valid as [`Node::open`] assembled it (the database belongs to
/// this identity, the chunk dir to this database).
pub struct Node {
    pub(crate) paths: Paths,
    pub(crate) config: Config,
    pub(crate) identity: std::sync::Arc<Identity>,
    pub(crate) db: Db,
    pub(crate) chunks: Chunks,
    /// What this node has done since it was opened, for the metrics listener.
    pub(crate) metrics: std::sync::Arc<Metrics>,
    /// Link keys (format 2): `L(self→self)` in memory, the rest via `db`;
    /// and the node's ML-KEM-768 key.
    pub(crate) keyring: Keyring,
    /// The encapsulation key with this node's signature, made on first use.
    signed_kem_key: std::sync::OnceLock<crate::proto::SignedKemKey>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node({})", self.paths.root.display())
    }
}

impl Node {
    /// Open an initialized data dir; `passphrase` is asked only for a sealed key.
    pub fn open(root: &Path, passphrase: &dyn Fn() -> Result<Zeroizing<String>>) -> Result<Node> {
        let paths = Paths::new(root);
        match fs::metadata(root) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::not_found(format!(
                    "no bitsync data dir at {}: run `bitsync init` first (or pass --data-dir)",
                    root.display()
                )))
            }
            Err(e) => return Err(Error::from_io(e, format!("data dir {}", root.display()))),
            Ok(_) => {}
        }
        if let Err(e) = fs::read_dir(root) {
            return Err(Error::from_io(
                e,
                format!("data dir {} is not readable", root.display()),
            ));
        }
        if !paths.is_initialized() {
            return Err(Error::not_found(format!(
                "{} is not an initialized bitsync data dir: run `bitsync init --data-dir {}`",
                root.display(),
                root.display()
            )));
        }
        warn_if_writable_by_others(&paths);
        let config = Config::load(&paths.config())?;
        let ask = ask_once(passphrase);
        let identity = std::sync::Arc::new(Identity::load(&paths.key(), &ask)?);
        let kem = std::sync::Arc::new(load_or_make_kem(&paths, &ask)?);
        let db = Db::open(&paths.db())?;
        let stored = db.setting("node_id")?.unwrap_or_default();
        if stored != identity.id().to_hex() {
            return Err(Error::integrity(format!(
                "node key {} does not belong to database {} (key is {}, database says {})",
                paths.key().display(),
                paths.db().display(),
                identity.id(),
                stored
            )));
        }
        let chunks = Chunks::open(&paths.chunk_location(&config)?, false)?;
        let keyring = Keyring::open(&identity, kem, &db)?;
        keyring.migrate_own(&identity, &db)?;
        Ok(Node {
            paths,
            config,
            identity,
            db,
            chunks,
            metrics: Default::default(),
            keyring,
            signed_kem_key: Default::default(),
        })
    }

    /// This node's ML-KEM-768 encapsulation key, signed by its node key, as
    /// Hello and GetManifests carry it (PROTOCOL.md §4.4b).
    pub fn signed_kem_key(&self) -> crate::proto::SignedKemKey {
        self.signed_kem_key
            .get_or_init(|| {
                let kem = self.keyring.kem();
                crate::proto::SignedKemKey {
                    encapsulation_key: kem.encapsulation_key().to_vec(),
                    signature: self.identity.sign_kem_key(kem),
                }
            })
            .clone()
    }

    /// Check and pin the ML-KEM key `peer` (public key `spki`) presented;
    /// once pinned, its link key is made hybrid (a new `BLE3` generation
    /// replaces a `BLE2` one). A bad key or signature is `Integrity`;
    /// [`KemPin::Differs`] is for the caller to refuse.
    ///
    /// [`KemPin::Differs`]: crate::store::KemPin::Differs
    pub fn pin_kem_key(
        &self,
        peer: &NodeId,
        spki: &[u8],
        offered: &crate::proto::SignedKemKey,
    ) -> Result<crate::store::KemPin> {
        use crate::store::KemPin;
        let public = crate::identity::public_key_from_spki(spki)?;
        if crate::identity::node_id_of(spki) != *peer {
            return Err(Error::integrity(
                "the key checked is not the peer's node key",
            ));
        }
        crate::crypto::kem::verify_key(
            peer,
            &public,
            &offered.encapsulation_key,
            &offered.signature,
        )?;
        let pin = self.db.pin_peer_kem_key(peer, &offered.encapsulation_key)?;
        match pin {
            KemPin::New | KemPin::Same => {
                if pin == KemPin::New {
                    tracing::info!(peer = %peer.short(), "pinned the peer's ML-KEM-768 key");
                }
                // A blind peer gets no link key (PROTOCOL.md §2.1).
                if self.db.is_keyed(peer)? {
                    self.keyring
                        .ensure_link(&self.identity, &self.db, peer, spki)?;
                }
            }
            KemPin::Differs => tracing::warn!(
                peer = %peer.short(),
                "refused an ML-KEM-768 key that differs from the one pinned for the peer"
            ),
            KemPin::UnknownPeer => {}
        }
        Ok(pin)
    }

    /// The envelope of an item key for this node itself (FORMAT.md §4.3).
    pub(crate) fn wrap_own(&self, content_id: &ContentId, key: &ItemKey) -> Result<Vec<u8>> {
        let me = self.id();
        self.keyring.wrap_for(
            &self.identity,
            &self.db,
            &me,
            self.identity.public(),
            content_id,
            key,
        )
    }

    /// The envelope of an item key for the node whose public key is `spki`.
    pub(crate) fn wrap_for_spki(
        &self,
        spki: &[u8],
        content_id: &ContentId,
        key: &ItemKey,
    ) -> Result<Vec<u8>> {
        self.keyring
            .wrap_for_spki(&self.identity, &self.db, spki, content_id, key)
    }

    /// The item key in an envelope addressed to this node, either format
    /// (`Integrity` also when it names a link key not received).
    pub fn open_envelope(&self, content_id: &ContentId, envelope: &[u8]) -> Result<ItemKey> {
        self.keyring
            .open_item(&self.identity, &self.db, content_id, envelope)
    }

    /// [`Node::open_envelope`] for many items, each link key unsealed once.
    pub(crate) fn opener(&self) -> crate::keyring::Opener<'_> {
        self.keyring.opener(&self.identity, &self.db)
    }

    /// `bitsync peer rekey`: rotate `L(self→peer)`. The peer must be trusted,
    /// keyed (a blind peer has no link key, and gets none: PROTOCOL.md
    /// §2.1), and its public key known (it has called this node at least once).
    pub fn rotate_link(&self, peer: &NodeId) -> Result<u32> {
        let p = self
            .db
            .peer(peer)?
            .filter(|p| p.state == crate::store::PeerState::Trusted)
            .ok_or_else(|| Error::not_found(format!("node {peer} is not a trusted peer")))?;
        if p.level == crate::store::Level::Blind {
            return Err(Error::invalid(format!(
                "node {peer} is a blind peer: no link key is made for it \
                 (`bitsync peer set-level {peer} keyed` first, if it may read)"
            )));
        }
        let spki = p.public_key.ok_or_else(|| {
            Error::not_found(format!(
                "node {peer} has not called this node yet, so it has no link key to rotate"
            ))
        })?;
        self.keyring.rotate(&self.identity, &self.db, peer, &spki)
    }

    /// Keep the link envelopes a peer (public key `sender_spki`) made for
    /// this node, as `GetLinkEnvelopes` returns them; how many were new.
    pub fn receive_link_envelopes(
        &self,
        sender_spki: &[u8],
        envelopes: &[Vec<u8>],
    ) -> Result<usize> {
        self.keyring
            .receive(&self.identity, &self.db, sender_spki, envelopes)
    }

    pub fn id(&self) -> NodeId {
        self.identity.id()
    }

    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    pub fn identity(&self) -> &std::sync::Arc<Identity> {
        &self.identity
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn chunks(&self) -> &Chunks {
        &self.chunks
    }

    /// Read a present chunk, re-checking its hash. A chunk that fails is
    /// quarantined and forgotten, so it is no longer present (a sync fetches it again).
    pub(crate) fn read_chunk(&self, id: &crate::crypto::ChunkId) -> Result<Vec<u8>> {
        self.chunks.read(id).map_err(|e| self.chunk_failed(id, e))
    }

    /// Read a present chunk to send to a peer. Its hash is checked unless a
    /// check of this very file is on record (same [`Stamp`]: device, inode,
    /// size, mtime and ctime) from the last [`CHECK_TRUSTED_MS`]; the
    /// receiver always hashes what it gets, and the scrub re-checks every
    /// chunk in the background (docs/PROTOCOL.md, StreamChunks). Failures as
    /// [`read_chunk`](Self::read_chunk).
    ///
    /// [`Stamp`]: crate::chunks::Stamp
    pub(crate) fn read_chunk_to_send(&self, id: &crate::crypto::ChunkId) -> Result<Vec<u8>> {
        let (data, stamp) = self
            .chunks
            .read_unchecked(id)
            .map_err(|e| self.chunk_failed(id, e))?;
        let recent = crate::manifest::now_ms() - CHECK_TRUSTED_MS;
        match self.db.chunk_check(id) {
            Ok(Some((s, at))) if s == stamp && at >= recent => Ok(data),
            _ => {
                self.chunks
                    .check(id, &data)
                    .map_err(|e| self.chunk_failed(id, e))?;
                Ok(data)
            }
        }
    }

    /// The bookkeeping for a chunk read (or check) that failed with `e`: a
    /// chunk whose file is gone or failed its hash (and so was quarantined)
    /// is forgotten, so it is no longer present. Returns the error to report.
    pub(crate) fn chunk_failed(&self, id: &crate::crypto::ChunkId, e: Error) -> Error {
        if e.kind() == Kind::Integrity || e.kind() == Kind::NotFound {
            if let Err(db) = self.db.forget_chunk(id) {
                return db;
            }
        }
        e
    }

    /// The name peers see: the configured one, else the first 12 hex chars of the id.
    pub(crate) fn name(&self) -> String {
        if self.config.name.is_empty() {
            self.id().short()
        } else {
            self.config.name.clone()
        }
    }
}

/// `passphrase`, asked at most once however many sealed files are opened.
fn ask_once(
    passphrase: &dyn Fn() -> Result<Zeroizing<String>>,
) -> impl Fn() -> Result<Zeroizing<String>> + '_ {
    let asked = std::cell::RefCell::new(None::<Zeroizing<String>>);
    move || {
        if let Some(p) = asked.borrow().as_ref() {
            return Ok(p.clone());
        }
        let p = passphrase()?;
        *asked.borrow_mut() = Some(p.clone());
        Ok(p)
    }
}

/// `node.mlkem`, made on the first open of a data dir older than it (sealed
/// exactly when `node.key` is, under the same passphrase). Made with
/// [`crate::durable::write_new`], so two processes opening one data dir at
/// once end up with the same key.
fn load_or_make_kem(
    paths: &Paths,
    passphrase: &dyn Fn() -> Result<Zeroizing<String>>,
) -> Result<KemKey> {
    let path = paths.kem_key();
    if !path.exists() {
        let key_text = Zeroizing::new(
            fs::read_to_string(paths.key())
                .ctx(format!("reading node key {}", paths.key().display()))?,
        );
        let pass = match crate::identity::is_sealed_pem(&key_text) {
            true => Some(passphrase()?),
            false => None,
        };
        let new = KemKey::generate()?;
        let bytes = new.file_bytes(pass.as_ref().map(|p| p.as_str()));
        if crate::durable::write_new(&path, &bytes, 0o600)? {
            tracing::info!(path = %path.display(), "made this node's ML-KEM-768 key");
            return Ok(new);
        }
    }
    KemKey::load(&path, passphrase)
}

/// A passphrase source for nodes whose key is not sealed: asking is a bug.
pub fn no_passphrase() -> Result<Zeroizing<String>> {
    Err(Error::new(
        Kind::Auth,
        "the node key is sealed: set BITSYNC_PASSPHRASE or pass --passphrase-file",
    ))
}

/// Warn (on stderr, through the log) when the data dir or the database can be
/// written by the group or by everyone: whoever can write there can replace
/// the database or the chunks (and so what this node serves and trusts), or
/// the key. Only a warning, because a shared group may be deliberate; init
/// creates both private (0700 / 0600).
fn warn_if_writable_by_others(paths: &Paths) {
    for (what, path) in [("data dir", paths.root.clone()), ("database", paths.db())] {
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        let mode = meta.permissions().mode();
        if mode & 0o022 != 0 {
            let who = if mode & 0o002 != 0 {
                "everyone"
            } else {
                "its group"
            };
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", mode & 0o7777),
                "the {what} is writable by {who}: anyone who can write it can change what this node stores and trusts; \
                 run `chmod go-w {}`",
                path.display()
            );
        }
    }
}
