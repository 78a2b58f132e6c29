//! The post-quantum hybrid (docs/FORMAT.md §1.4, §4.2b; PROTOCOL.md §4.4b):
//! `BLE3` link envelopes whose key needs both the RSA-OAEP secret and the
//! ML-KEM-768 secret, ML-KEM keys signed and pinned per peer, a changed or
//! badly signed key refused, an existing `BLE2` link rotated to `BLE3` once
//! the peer's key is pinned, and a format-2 (`BLE2`) pair of data dirs made
//! by the bitsync before the hybrid that keeps working and upgrades.
//!
//! Envelopes are taken apart and rebuilt here from FORMAT.md's layout, with
//! the `rsa` crate, not with bitsync's own code.

use std::fs;
use std::path::Path;

use bitsync::crypto::ContentId;
use bitsync::keyring::ENVELOPE_FORMAT;
use bitsync::node::Node;
use bitsync::proto::*;
use bitsync::replicator::Client;
use rsa::pkcs8::DecodePrivateKey;
use rsa::signature::{RandomizedSigner, SignatureEncoding};
use rsa::{Oaep, RsaPrivateKey};
use sha2::Sha256;
use tempfile::TempDir;
use tonic::Code;

use crate::support::*;

/// GetManifests presenting `kem` as the caller's key.
async fn get_manifests(
    fed: &mut Client,
    ids: &[ContentId],
    kem: Option<SignedKemKey>,
) -> Result<Vec<Vec<u8>>, tonic::Status> {
    let r = fed
        .get_manifests(GetManifestsRequest {
            content_ids: ids.iter().map(|i| i.to_hex()).collect(),
            envelope_format: ENVELOPE_FORMAT,
            caller_kem_key: kem,
            envelopes_only: false,
        })
        .await?
        .into_inner();
    Ok(r.results
        .into_iter()
        .map(|x| {
            assert!(x.problem.is_none(), "{:?}", x.problem);
            x.envelope.unwrap().wrapped_key
        })
        .collect())
}

fn generation_of(item_envelope: &[u8]) -> u32 {
    assert_eq!(&item_envelope[..4], b"BIE2");
    u32::from_be_bytes(item_envelope[36..40].try_into().unwrap())
}

/// A node's RSA key, read from its (unsealed) node.key as FORMAT.md §1.1 says.
fn rsa_key(node: &Node) -> RsaPrivateKey {
    RsaPrivateKey::from_pkcs8_pem(&fs::read_to_string(node.paths().key()).unwrap()).unwrap()
}

/// A `BLE3` link envelope's fields (FORMAT.md §4.2b).
struct Ble3 {
    /// magic, sender, recipient, generation: 72 bytes.
    head: Vec<u8>,
    wrapped: Vec<u8>,
    kem_ciphertext: Vec<u8>,
}

fn parse_ble3(b: &[u8]) -> Ble3 {
    assert_eq!(&b[..4], b"BLE3");
    let wlen = u16::from_be_bytes([b[72], b[73]]) as usize;
    let (wrapped, rest) = b[74..].split_at(wlen);
    let (ct, rest) = rest.split_at(1088);
    let slen = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    assert_eq!(rest.len(), 2 + slen, "no trailing bytes");
    Ble3 {
        head: b[..72].to_vec(),
        wrapped: wrapped.to_vec(),
        kem_ciphertext: ct.to_vec(),
    }
}

/// The envelope of `e`'s fields, signed by `signer` as FORMAT.md §4.2b says.
fn build_ble3(e: &Ble3, signer: &RsaPrivateKey) -> Vec<u8> {
    let mut out = e.head.clone();
    out.extend_from_slice(&(e.wrapped.len() as u16).to_be_bytes());
    out.extend_from_slice(&e.wrapped);
    out.extend_from_slice(&e.kem_ciphertext);
    let mut message = b"bitsync-link-v3\0".to_vec();
    message.extend_from_slice(&out);
    let sig = pss_sign(signer, &message);
    out.extend_from_slice(&(sig.len() as u16).to_be_bytes());
    out.extend_from_slice(&sig);
    out
}

fn pss_sign(key: &RsaPrivateKey, message: &[u8]) -> Vec<u8> {
    rsa::pss::BlindedSigningKey::<Sha256>::new_with_salt_len(key.clone(), 32)
        .sign_with_rng(&mut rand::rngs::OsRng, message)
        .to_vec()
}

