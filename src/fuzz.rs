//! Entry points for the fuzz targets in `fuzz/` (built only with
//! `--cfg fuzzing`, which cargo-fuzz sets): one function per parser of
//! outside input, each running the crate's own parser and checks on the
//! bytes given, and asserting what must hold of whatever they accept.
//!
//! This module is the top room: it may call into every room, and none
//! calls it. It adds no parsing of its own; where a parser reads a file,
//! the entry point calls the part after the read, so a run costs no I/O.
//! Nothing here derives a key or makes a private-key operation, so one
//! input takes microseconds: the sealed-key target stops after the header
//! checks (decrypting with a fixed key instead of running scrypt).

use std::path::Path;
use std::sync::OnceLock;

use prost::Message;

use crate::axon::json as axon_json;
use crate::backup::repo::{self, Repo};
use crate::config::{Config, Limits};
use crate::crypto::{Hash, SealHeader};
use crate::invite::Invite;
use crate::manifest::{self, Manifest, ManifestBody};
use crate::proto::{
    GetInstanceConfigRequest, GetManifestsRequest, HelloRequest, JoinRequest, ListManifestsRequest,
    StreamChunksRequest, WatchRequest,
};
use crate::server::federation::{requests, MAX_MANIFEST_BATCH};
use crate::transport::PeerAddress;

/// `bytes` as text, or `None` (the file readers all refuse non-UTF-8).
fn text(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
}

/// A manifest body as a peer sends it (GetManifests) or a repository holds
/// it: decode, check the structure, verify a (wrong) signature. What passes
/// the structure check must give chunk lengths that add up to the cipher's
/// total, with every chunk but the last a full one.
pub fn manifest_body(data: &[u8]) {
    if let Ok(body) = ManifestBody::decode(data) {
        if manifest::check_structure(&body).is_ok() {
            let n = body.chunk_ids.len();
            let mut sum = 0u64;
            for i in 0..n {
                let len = manifest::chunk_cipher_len(&body, i);
                assert!(
                    len <= u64::from(body.chunk_size) + 16,
                    "chunk {i} of {n}: {len}"
                );
                sum += len;
            }
            assert_eq!(
                sum,
                manifest::cipher_total(&body),
                "chunk lengths of {body:?}"
            );
        }
    }
    let signature = vec![0u8; 384];
    assert!(Manifest::from_signed(data.to_vec(), signature).is_err());
}

/// An invite token as `clone` and `peer join` read it; its addresses as the
/// dialer parses them. A token that decodes encodes back to an equal one.
pub fn invite_token(data: &[u8]) {
    let Some(s) = text(data) else { return };
    let Ok(invite) = Invite::decode(s) else {
        return;
    };
    for a in &invite.addresses {
        let _ = PeerAddress::parse(a);
    }
    let again = Invite::decode(&invite.encode()).expect("an encoded invite decodes");
    assert_eq!(again.node_id, invite.node_id);
    assert_eq!(again.addresses, invite.addresses);
    assert_eq!(again.secret, invite.secret);
    assert_eq!(again.expires_at_ms, invite.expires_at_ms);
}

/// A link envelope as a peer's `GetLinkEnvelopes` answer carries it (`BLE2`
/// or the hybrid `BLE3`), and the same bytes as an item envelope (FORMAT.md
/// §4.2–4.3). Signatures are not checked here (no key); what parses has the
/// fields the layout gives it, and a hybrid one its 1088-byte ML-KEM
/// ciphertext, which key derivation takes only with a shared secret.
pub fn link_envelope(data: &[u8]) {
    if let Ok(e) = crate::crypto::link::LinkEnvelope::parse(data) {
        assert!(e.id.generation >= 1);
        assert!(e.wrapped_secret().len() <= 1024);
        assert_eq!(&data[4..36], &e.id.sender.0);
        assert_eq!(e.is_hybrid(), data.starts_with(b"BLE3"));
        match e.kem_ciphertext() {
            Some(ct) => {
                assert_eq!(ct.len(), crate::crypto::kem::CIPHERTEXT_LEN);
                assert!(e.key(&[0; 32], None).is_err());
                assert!(e.key(&[0; 32], Some(&[0; 32])).is_ok());
            }
            None => {
                assert!(e.key(&[0; 32], Some(&[0; 32])).is_err());
                assert!(e.key(&[0; 32], None).is_ok());
            }
        }
    }
    if let Some((sender, _)) = crate::crypto::link::item_link(data) {
        assert_eq!(data.len(), crate::crypto::link::ITEM_ENVELOPE_LEN);
        assert_eq!(&data[4..36], &sender.0);
    }
}

/// A sealed key file as restore reads it from a snapshot (PEM, then the
/// seal's header), and the same bytes as a raw seal. scrypt is not run: a
/// header that passes its checks is opened with a fixed key, which must
/// fail authentication.
pub fn sealed_key(data: &[u8]) {
    static KEY: [u8; 32] = [7u8; 32];
    let open = |sealed: &[u8]| {
        if let Ok(h) = SealHeader::parse(sealed) {
            assert!(h.open_with(&KEY).is_err(), "a forged seal opened");
        }
    };
    if let Some(s) = text(data) {
        if let Some(der) = crate::identity::pem_decode(s) {
            if crate::identity::is_sealed_pem(s) {
                open(&der);
            }
        }
    }
    open(data);
}

