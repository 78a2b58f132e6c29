//! A node's identity: one RSA-3072 key pair, named by the SHA-256 of its public
//! key (SubjectPublicKeyInfo DER). The same key signs manifests, unwraps
//! envelopes and authenticates the node in TLS, so a node id is all a peer
//! needs to pin.
//!
//! On disk the private key is PKCS#8 PEM (mode 0600), or, when sealed with a
//! passphrase, a `BITSYNC SEALED KEY` PEM block holding the PKCS#8 DER sealed
//! by [`crate::crypto::seal`].
//!
//! Private-key operations (unwrapping envelopes, signing manifests) run on
//! aws-lc, whose RSA is constant-time; the `rsa` crate is used only for
//! public-key work (see the note in [`crate::crypto`]).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::rsa::{
    KeySize, OaepPrivateDecryptingKey, PrivateDecryptingKey, OAEP_SHA256_MGF1SHA256,
};
use aws_lc_rs::signature::{RsaKeyPair, RSA_PSS_SHA256};
use base64::Engine;
use rsa::pkcs8::{DecodePublicKey, EncodePublicKey, LineEnding};
use rsa::RsaPublicKey;
use zeroize::Zeroizing;

use crate::crypto::{self, ItemKey, NodeId};
use crate::error::{Error, IoContext, Result};

mod kem;
pub use kem::KemKey;

const SEALED_LABEL: &str = "BITSYNC SEALED KEY";
const KEY_LABEL: &str = "PRIVATE KEY";

pub struct Identity {
    pkcs8: Zeroizing<Vec<u8>>,
    decrypting: OaepPrivateDecryptingKey,
    signing: RsaKeyPair,
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
pub(crate) fn node_id_of(spki_der: &[u8]) -> NodeId {
    crypto::Hash::of(spki_der)
}

/// Parse a peer's SubjectPublicKeyInfo DER as an RSA public key.
pub fn public_key_from_spki(der: &[u8]) -> Result<RsaPublicKey> {
    RsaPublicKey::from_public_key_der(der)
        .map_err(|e| Error::invalid(format!("not an RSA public key: {e}")))
}

impl Identity {
    /// A new RSA-3072 key pair.
    pub(crate) fn generate() -> Result<Identity> {
        let key = PrivateDecryptingKey::generate(KeySize::Rsa3072)
            .map_err(|_| Error::io("generating an RSA-3072 key failed"))?;
        let der = AsDer::<Pkcs8V1Der>::as_der(&key)
            .map_err(|_| Error::io("encoding the new key failed"))?;
        Identity::from_pkcs8(Zeroizing::new(der.as_ref().to_vec()))
    }

    fn from_pkcs8(pkcs8: Zeroizing<Vec<u8>>) -> Result<Identity> {
        let bad =
            |what: &str| Error::integrity(format!("node key is not a usable RSA key ({what})"));
        let key = PrivateDecryptingKey::from_pkcs8(&pkcs8).map_err(|_| bad("PKCS#8 decode"))?;
        if key.key_size_bits() < 2048 {
            return Err(bad("shorter than 2048 bits"));
        }
        let decrypting = OaepPrivateDecryptingKey::new(key).map_err(|_| bad("OAEP"))?;
        let signing = RsaKeyPair::from_pkcs8(&pkcs8).map_err(|_| bad("signing"))?;
        let public = rsa::pkcs1::DecodeRsaPublicKey::from_pkcs1_der(
            aws_lc_rs::signature::KeyPair::public_key(&signing).as_ref(),
        )
        .map_err(|_| bad("public key"))?;
        let spki = RsaPublicKey::to_public_key_der(&public)
            .map_err(|e| Error::io(format!("encoding public key: {e}")))?
            .as_bytes()
            .to_vec();
        let id = node_id_of(&spki);
        Ok(Identity {
            pkcs8,
            decrypting,
            signing,
            public,
            spki,
            id,
        })
    }

    /// Unwrap an envelope addressed to this node (RSA-OAEP-SHA256, constant-time).
    pub fn unwrap_key(&self, wrapped: &[u8]) -> Result<ItemKey> {
        ItemKey::from_bytes(&self.unwrap_secret(wrapped)?)
    }

    /// RSA-OAEP-SHA256 decryption of anything wrapped to this node (an
    /// envelope, a link envelope's secret), constant-time.
    pub(crate) fn unwrap_secret(&self, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let mut buf = Zeroizing::new(vec![0u8; self.decrypting.min_output_size()]);
        let n = self
            .decrypting
            .decrypt(&OAEP_SHA256_MGF1SHA256, wrapped, &mut buf, None)
            .map_err(|_| Error::integrity("envelope does not unwrap with this node's key"))?
            .len();
        buf.truncate(n);
        Ok(buf)
    }

