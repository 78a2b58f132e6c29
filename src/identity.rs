//! A node's identity: one RSA-3072 key pair, named by the SHA-256 of its public
//! key (SubjectPublicKeyInfo DER). The same key signs manifests, unwraps
//! envelopes and authenticates the node in TLS, so a node id is all a peer
//! needs to pin.
//!
//! On disk the private key is PKCS#8 PEM (mode 0600), or, when sealed with a
//! passphrase, a `BITSYNC SEALED KEY` PEM block holding the PKCS#8 DER sealed
//! by [`crypto::seal`](crate::crypto::seal).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::Engine;
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::{RsaPrivateKey, RsaPublicKey};
use zeroize::Zeroizing;

use crate::crypto::{self, NodeId};
use crate::error::{Error, IoContext, Result};

pub const KEY_BITS: usize = 3072;
const SEALED_LABEL: &str = "BITSYNC SEALED KEY";

pub struct Identity {
    private: RsaPrivateKey,
    public: RsaPublicKey,
    spki: Vec<u8>,
    id: NodeId,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.id.short())
    }
}

/// The node id of a public key given as SubjectPublicKeyInfo DER.
pub fn node_id_of(spki_der: &[u8]) -> NodeId {
    crypto::Hash::of(spki_der)
}

/// Parse a peer's SubjectPublicKeyInfo DER as an RSA public key.
pub fn public_key_from_spki(der: &[u8]) -> Result<RsaPublicKey> {
    RsaPublicKey::from_public_key_der(der).map_err(|e| Error::invalid(format!("not an RSA public key: {e}")))
}

impl Identity {
    pub fn generate() -> Result<Identity> {
        let private = RsaPrivateKey::new(&mut rand::rngs::OsRng, KEY_BITS)
            .map_err(|e| Error::io(format!("generating an RSA-{KEY_BITS} key: {e}")))?;
        Identity::from_private(private)
    }

    fn from_private(private: RsaPrivateKey) -> Result<Identity> {
        let public = private.to_public_key();
        let spki = public
            .to_public_key_der()
            .map_err(|e| Error::io(format!("encoding public key: {e}")))?
            .as_bytes()
            .to_vec();
        let id = node_id_of(&spki);
        Ok(Identity { private, public, spki, id })
    }

    pub fn id(&self) -> NodeId {
        self.id
    }
    pub fn public(&self) -> &RsaPublicKey {
        &self.public
    }
    pub fn private(&self) -> &RsaPrivateKey {
        &self.private
    }
    /// SubjectPublicKeyInfo DER of the public key.
    pub fn spki(&self) -> &[u8] {
        &self.spki
    }

    /// PKCS#8 DER of the private key, for the TLS stack. Zeroed when dropped.
    pub fn pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        let doc = self.private.to_pkcs8_der().expect("an RSA key always encodes");
        Zeroizing::new(doc.as_bytes().to_vec())
    }

    /// The file contents for this key: PKCS#8 PEM, or sealed under `passphrase`.
    pub fn key_file_bytes(&self, passphrase: Option<&str>) -> Zeroizing<Vec<u8>> {
        match passphrase {
            None => {
                let pem = self.private.to_pkcs8_pem(LineEnding::LF).expect("an RSA key always encodes");
                Zeroizing::new(pem.as_bytes().to_vec())
            }
            Some(p) => {
                let sealed = crypto::seal(p, &self.pkcs8_der());
                let b64 = base64::engine::general_purpose::STANDARD.encode(sealed);
                let mut out = format!("-----BEGIN {SEALED_LABEL}-----\n");
                for line in b64.as_bytes().chunks(64) {
                    out.push_str(std::str::from_utf8(line).unwrap());
                    out.push('\n');
                }
                out.push_str(&format!("-----END {SEALED_LABEL}-----\n"));
                Zeroizing::new(out.into_bytes())
            }
        }
    }

    /// Write the key file atomically with mode 0600 (temp file, fsync, rename).
    pub fn save(&self, path: &Path, passphrase: Option<&str>) -> Result<()> {
        let bytes = self.key_file_bytes(passphrase);
        write_private_file(path, &bytes)
    }

    /// Whether the key file at `path` needs a passphrase.
    pub fn is_sealed_file(path: &Path) -> Result<bool> {
        let text = fs::read_to_string(path).ctx(format!("reading node key {}", path.display()))?;
        Ok(text.contains(SEALED_LABEL))
    }

    /// Load the key at `path`; `passphrase` is asked for only if the key is sealed.
    pub fn load(path: &Path, passphrase: &dyn Fn() -> Result<Zeroizing<String>>) -> Result<Identity> {
        let meta = fs::metadata(path).ctx(format!("node key {}", path.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "node key is readable by group or others; fixing mode to 0600");
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))
                .ctx(format!("setting mode 0600 on {}", path.display()))?;
        }
        let text = Zeroizing::new(fs::read_to_string(path).ctx(format!("reading node key {}", path.display()))?);
        let private = if text.contains(SEALED_LABEL) {
            let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
            let sealed = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| Error::integrity(format!("node key {} is not valid base64", path.display())))?;
            let pass = passphrase()?;
            let der = crypto::unseal(&pass, &sealed)
                .map_err(|e| e.context(format!("opening sealed node key {}", path.display())))?;
            RsaPrivateKey::from_pkcs8_der(&der)
        } else {
            RsaPrivateKey::from_pkcs8_pem(&text)
        }
        .map_err(|e| Error::integrity(format!("node key {} is not a PKCS#8 RSA key: {e}", path.display())))?;
        Identity::from_private(private)
    }

    /// The public key as PEM, for operators and tests.
    pub fn public_pem(&self) -> String {
        self.public.to_public_key_pem(LineEnding::LF).expect("an RSA key always encodes")
    }
}

/// Atomically write a file only the owner may read.
pub fn write_private_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("key")));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .ctx(format!("creating {}", tmp.display()))?;
        f.write_all(bytes).ctx(format!("writing {}", tmp.display()))?;
        f.sync_all().ctx(format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, path).ctx(format!("renaming {} into place", tmp.display()))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// fsync a directory so a rename inside it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir).and_then(|d| d.sync_all()).ctx(format!("syncing directory {}", dir.display()))
}