/// A valid `SignedKemKey` for `node` of a key pair that is not its own.
fn another_kem_key(node: &Node) -> SignedKemKey {
    use aws_lc_rs::kem::{DecapsulationKey, ML_KEM_768};
    let dk = DecapsulationKey::generate(&ML_KEM_768).unwrap();
    let ek = dk.encapsulation_key().unwrap().key_bytes().unwrap();
    let ek = ek.as_ref().to_vec();
    let signature = pss_sign(
        &rsa_key(node),
        &bitsync::crypto::kem::key_message(&node.id(), &ek),
    );
    SignedKemKey {
        encapsulation_key: ek,
        signature,
    }
}

/// The ML-KEM key pinned for `peer` in `dir`'s database.
fn pinned(dir: &Path, peer: &bitsync::crypto::NodeId) -> Option<Vec<u8>> {
    db_read_only(dir)
        .query_row(
            "SELECT kem_key FROM peers WHERE node_id = ?1",
            [peer.to_hex()],
            |r| r.get(0),
        )
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hybrid_link_key_needs_both_the_rsa_and_the_ml_kem_secret() {
    let tmp = TempDir::new().unwrap();
    let s = serve(fresh(&tmp, "s")).await;
    let (a, b, c) = (fresh(&tmp, "a"), fresh(&tmp, "b"), fresh(&tmp, "c"));
    for n in [&a, &b, &c] {
        trust(&s, &n.id());
    }
    let ids: Vec<ContentId> = (0..3)
        .map(|i| put(&s.state.node, &format!("i{i}"), &data(i, 3000)))
        .collect();
    let (mut fa, mut fb, mut fc) = (
        federation_client(&a, &s).await,
        federation_client(&b, &s).await,
        federation_client(&c, &s).await,
    );
    let ea = get_manifests(&mut fa, &ids, Some(a.signed_kem_key()))
        .await
        .unwrap();
    let eb = get_manifests(&mut fb, &ids, Some(b.signed_kem_key()))
        .await
        .unwrap();
    let ec = get_manifests(&mut fc, &ids, Some(c.signed_kem_key()))
        .await
        .unwrap();
    let s_key = rsa_key(&s.state.node);

    // The genuine envelope: BLE3, opens every item, and a second reader
    // following FORMAT.md (RSA-OAEP + ML-KEM-768 + HKDF) gets the same key.
    let la = link_envelopes(&mut fa).await;
    assert_eq!(la.link_envelopes.len(), 1);
    let genuine = parse_ble3(&la.link_envelopes[0]);
    // Any byte of the ML-KEM ciphertext changed, not re-signed: refused.
    let mut flipped = la.link_envelopes[0].clone();
    flipped[74 + genuine.wrapped.len() + 500] ^= 1;
    data_loss(
        a.receive_link_envelopes(&la.sender_spki, &[flipped])
            .unwrap_err(),
    );
    assert_eq!(
        a.receive_link_envelopes(&la.sender_spki, &la.link_envelopes)
            .unwrap(),
        1
    );
    for (id, e) in ids.iter().zip(&ea) {
        a.open_envelope(id, e).expect("A opens its envelope");
    }
    python_agrees(&a, &ids[0], &ea[0]);

    // The RSA part replaced by a valid RSA-OAEP wrap of another secret (and
    // the whole signed again by S, as S itself or whoever holds its key
    // could): it verifies and unwraps, but the key opens nothing.
    let lb = link_envelopes(&mut fb).await;
    let mut e = parse_ble3(&lb.link_envelopes[0]);
    e.wrapped = rsa_key(&b)
        .to_public_key()
        .encrypt(&mut rand::rngs::OsRng, Oaep::new::<Sha256>(), &[9u8; 32])
        .unwrap();
    let forged = build_ble3(&e, &s_key);
    assert_eq!(
        b.receive_link_envelopes(&lb.sender_spki, &[forged])
            .unwrap(),
        1
    );
    for (id, env) in ids.iter().zip(&eb) {
        data_loss(b.open_envelope(id, env).unwrap_err());
    }

    // The ML-KEM part replaced by a valid encapsulation of another secret
    // to C's own key, signed again: likewise.
    let lc = link_envelopes(&mut fc).await;
    let mut e = parse_ble3(&lc.link_envelopes[0]);
    let (ct, _) = bitsync::crypto::kem::encapsulate(&c.signed_kem_key().encapsulation_key).unwrap();
    e.kem_ciphertext = ct;
    let forged = build_ble3(&e, &s_key);
    assert_eq!(
        c.receive_link_envelopes(&lc.sender_spki, &[forged])
            .unwrap(),
        1
    );
    for (id, env) in ids.iter().zip(&ec) {
        data_loss(c.open_envelope(id, env).unwrap_err());
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ml_kem_keys_are_pinned_and_a_changed_or_forged_one_is_refused() {
    let tmp = TempDir::new().unwrap();
    let s = serve(fresh(&tmp, "s")).await;
    let (a, b) = (fresh(&tmp, "a"), fresh(&tmp, "b"));
    trust(&s, &a.id());
    trust(&s, &b.id());
    let sn = &s.state.node;
    let s_dir = sn.paths().root().to_path_buf();
    let ids = vec![put(sn, "x", b"hello")];

    // Hello publishes the server's key, signed by its node key.
    let mut fa = federation_client(&a, &s).await;
    let hello = fa.hello(HelloRequest {}).await.unwrap().into_inner();
    let published = hello.kem_key.expect("Hello carries the ML-KEM key");
    assert_eq!(published, sn.signed_kem_key());
    assert_eq!(published.encapsulation_key.len(), 1184);

    // A badly signed key: DATA_LOSS, nothing pinned.
    let mut fb = federation_client(&b, &s).await;
    let mut bad = b.signed_kem_key();
    let n = bad.signature.len();
    bad.signature[n - 1] ^= 1;
    let e = get_manifests(&mut fb, &ids, Some(bad)).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{}", e.message());
    assert!(e.message().contains("not signed"), "{}", e.message());
    assert_eq!(pinned(&s_dir, &b.id()), None);
    // Another node's (validly signed) key is not B's either.
    let e = get_manifests(&mut fb, &ids, Some(a.signed_kem_key()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{}", e.message());

    // A's key is pinned on its first call; the same key again is fine.
    get_manifests(&mut fa, &ids, Some(a.signed_kem_key()))
        .await
        .unwrap();
    assert_eq!(
        pinned(&s_dir, &a.id()),
        Some(a.signed_kem_key().encapsulation_key)
    );
    get_manifests(&mut fa, &ids, Some(a.signed_kem_key()))
        .await
        .unwrap();
    // Another key for A, validly signed by A's node key: refused while pinned.
    let other = another_kem_key(&a);
    let e = get_manifests(&mut fa, &ids, Some(other.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("pinned"), "{}", e.message());
    assert_eq!(
        pinned(&s_dir, &a.id()),
        Some(a.signed_kem_key().encapsulation_key)
    );
    // Revoking clears the pin; trusted again, the key A presents is pinned,
    // be it the same one (link keys made for A are then hybrid again) ...
    sn.db().revoke_peer(&a.id()).unwrap();
    assert_eq!(pinned(&s_dir, &a.id()), None);
    trust(&s, &a.id());
    get_manifests(&mut fa, &ids, Some(a.signed_kem_key()))
        .await
        .unwrap();
    assert_eq!(
        pinned(&s_dir, &a.id()),
        Some(a.signed_kem_key().encapsulation_key)
    );
    assert_eq!(
        &link_envelopes(&mut fa).await.link_envelopes[0][..4],
        b"BLE3"
    );
    // ... or a new one.
    sn.db().revoke_peer(&a.id()).unwrap();
    trust(&s, &a.id());
    get_manifests(&mut fa, &ids, Some(other.clone()))
        .await
        .unwrap();
    assert_eq!(pinned(&s_dir, &a.id()), Some(other.encapsulation_key));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ble2_link_becomes_ble3_once_the_peer_presents_its_key() {
    let tmp = TempDir::new().unwrap();
    let s = serve(fresh(&tmp, "s")).await;
    let a = fresh(&tmp, "a");
    trust(&s, &a.id());
    let ids: Vec<ContentId> = (0..3)
        .map(|i| put(&s.state.node, &format!("i{i}"), &data(i, 100)))
        .collect();
    let mut fa = federation_client(&a, &s).await;
    // A caller from before the hybrid presents no key: BLE2, still served.
    let old = get_manifests(&mut fa, &ids, None).await.unwrap();
    let l = link_envelopes(&mut fa).await;
    assert_eq!(&l.link_envelopes[0][..4], b"BLE2");
    a.receive_link_envelopes(&l.sender_spki, &l.link_envelopes)
        .unwrap();
    a.open_envelope(&ids[0], &old[0]).unwrap();

    // Presenting the key rotates the link to a BLE3 generation, in the same call.
    let new = get_manifests(&mut fa, &ids, Some(a.signed_kem_key()))
        .await
        .unwrap();
    assert!(generation_of(&new[0]) > generation_of(&old[0]));
    let l = link_envelopes(&mut fa).await;
    assert_eq!(l.link_envelopes.len(), 1, "the BLE2 generation is dropped");
    assert_eq!(&l.link_envelopes[0][..4], b"BLE3");
    a.receive_link_envelopes(&l.sender_spki, &l.link_envelopes)
        .unwrap();
    for (id, e) in ids.iter().zip(&new) {
        a.open_envelope(id, e).unwrap();
    }
    // What A received under BLE2 still opens; no further rotation.
    a.open_envelope(&ids[0], &old[0]).unwrap();
    let again = get_manifests(&mut fa, &ids, Some(a.signed_kem_key()))
        .await
        .unwrap();
    assert_eq!(generation_of(&again[0]), generation_of(&new[0]));
    s.shutdown().await;
}

const PASS: &str = "throwaway-fixture-passphrase";
const FORMAT2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/format2");

/// Copy the format-2 fixture (tests/fixtures/format2/README.md) into `dest`:
/// data dirs `s` and `a`, their sealed keys in place as `node.key`.
fn format2_fixture(dest: &Path) {
    fn copy_dir(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for e in fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &to.join(e.file_name()));
            } else {
                fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }
    for n in ["s", "a"] {
        copy_dir(&Path::new(FORMAT2).join(n), &dest.join(n));
        let key = dest.join(n).join("node.key");
        fs::rename(dest.join(n).join("node.key.sealed"), &key).unwrap();
        let mut p = fs::metadata(&key).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o600);
        fs::set_permissions(&key, p).unwrap();
    }
}

fn open_sealed(dir: &Path) -> Node {
    Node::open(dir, &|| Ok(zeroize::Zeroizing::new(PASS.to_string()))).unwrap()
}

/// (generation, magic) of every `L(sender→recipient)` row in `dir`'s database.
fn links(dir: &Path, sender: &str, recipient: &str) -> Vec<(u32, Vec<u8>)> {
    let c = db_read_only(dir);
    let mut st = c
        .prepare(
            "SELECT generation, substr(envelope, 1, 4) FROM link_keys
             WHERE sender = ?1 AND recipient = ?2 ORDER BY generation",
        )
        .unwrap();
    st.query_map([sender, recipient], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_2_pair_made_before_the_hybrid_keeps_working_and_upgrades() {
    bitsync::tls::install_crypto_provider();
    let tmp = TempDir::new().unwrap();
    format2_fixture(tmp.path());
    let (s_dir, a_dir) = (tmp.path().join("s"), tmp.path().join("a"));
    let (s_hex, a_hex) = (
        "1f1c30ba6f128fc5591ae23322696e338502870cd21718d06756e20bf5390096",
        "1fbc0e7ec5e343163b44da2cb3af87145b8057051a420ebc6a0509e447c928a0",
    );
    let before = links(&s_dir, s_hex, a_hex);
    assert_eq!(before, vec![(2, b"BLE2".to_vec())], "the fixture's L(s→a)");
    let items: Vec<(ContentId, Vec<u8>)> = [
        "9d247511f3d40eaf9a9b26b71d21ffc0c225adbc8c8aeae82548b4e6867acd36",
        "10852d63e7cb363b6bbc42d6a22ef2158462fd549b03280cb614296ecf1e0df8",
        "767cdb569611abc55d41d200f5f909bd3dfc18900343726fe702576f0c17a541",
    ]
    .iter()
    .enumerate()
    .map(|(i, id)| {
        let text = format!("format two item {}\n", i + 1).repeat(50);
        (id.parse().unwrap(), text.into_bytes())
    })
    .collect();

    // First open by this bitsync: schema 3, and an ML-KEM key made beside
    // each node key, sealed like it; everything stored still reads.
    let (s, a) = (open_sealed(&s_dir), open_sealed(&a_dir));
    for dir in [&s_dir, &a_dir] {
        let kem = dir.join("node.mlkem");
        let mode = fs::metadata(&kem).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert!(fs::read_to_string(&kem)
            .unwrap()
            .contains("BITSYNC SEALED KEY"));
        let v: String = db_read_only(dir)
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            v,
            bitsync::store::SCHEMA_VERSION,
            "migrated through 3 to the current schema"
        );
    }
    for (id, plain) in &items {
        assert_eq!(&get(&s, id), plain);
        assert_eq!(&get(&a, id), plain, "a's copy, under the BLE2 L(s→a)");
    }
    // The key made on first open is the one every later open reads.
    let published = a.signed_kem_key();
    drop(a);
    let a = open_sealed(&a_dir);
    assert_eq!(
        a.signed_kem_key().encapsulation_key,
        published.encapsulation_key
    );

    // a presents its key: s pins it and rotates L(s→a) to a BLE3 generation.
    let s = serve(s).await;
    let mut fa = federation_client(&a, &s).await;
    let ids: Vec<ContentId> = items.iter().map(|(id, _)| *id).collect();
    let envelopes = get_manifests(&mut fa, &ids, Some(a.signed_kem_key()))
        .await
        .unwrap();
    let after = links(&s_dir, s_hex, a_hex);
    assert_eq!(after.len(), 1, "the BLE2 generation is dropped: {after:?}");
    assert!(after[0].0 > 2);
    assert_eq!(after[0].1, b"BLE3");
    assert!(envelopes.iter().all(|e| generation_of(e) == after[0].0));
    for (id, e) in ids.iter().zip(&envelopes) {
        open_envelope(&a, &mut fa, id, e).await.unwrap();
    }
    for (id, plain) in &items {
        assert_eq!(&get(&a, id), plain);
    }
    s.shutdown().await;
}

/// The encapsulation key in a data dir's node.mlkem, checked sealed and 0600.
fn sealed_kem_key(dir: &Path) -> Vec<u8> {
    let path = dir.join("node.mlkem");
    let mode = std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "{}", path.display());
    assert!(fs::read_to_string(&path)
        .unwrap()
        .contains("BITSYNC SEALED KEY"));
    open_sealed(dir).signed_kem_key().encapsulation_key
}

#[test]
fn backups_with_identity_restore_and_clone_instance_carry_the_ml_kem_key() {
    let tmp = TempDir::new().unwrap();
    let (dir, repo) = (tmp.path().join("n"), tmp.path().join("repo"));
    let env = ("BITSYNC_PASSPHRASE", PASS);
    ok(bitsync(&dir).args(["init", "--seal"]).env(env.0, env.1));
    let ek = sealed_kem_key(&dir);

    ok(bitsync(&dir)
        .args(["backup", "--with-identity", "--repo"])
        .arg(&repo)
        .env(env.0, env.1));
    let snap = fs::read_dir(repo.join("snapshots"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(snap.join("snapshot.json")).unwrap()).unwrap();
    assert_eq!(meta["identity"]["kem_key"], "node.mlkem.sealed");
    assert!(fs::read_to_string(snap.join("node.mlkem.sealed"))
        .unwrap()
        .contains("BITSYNC SEALED KEY"));
    ok(bitsync(&dir)
        .args(["backup", "verify", "--repo"])
        .arg(&repo));

    // Disaster recovery keeps the key peers pinned; a new identity gets a new one.
    let same = tmp.path().join("same");
    ok(bitsync(&same)
        .args(["restore", "--repo"])
        .arg(&repo)
        .env(env.0, env.1));
    assert_eq!(sealed_kem_key(&same), ek);
    let new = tmp.path().join("new");
    ok(bitsync(&new)
        .args(["restore", "--new-identity", "--repo"])
        .arg(&repo)
        .env(env.0, env.1));
    assert_ne!(sealed_kem_key(&new), ek);

    let copy = tmp.path().join("copy");
    ok(bitsync(&dir)
        .arg("clone-instance")
        .arg("--dest-db")
        .arg(copy.join("bitsync.db"))
        .arg("--dest-attachments")
        .arg(copy.join("chunks"))
        .arg("--new-identity")
        .env(env.0, env.1));
    assert_ne!(sealed_kem_key(&copy), ek);
}
