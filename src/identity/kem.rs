//! The node's ML-KEM-768 key pair (docs/FORMAT.md §1.4), kept beside
//! `node.key` in `node.mlkem` and sealed with the passphrase exactly when
//! `node.key` is: the post-quantum half of every hybrid link envelope made
//! for this node. Its encapsulation key is published signed by the RSA key
//! ([`Identity::sign_kem_key`]); decapsulation, like every private-key
//! operation, is here and never leaves.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use aws_lc_rs::kem::{Ciphertext, DecapsulationKey, EncapsulationKey, ML_KEM_768};
use zeroize::Zeroizing;

use super::{is_sealed_pem, pem_decode, pem_encode, Identity, SEALED_LABEL};
use crate::crypto::{self, kem};
use crate::error::{Error, IoContext, Result};

const KEM_LABEL: &str = "BITSYNC ML-KEM-768 KEY";

pub struct KemKey {
    decapsulation: DecapsulationKey,
    /// FIPS 203 `dk` (2400 bytes), what the file holds. Zeroed when dropped.
    bytes: Zeroizing<Vec<u8>>,
    encapsulation: Vec<u8>,
}

impl std::fmt::Debug for KemKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KemKey(..)")
    }
}

impl KemKey {
    /// A new ML-KEM-768 key pair from the OS random source.
    pub(crate) fn generate() -> Result<KemKey> {
        let dk = DecapsulationKey::generate(&ML_KEM_768)
            .map_err(|_| Error::io("generating an ML-KEM-768 key failed"))?;
        let bytes = dk
            .key_bytes()
            .map_err(|_| Error::io("encoding the new ML-KEM-768 key failed"))?;
        KemKey::from_bytes(Zeroizing::new(bytes.as_ref().to_vec()))
    }

    /// The key from its FIPS 203 decapsulation key bytes; the encapsulation
    /// key is the slice of them FIPS 203 puts it in.
    fn from_bytes(bytes: Zeroizing<Vec<u8>>) -> Result<KemKey> {
        let bad = || Error::integrity("ML-KEM key is not a usable ML-KEM-768 decapsulation key");
        if bytes.len() != kem::DECAPSULATION_KEY_LEN {
            return Err(bad());
        }
        let decapsulation = DecapsulationKey::new(&ML_KEM_768, &bytes).map_err(|_| bad())?;
        let encapsulation = bytes[kem::EK_IN_DK].to_vec();
        EncapsulationKey::new(&ML_KEM_768, &encapsulation).map_err(|_| bad())?;
        // FIPS 203 stores H(ek) = SHA3-256(ek) after ek; a round trip proves
        // the pair matches without a SHA-3 here.
        let k = KemKey {
            decapsulation,
            bytes,
            encapsulation,
        };
        let (ct, ss) = kem::encapsulate(&k.encapsulation)?;
        if k.decapsulate(&ct)?.as_ref() != ss.as_ref() {
            return Err(bad());
        }
        Ok(k)
    }

    /// The published half: FIPS 203 `ek`, 1184 bytes.
    pub fn encapsulation_key(&self) -> &[u8] {
        &self.encapsulation
    }

    /// The shared secret of an ML-KEM-768 ciphertext made for this key.
    /// FIPS 203 decapsulation never fails on a well-sized ciphertext: a
    /// forged one yields an unrelated secret (implicit rejection), so the
    /// link key derived from it opens nothing.
    pub(crate) fn decapsulate(&self, ciphertext: &[u8]) -> Result<Zeroizing<[u8; 32]>> {
        if ciphertext.len() != kem::CIPHERTEXT_LEN {
            return Err(Error::integrity("ML-KEM ciphertext has the wrong length"));
        }
        let ss = self
            .decapsulation
            .decapsulate(Ciphertext::from(ciphertext))
            .map_err(|_| Error::integrity("ML-KEM ciphertext does not decapsulate"))?;
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(ss.as_ref());
        Ok(out)
    }

    /// The file contents: PEM `BITSYNC ML-KEM-768 KEY`, or sealed under
    /// `passphrase` exactly as a sealed `node.key` is.
    pub(crate) fn file_bytes(&self, passphrase: Option<&str>) -> Zeroizing<Vec<u8>> {
        match passphrase {
            None => pem_encode(KEM_LABEL, &self.bytes),
            Some(p) => pem_encode(SEALED_LABEL, &crypto::seal(p, &self.bytes)),
        }
    }

    /// Write the key file atomically with mode 0600 (temp file, fsync, rename).
    pub(crate) fn save(&self, path: &Path, passphrase: Option<&str>) -> Result<()> {
        crate::durable::write_atomic(path, &self.file_bytes(passphrase), 0o600)
    }

    /// Load `node.mlkem`; `passphrase` is asked for only if it is sealed.
    pub(crate) fn load(
        path: &Path,
        passphrase: &dyn Fn() -> Result<Zeroizing<String>>,
    ) -> Result<KemKey> {
        let meta = fs::metadata(path).ctx(format!("ML-KEM key {}", path.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "ML-KEM key is readable by group or others; fixing mode to 0600");
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))
                .ctx(format!("setting mode 0600 on {}", path.display()))?;
        }
        let text = Zeroizing::new(
            fs::read_to_string(path).ctx(format!("reading ML-KEM key {}", path.display()))?,
        );
        let der = pem_decode(&text)
            .ok_or_else(|| Error::integrity(format!("ML-KEM key {} is not PEM", path.display())))?;
        let bytes = if is_sealed_pem(&text) {
            crypto::unseal(&passphrase()?, &der)
                .map_err(|e| e.context(format!("opening sealed ML-KEM key {}", path.display())))?
        } else {
            der
        };
        KemKey::from_bytes(bytes).map_err(|e| e.context(path.display()))
    }
}

impl Identity {
    /// RSA-PSS over [`kem::key_message`]: what a peer checks before it pins
    /// this node's encapsulation key.
    pub(crate) fn sign_kem_key(&self, kem: &KemKey) -> Vec<u8> {
        self.sign_pss(&kem::key_message(&self.id, kem.encapsulation_key()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encapsulation_key_is_where_fips_203_puts_it_and_the_file_round_trips() {
        let k = KemKey::generate().unwrap();
        let dk = DecapsulationKey::generate(&ML_KEM_768).unwrap();
        let ek = dk.encapsulation_key().unwrap().key_bytes().unwrap();
        let dk_bytes = dk.key_bytes().unwrap();
        assert_eq!(&dk_bytes.as_ref()[kem::EK_IN_DK], ek.as_ref());
        let dir = tempfile::TempDir::new().unwrap();
        for pass in [None, Some("pw")] {
            let path = dir.path().join("node.mlkem");
            k.save(&path, pass).unwrap();
            let text = fs::read_to_string(&path).unwrap();
            assert_eq!(is_sealed_pem(&text), pass.is_some());
            let ask = || Ok(Zeroizing::new("pw".to_string()));
            let again = KemKey::load(&path, &ask).unwrap();
            assert_eq!(again.encapsulation_key(), k.encapsulation_key());
            let (ct, ss) = kem::encapsulate(k.encapsulation_key()).unwrap();
            assert_eq!(again.decapsulate(&ct).unwrap().as_ref(), ss.as_ref());
        }
    }
}