    /// RSA-PSS-SHA256 (salt 32 bytes) over [`crypto::signed_message`].
    pub(crate) fn sign_manifest(&self, body: &[u8]) -> Vec<u8> {
        self.sign_pss(&crypto::signed_message(body))
    }

    /// RSA-PSS-SHA256 (salt 32 bytes) over a domain-separated message the
    /// caller built (a manifest's, a link envelope's).
    pub(crate) fn sign_pss(&self, message: &[u8]) -> Vec<u8> {
        let mut sig = vec![0u8; self.signing.public_modulus_len()];
        self.signing
            .sign(
                &RSA_PSS_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                message,
                &mut sig,
            )
            .expect("RSA signing with a valid key cannot fail");
        sig
    }

    pub(crate) fn id(&self) -> NodeId {
        self.id
    }
    pub fn public(&self) -> &RsaPublicKey {
        &self.public
    }
    /// SubjectPublicKeyInfo DER of the public key.
    pub fn spki(&self) -> &[u8] {
        &self.spki
    }

    /// PKCS#8 DER of the private key, for the TLS stack. Zeroed when dropped.
    pub(crate) fn pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        self.pkcs8.clone()
    }

    /// The file contents for this key: PKCS#8 PEM, or sealed under `passphrase`.
    pub(crate) fn key_file_bytes(&self, passphrase: Option<&str>) -> Zeroizing<Vec<u8>> {
        match passphrase {
            None => pem_encode(KEY_LABEL, &self.pkcs8),
            Some(p) => pem_encode(SEALED_LABEL, &crypto::seal(p, &self.pkcs8)),
        }
    }

    /// Write the key file atomically with mode 0600 (temp file, fsync, rename).
    pub(crate) fn save(&self, path: &Path, passphrase: Option<&str>) -> Result<()> {
        let bytes = self.key_file_bytes(passphrase);
        crate::durable::write_atomic(path, &bytes, 0o600)
    }

    /// Load the key at `path`; `passphrase` is asked for only if the key is sealed.
    pub(crate) fn load(
        path: &Path,
        passphrase: &dyn Fn() -> Result<Zeroizing<String>>,
    ) -> Result<Identity> {
        let meta = fs::metadata(path).ctx(format!("node key {}", path.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "node key is readable by group or others; fixing mode to 0600");
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))
                .ctx(format!("setting mode 0600 on {}", path.display()))?;
        }
        let text = Zeroizing::new(
            fs::read_to_string(path).ctx(format!("reading node key {}", path.display()))?,
        );
        let der = pem_decode(&text)
            .ok_or_else(|| Error::integrity(format!("node key {} is not PEM", path.display())))?;
        let pkcs8 = if is_sealed_pem(&text) {
            let pass = passphrase()?;
            crypto::unseal(&pass, &der)
                .map_err(|e| e.context(format!("opening sealed node key {}", path.display())))?
        } else {
            der
        };
        Identity::from_pkcs8(pkcs8).map_err(|e| e.context(path.display()))
    }

    /// The public key as PEM, for operators and tests.
    pub(crate) fn public_pem(&self) -> String {
        self.public
            .to_public_key_pem(LineEnding::LF)
            .expect("an RSA key always encodes")
    }
}

/// Whether a key file's text is a sealed key (a `BITSYNC SEALED KEY` PEM
/// block), which needs a passphrase to open.
pub(crate) fn is_sealed_pem(text: &str) -> bool {
    text.contains(SEALED_LABEL)
}

fn pem_encode(label: &str, der: &[u8]) -> Zeroizing<Vec<u8>> {
    let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(der));
    let mut out = Zeroizing::new(format!("-----BEGIN {label}-----\n"));
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    Zeroizing::new(out.as_bytes().to_vec())
}

/// The bytes of the first PEM block in `text`.
pub(crate) fn pem_decode(text: &str) -> Option<Zeroizing<Vec<u8>>> {
    let b64: Zeroizing<String> = Zeroizing::new(
        text.lines()
            .skip_while(|l| !l.starts_with("-----BEGIN "))
            .skip(1)
            .take_while(|l| !l.starts_with("-----END "))
            .collect(),
    );
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()
        .map(Zeroizing::new)
}