/// A `snapshot.json` as `backup ls`, `verify` and `restore` read it: the
/// description, its chunk list, and the confinement of every file it names
/// to the snapshot's directory.
pub fn snapshot_file(data: &[u8]) {
    let Ok(m) = repo::parse_meta(data, Path::new("snapshot.json")) else {
        return;
    };
    let _ = repo::chunk_list(&m);
    let repo = Repo::unopened("/nonexistent/repo".into());
    let dir = repo.snapshot_dir(&m.id);
    let mut names: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
    if let Some(i) = &m.identity {
        names.push(&i.file);
        names.extend(i.onion_keys.as_deref());
    }
    for name in names {
        if let Ok(p) = repo.snapshot_file(&m, name) {
            assert_eq!(
                p.parent(),
                Some(dir.as_path()),
                "{name:?} escapes the snapshot"
            );
        }
    }
}

/// One of an Axon backup's JSON files, chosen by the first byte:
/// `backup_manifest.json`, an applet's `metadata.json` (listed under the
/// name it gives itself, so the parse goes past the name check), or its
/// `applet_data.json`; with the times import-axon reads from them. Every
/// applet folder accepted is one plain name.
pub fn axon_json(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(rest) else {
        return;
    };
    let path = Path::new("/backup/file.json");
    match which % 3 {
        0 => {
            if let Ok((_, listed)) = axon_json::parse_backup_manifest(path, &value) {
                for (_, folder) in listed {
                    let joined = Path::new("/backup").join(&folder);
                    assert_eq!(joined.parent(), Some(Path::new("/backup")), "{folder:?}");
                }
            }
        }
        1 => {
            let name = value.get("name").and_then(|n| n.as_str()).unwrap_or("a");
            if let Ok((_, Some(t))) = axon_json::parse_metadata(path, &value, name) {
                let _ = crate::backup::import_axon::parse_axon_time(&t);
            }
        }
        _ => {
            for d in axon_json::parse_applet_data(path, &value)
                .into_iter()
                .flatten()
            {
                if let Some(t) = d.created_at.as_deref() {
                    let _ = crate::backup::import_axon::parse_axon_time(t);
                }
            }
        }
    }
}

/// `config.toml` as a node reads it at start.
pub fn config_toml(data: &[u8]) {
    if let Some(s) = text(data) {
        if let Ok(c) = Config::parse(s) {
            assert!(c.limits.list_page_max > 0 && c.limits.max_streams_per_peer > 0);
        }
    }
}

/// A peer address as `peer add`, Admin/AddPeer and the dialer parse it.
/// An accepted address has a port and, written back, parses to itself.
pub fn peer_address(data: &[u8]) {
    let Some(s) = text(data) else { return };
    let Ok(a) = PeerAddress::parse(s) else { return };
    assert_ne!(a.port, 0, "{s:?}");
    let written = if a.host.contains(':') {
        format!("[{}]:{}", a.host, a.port)
    } else {
        format!("{}:{}", a.host, a.port)
    };
    assert_eq!(
        PeerAddress::parse(&written).ok(),
        Some(a),
        "{s:?} -> {written:?}"
    );
}

/// The server's limits for the request checks: the defaults a node starts with.
fn limits() -> &'static Limits {
    static L: OnceLock<Limits> = OnceLock::new();
    L.get_or_init(Limits::default)
}

/// A Federation request message as the server decodes it (the first byte
/// says which of the seven), then the server's checks on its fields, as
/// each handler runs them before it touches the database.
pub fn federation_request(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let limits = limits();
    match which % 7 {
        0 => {
            let _ = HelloRequest::decode(body);
        }
        1 => {
            if let Ok(r) = JoinRequest::decode(body) {
                if let Ok((_, name, address)) = requests::join_fields(&r) {
                    assert!(name.chars().count() <= 64 && address.chars().count() <= 256);
                }
            }
        }
        2 => {
            if let Ok(r) = ListManifestsRequest::decode(body) {
                if requests::check_after_seq(r.after_seq).is_ok() {
                    assert!(r.after_seq <= i64::MAX as u64);
                    let limit = requests::page_limit(r.limit, limits.list_page_max);
                    assert!(limit >= 1 && limit <= limits.list_page_max);
                }
            }
        }
        3 => {
            if let Ok(r) = GetManifestsRequest::decode(body) {
                let _ = requests::check_envelope_format(r.envelope_format);
                if requests::check_manifest_batch(r.content_ids.len(), MAX_MANIFEST_BATCH).is_ok() {
                    for id in &r.content_ids {
                        let _ = Hash::parse(id, "content id");
                    }
                }
            }
        }
        4 => {
            if let Ok(r) = StreamChunksRequest::decode(body) {
                let max = limits.max_chunks_per_request as usize;
                if let Ok(ids) = requests::chunk_ids(&r.chunk_ids, max) {
                    assert_eq!(ids.len(), r.chunk_ids.len());
                }
            }
        }
        5 => {
            let _ = GetInstanceConfigRequest::decode(body);
        }
        _ => {
            if let Ok(r) = WatchRequest::decode(body) {
                let _ = requests::check_after_seq(r.after_seq);
            }
        }
    }
}
