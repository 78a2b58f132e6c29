//! The Axon backup reader against backups written by an independent writer
//! (tests/support/axon_fixture.rs) and against a known answer produced by
//! pyca/cryptography, the library Axon itself uses.

use std::path::{Path, PathBuf};

use crate::support::axon_fixture::{
    axon_key_id, content, corrupt_piece, delete_piece, edit_json, folder_for, other_key,
    shared_key, truncate_piece, Builder, Written, AXON_CHUNK_SIZE, BACKUP_DATE,
};
use base64::Engine;
use bitsync::axon::{self, AxonBackup, AxonError, AxonItem, AxonItemKind, ChunkState};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const CHESS: &str = "Chess / Deluxe Edition";

/// Items of every size class: empty, under a piece, a ciphertext of exactly
/// one piece, a plaintext of exactly one piece (its padding spills into a
/// 16-byte second piece), several pieces; data instances of several sizes.
fn standard(dir: &Path) -> Written {
    Builder::new()
        .applet("empty", 0)
        .applet("tiny", 1000)
        .applet("one piece", AXON_CHUNK_SIZE - 1)
        .applet("exact piece", AXON_CHUNK_SIZE)
        .applet(CHESS, 3 * AXON_CHUNK_SIZE + 5000)
        .data("tiny", "alice", 700)
        .data("tiny", "bob", AXON_CHUNK_SIZE + 1)
        .data(CHESS, "carol", 0)
        .write(dir)
}

fn backup_dir(tmp: &tempfile::TempDir) -> PathBuf {
    tmp.path().join(format!("backup_{BACKUP_DATE}"))
}

fn find<'a>(backup: &'a AxonBackup, applet: &str, owner: Option<&str>) -> &'a AxonItem {
    backup
        .items
        .iter()
        .find(|i| {
            i.applet == applet
                && match &i.kind {
                    AxonItemKind::AppletCode => owner.is_none(),
                    AxonItemKind::AppletData { owner_username, .. } => {
                        owner == Some(owner_username.as_str())
                    }
                }
        })
        .unwrap_or_else(|| panic!("no item {applet:?} / {owner:?}"))
}

fn decrypt_to_vec(item: &AxonItem, key: &[u8; 32]) -> Result<Vec<u8>, AxonError> {
    let mut out = Vec::new();
    let n = axon::decrypt_item(item, key, &mut out)?;
    assert_eq!(n, out.len() as u64, "returned length vs bytes written");
    Ok(out)
}

fn decrypt_with(item: &AxonItem, key: &rsa::RsaPrivateKey) -> Result<Vec<u8>, AxonError> {
    let aes = axon::unwrap_key(item, key)?;
    decrypt_to_vec(item, &aes)
}

fn owner_of(item: &AxonItem) -> Option<&str> {
    match &item.kind {
        AxonItemKind::AppletCode => None,
        AxonItemKind::AppletData { owner_username, .. } => Some(owner_username),
    }
}

#[test]
fn clean_backup_opens_with_every_item_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let w = standard(&backup_dir(&tmp));
    let b = axon::open(&w.dir).unwrap();

    assert_eq!(b.dir, w.dir);
    assert_eq!(b.backup_date, BACKUP_DATE);
    let got: Vec<(&str, Option<&str>)> = b
        .items
        .iter()
        .map(|i| (i.applet.as_str(), owner_of(i)))
        .collect();
    let want: Vec<(&str, Option<&str>)> = w
        .items
        .iter()
        .map(|i| (i.applet.as_str(), i.owner.as_deref()))
        .collect();
    assert_eq!(got, want);

    for (item, written) in b.items.iter().zip(&w.items) {
        assert_eq!(item.chunk_paths, written.chunk_paths, "{}", item.label());
        assert_eq!(item.manifest.chunk_hashes.len(), written.chunk_paths.len());
        assert_eq!(item.manifest.chunk_size, AXON_CHUNK_SIZE as u32);
        assert_eq!(
            item.manifest.content_hash,
            <[u8; 32]>::from(Sha256::digest(&written.plaintext))
        );
        assert_eq!(item.manifest.encrypted_aes_keys.len(), 1);
        match &item.kind {
            AxonItemKind::AppletCode => {
                assert_eq!(
                    item.created_at.as_deref(),
                    Some("2025-01-02T03:04:05.123456+00:00")
                );
            }
            AxonItemKind::AppletData {
                instance_id,
                owner_username,
            } => {
                assert_eq!(Some(instance_id), written.instance_id.as_ref());
                assert_eq!(Some(owner_username), written.owner.as_ref());
                assert_eq!(
                    item.created_at.as_deref(),
                    Some("2025-03-01T10:20:30.000001+00:00")
                );
            }
        }
    }

    let pieces = |applet, owner| find(&b, applet, owner).chunk_paths.len();
    assert_eq!(
        pieces("empty", None),
        1,
        "empty plaintext is one block of padding"
    );
    assert_eq!(pieces("tiny", None), 1);
    assert_eq!(pieces("one piece", None), 1);
    assert_eq!(
        pieces("exact piece", None),
        2,
        "a full piece of plaintext spills its padding"
    );
    assert_eq!(pieces(CHESS, None), 4);
    assert_eq!(pieces("tiny", Some("alice")), 1);
    assert_eq!(pieces("tiny", Some("bob")), 2);
    assert_eq!(pieces(CHESS, Some("carol")), 1);

    assert_eq!(find(&b, "tiny", None).label(), "applet 'tiny'");
    let alice = find(&b, "tiny", Some("alice"));
    let AxonItemKind::AppletData { instance_id, .. } = &alice.kind else {
        unreachable!()
    };
    assert_eq!(
        alice.label(),
        format!("data 'tiny' of alice (id {instance_id})")
    );
}

#[test]
fn clean_backup_checks_all_ok() {
    let tmp = tempfile::tempdir().unwrap();
    let w = standard(&backup_dir(&tmp));
    let b = axon::open(&w.dir).unwrap();
    for item in &b.items {
        let states = axon::check_item(item).unwrap();
        assert_eq!(states.len(), item.chunk_paths.len());
        assert!(
            states.iter().all(|s| *s == ChunkState::Ok),
            "{}: {states:?}",
            item.label()
        );
    }
}

#[test]
fn every_item_decrypts_to_the_written_plaintext() {
    let tmp = tempfile::tempdir().unwrap();
    let w = standard(&backup_dir(&tmp));
    let b = axon::open(&w.dir).unwrap();
    assert_eq!(b.items.len(), w.items.len());
    for (item, written) in b.items.iter().zip(&w.items) {
        let key = axon::unwrap_key(item, &w.key).unwrap();
        assert_eq!(*key, written.aes_key, "{}", item.label());
        let plain = decrypt_to_vec(item, &key).unwrap();
        assert!(
            plain == written.plaintext,
            "{}: plaintext differs",
            item.label()
        );
    }
}

#[test]
fn corrupted_piece_is_reported_and_stops_decryption() {
    let tmp = tempfile::tempdir().unwrap();
    let w = standard(&backup_dir(&tmp));
    let bad = &w.item(CHESS, None).chunk_paths[1];
    corrupt_piece(bad);
    let b = axon::open(&w.dir).unwrap();
    let item = find(&b, CHESS, None);

    let states = axon::check_item(item).unwrap();
    assert_eq!(states[0], ChunkState::Ok);
    assert!(
        matches!(&states[1], ChunkState::Corrupt { reason } if reason.contains("SHA-256")),
        "{states:?}"
    );
    assert_eq!(states[2..], [ChunkState::Ok, ChunkState::Ok]);

    let err = decrypt_with(item, &w.key).unwrap_err();
    assert!(
        matches!(&err, AxonError::PieceCorrupt { index: 1, path, .. } if path == bad),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("piece 1") && msg.contains(&bad.display().to_string()) && msg.contains(CHESS),
        "{msg}"
    );

    // Other items are untouched.
    assert!(axon::check_item(find(&b, CHESS, Some("carol")))
        .unwrap()
        .iter()
        .all(|s| *s == ChunkState::Ok));
}

#[test]
fn missing_piece_is_reported_and_stops_decryption() {
    let tmp = tempfile::tempdir().unwrap();
    let w = standard(&backup_dir(&tmp));
    let gone = &w.item("tiny", Some("bob")).chunk_paths[0];
    delete_piece(gone);
    let b = axon::open(&w.dir).unwrap();
    let item = find(&b, "tiny", Some("bob"));

    assert_eq!(
        axon::check_item(item).unwrap(),
        vec![ChunkState::Missing, ChunkState::Ok]
    );
    let err = decrypt_with(item, &w.key).unwrap_err();
    assert!(
        matches!(&err, AxonError::PieceMissing { index: 0, path, .. } if path == gone),
        "{err:?}"
    );
    assert!(err.to_string().contains("piece 0 is missing"), "{err}");
}

#[test]
fn missing_chunk_folder_makes_every_piece_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let w = standard(&backup_dir(&tmp));
    std::fs::remove_dir_all(w.dir.join(folder_for(CHESS)).join("chunks")).unwrap();
    let b = axon::open(&w.dir).unwrap();
    assert_eq!(
        axon::check_item(find(&b, CHESS, None)).unwrap(),
        vec![ChunkState::Missing; 4]
    );
    assert!(axon::check_item(find(&b, CHESS, Some("carol")))
        .unwrap()
        .iter()
        .all(|s| *s == ChunkState::Ok));
}

#[test]
fn truncated_piece_is_corrupt() {
    let tmp = tempfile::tempdir().unwrap();
    let w = standard(&backup_dir(&tmp));
    let chess = w.item(CHESS, None);
    truncate_piece(&chess.chunk_paths[2], 100);
    truncate_piece(&chess.chunk_paths[3], 16);
    let b = axon::open(&w.dir).unwrap();
    let item = find(&b, CHESS, None);

    let states = axon::check_item(item).unwrap();
    assert_eq!(states[..2], [ChunkState::Ok, ChunkState::Ok]);
    let reason = match &states[2] {
        ChunkState::Corrupt { reason } => reason,
        s => panic!("{s:?}"),
    };
    assert!(
        reason.contains("truncated")
            && reason.contains(&format!("{} of {AXON_CHUNK_SIZE}", AXON_CHUNK_SIZE - 100))
    );
    assert!(
        matches!(states[3], ChunkState::Corrupt { .. }),
        "a shortened last piece no longer matches its hash"
    );

    let err = decrypt_with(item, &w.key).unwrap_err();
    assert!(
        matches!(err, AxonError::PieceCorrupt { index: 2, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("truncated"), "{err}");

    // A piece emptied altogether.
    let alice = &w.item("tiny", Some("alice")).chunk_paths[0];
    std::fs::write(alice, b"").unwrap();
    let states = axon::check_item(find(&b, "tiny", Some("alice"))).unwrap();
    assert_eq!(
        states,
        vec![ChunkState::Corrupt {
            reason: "empty file".into()
        }]
    );
}

#[test]
fn oversized_piece_is_corrupt_and_not_read_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let w = standard(&backup_dir(&tmp));
    let path = &w.item("exact piece", None).chunk_paths[0];
    let mut bytes = std::fs::read(path).unwrap();
    bytes.extend_from_slice(&vec![0u8; 5 * AXON_CHUNK_SIZE]);
    std::fs::write(path, bytes).unwrap();
    let b = axon::open(&w.dir).unwrap();
    let item = find(&b, "exact piece", None);

    let states = axon::check_item(item).unwrap();
    assert!(
        matches!(&states[0], ChunkState::Corrupt { reason } if reason.contains("longer than")),
        "{states:?}"
    );
    assert_eq!(states[1], ChunkState::Ok);
    let err = decrypt_with(item, &w.key).unwrap_err();
    assert!(
        matches!(err, AxonError::PieceCorrupt { index: 0, .. }),
        "{err:?}"
    );
}

#[test]
fn wrong_private_key_has_no_envelope() {
    let tmp = tempfile::tempdir().unwrap();
    let w = standard(&backup_dir(&tmp));
    let b = axon::open(&w.dir).unwrap();
    let item = find(&b, "tiny", None);
    let wrong = other_key();

    let err = axon::unwrap_key(item, &wrong).unwrap_err();
    match &err {
        AxonError::NoEnvelope {
            item: label,
            key_id,
            available,
        } => {
            assert_eq!(label, "applet 'tiny'");
            assert_eq!(key_id, &axon_key_id(&wrong.to_public_key()));
            assert_eq!(available, &vec![axon_key_id(&w.key.to_public_key())]);
        }
        e => panic!("{e:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("applet 'tiny'") && msg.contains("no key envelope for this key"),
        "{msg}"
    );
}

#[test]
fn damaged_envelope_does_not_open() {
    let tmp = tempfile::tempdir().unwrap();
    let w = standard(&backup_dir(&tmp));
    let id = axon_key_id(&w.key.to_public_key());
    edit_json(&w.metadata_path("tiny"), |m| {
        let env = m["code_manifest"]["encrypted_aes_keys"][&id]
            .as_str()
            .unwrap();
        let mut bytes = base64::engine::general_purpose::STANDARD
            .decode(env)
            .unwrap();
        bytes[100] ^= 1;
        m["code_manifest"]["encrypted_aes_keys"][&id] =
            json!(base64::engine::general_purpose::STANDARD.encode(bytes));
    });
    let b = axon::open(&w.dir).unwrap();
    let err = axon::unwrap_key(find(&b, "tiny", None), &w.key).unwrap_err();
    assert!(
        matches!(&err, AxonError::Unwrap { key_id, .. } if *key_id == id),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("does not open with this key"),
        "{err}"
    );
}

#[test]
fn wrong_aes_key_fails_decryption() {
    let tmp = tempfile::tempdir().unwrap();
    let w = standard(&backup_dir(&tmp));
    let b = axon::open(&w.dir).unwrap();
    for (applet, owner) in [
        ("tiny", None),
        (CHESS, None),
        ("empty", None),
        ("tiny", Some("bob")),
    ] {
        let item = find(&b, applet, owner);
        for wrong in [[0u8; 32], w.item("one piece", None).aes_key] {
            let err = decrypt_to_vec(item, &wrong).unwrap_err();
            assert!(
                matches!(
                    err,
                    AxonError::Padding { .. } | AxonError::ContentHash { .. }
                ),
                "{}: {err:?}",
                item.label()
            );
        }
    }
}

#[test]
fn tampered_content_hash_is_caught_after_decryption() {
    let tmp = tempfile::tempdir().unwrap();
    let w = standard(&backup_dir(&tmp));
    edit_json(&w.metadata_path("tiny"), |m| {
        m["code_manifest"]["content_hash"] = json!(hex::encode([0xABu8; 32]));
    });
    let b = axon::open(&w.dir).unwrap();
    let err = decrypt_with(find(&b, "tiny", None), &w.key).unwrap_err();
    assert!(
        matches!(&err, AxonError::ContentHash { expected, .. } if *expected == hex::encode([0xABu8; 32])),
        "{err:?}"
    );
}

#[test]
fn several_recipients_each_find_their_envelope() {
    let tmp = tempfile::tempdir().unwrap();
    let w = Builder::new()
        .extra_recipient(other_key().to_public_key())
        .applet("shared", 5000)
        .data("shared", "dave", 100)
        .write(&backup_dir(&tmp));
    let b = axon::open(&w.dir).unwrap();
    for (item, written) in b.items.iter().zip(&w.items) {
        assert_eq!(item.manifest.encrypted_aes_keys.len(), 2);
        for key in [shared_key(), other_key()] {
            assert_eq!(*axon::unwrap_key(item, &key).unwrap(), written.aes_key);
            assert_eq!(decrypt_with(item, &key).unwrap(), written.plaintext);
        }
    }
}

#[test]
fn key_id_is_axons_md5_of_the_stripped_spki_pem() {
    for key in [shared_key(), other_key()] {
        let pk = key.to_public_key();
        let id = axon::key_id(&pk);
        assert_eq!(id, axon_key_id(&pk));
        assert_eq!(id.len(), 32);
        assert!(id
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
    }
}

/// Writes a small backup, applies `edit` to one of its files, and returns the
/// error `open` gives plus the path of the edited file.
fn open_after_edit(file: &str, edit: impl FnOnce(&mut Value)) -> (AxonError, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let w = Builder::new()
        .chunk_size(64)
        .applet("game", 100)
        .data("game", "alice", 10)
        .data("game", "bob", 10)
        .write(&backup_dir(&tmp));
    let path = match file {
        "metadata" => w.metadata_path("game"),
        "applet_data" => w.applet_data_path("game"),
        "backup_manifest" => w.backup_manifest_path(),
        f => panic!("{f}"),
    };
    edit_json(&path, edit);
    let err = axon::open(&w.dir).expect_err("open should refuse the edited backup");
    (err, path)
}

fn remove(v: &mut Value, pointer: &str, key: &str) {
    v.pointer_mut(pointer)
        .unwrap()
        .as_object_mut()
        .unwrap()
        .remove(key)
        .expect("field to remove");
}

#[test]
fn missing_or_malformed_fields_name_the_file_and_field() {
    type Edit = Box<dyn FnOnce(&mut Value)>;
    let cases: Vec<(&str, Edit, &str, &str)> = vec![
        (
            "metadata",
            Box::new(|v| remove(v, "", "code_manifest")),
            "code_manifest",
            "is missing",
        ),
        (
            "metadata",
            Box::new(|v| remove(v, "", "name")),
            "name",
            "is missing",
        ),
        (
            "metadata",
            Box::new(|v| v["code_manifest"] = Value::Null),
            "code_manifest",
            "is null",
        ),
        (
            "metadata",
            Box::new(|v| v["code_manifest"] = json!(17)),
            "code_manifest",
            "is not a JSON object",
        ),
        (
            "metadata",
            Box::new(|v| remove(v, "/code_manifest", "encryption_iv")),
            "code_manifest.encryption_iv",
            "is missing",
        ),
        (
            "metadata",
            Box::new(|v| remove(v, "/code_manifest", "content_hash")),
            "code_manifest.content_hash",
            "is missing",
        ),
        (
            "metadata",
            Box::new(|v| remove(v, "/code_manifest", "chunk_size")),
            "code_manifest.chunk_size",
            "is missing",
        ),
        (
            "metadata",
            Box::new(|v| remove(v, "/code_manifest", "chunk_hashes")),
            "code_manifest.chunk_hashes",
            "is missing",
        ),
        (
            "metadata",
            Box::new(|v| remove(v, "/code_manifest", "encrypted_aes_keys")),
            "code_manifest.encrypted_aes_keys",
            "is missing",
        ),
        (
            "metadata",
            Box::new(|v| v["code_manifest"]["chunk_hashes"][1] = json!("zz")),
            "code_manifest.chunk_hashes[1]",
            "64 hex",
        ),
        (
            "metadata",
            Box::new(|v| v["code_manifest"]["content_hash"] = json!("abcd")),
            "code_manifest.content_hash",
            "64 hex",
        ),
        (
            "metadata",
            Box::new(|v| v["code_manifest"]["chunk_size"] = json!(0)),
            "code_manifest.chunk_size",
            "positive",
        ),
        (
            "metadata",
            Box::new(|v| v["code_manifest"]["chunk_size"] = json!("262144")),
            "code_manifest.chunk_size",
            "positive",
        ),
        (
            "metadata",
            Box::new(|v| v["code_manifest"]["encryption_iv"] = json!("AAAAAAAAAAA=")),
            "code_manifest.encryption_iv",
            "16 bytes",
        ),
        (
            "metadata",
            Box::new(|v| v["code_manifest"]["encryption_iv"] = json!("not base64!")),
            "code_manifest.encryption_iv",
            "16 bytes",
        ),
        (
            "metadata",
            Box::new(|v| v["code_manifest"] = json!("{\"content_hash\": ")),
            "code_manifest",
            "not valid JSON",
        ),
        (
            "metadata",
            Box::new(|v| v["created_at"] = json!(12)),
            "created_at",
            "is not a string",
        ),
        (
            "applet_data",
            Box::new(|v| remove(v, "/0", "data_manifest")),
            "[0].data_manifest",
            "is missing",
        ),
        (
            "applet_data",
            Box::new(|v| remove(v, "/1", "owner_username")),
            "[1].owner_username",
            "is missing",
        ),
        (
            "applet_data",
            Box::new(|v| remove(v, "/1", "id")),
            "[1].id",
            "is missing",
        ),
        (
            "applet_data",
            Box::new(|v| remove(v, "/1/data_manifest", "encryption_iv")),
            "[1].data_manifest.encryption_iv",
            "is missing",
        ),
        (
            "applet_data",
            Box::new(|v| v[0]["data_manifest"]["chunk_hashes"][0] = json!(5)),
            "[0].data_manifest.chunk_hashes[0]",
            "not a string",
        ),
        (
            "applet_data",
            Box::new(|v| *v = json!({"not": "a list"})),
            "(top level)",
            "is not a list",
        ),
        (
            "backup_manifest",
            Box::new(|v| remove(v, "", "applets")),
            "applets",
            "is missing",
        ),
        (
            "backup_manifest",
            Box::new(|v| remove(v, "", "backup_date")),
            "backup_date",
            "is missing",
        ),
        (
            "backup_manifest",
            Box::new(|v| v["applets"] = json!(["game", 3])),
            "applets[1]",
            "is not a string",
        ),
    ];
    for (file, edit, field, problem) in cases {
        let (err, path) = open_after_edit(file, edit);
        match &err {
            AxonError::Field {
                path: p,
                field: f,
                problem: pr,
            } => {
                assert_eq!(p, &path, "{err}");
                assert_eq!(f, field, "{err}");
                assert!(pr.contains(problem), "{err}");
            }
            e => panic!("{field}: expected a field error, got {e:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains(&format!("`{field}`")),
            "{msg}"
        );
    }
}

#[test]
fn missing_metadata_file_and_bad_json_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let w = Builder::new().applet("game", 10).write(&backup_dir(&tmp));
    std::fs::write(w.metadata_path("game"), "{\"name\": \"game\",").unwrap();
    let err = axon::open(&w.dir).unwrap_err();
    assert!(
        matches!(&err, AxonError::Json { path, .. } if *path == w.metadata_path("game")),
        "{err:?}"
    );

    std::fs::remove_file(w.metadata_path("game")).unwrap();
    let err = axon::open(&w.dir).unwrap_err();
    assert!(
        matches!(&err, AxonError::Io { path, .. } if *path == w.metadata_path("game")),
        "{err:?}"
    );
    assert!(err.to_string().contains("metadata.json"), "{err}");
}

#[test]
fn manifest_as_json_string_or_object_parse_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let w = standard(&backup_dir(&tmp));
    let before = axon::open(&w.dir).unwrap();
    edit_json(&w.metadata_path(CHESS), |m| {
        m["code_manifest"] = json!(m["code_manifest"].to_string())
    });
    edit_json(&w.applet_data_path("tiny"), |d| {
        for e in d.as_array_mut().unwrap() {
            e["data_manifest"] = json!(e["data_manifest"].to_string());
        }
    });
    assert!(std::fs::read_to_string(w.metadata_path(CHESS))
        .unwrap()
        .contains("\"code_manifest\": \"{"));
    let after = axon::open(&w.dir).unwrap();
    for (a, b) in before.items.iter().zip(&after.items) {
        assert_eq!(a.manifest, b.manifest, "{}", a.label());
    }

    // A whole backup written with string manifests reads and decrypts.
    let tmp2 = tempfile::tempdir().unwrap();
    let w2 = Builder::new()
        .manifests_as_strings(true)
        .applet("game", 300_000)
        .data("game", "alice", 50)
        .write(&backup_dir(&tmp2));
    let b2 = axon::open(&w2.dir).unwrap();
    for (item, written) in b2.items.iter().zip(&w2.items) {
        assert_eq!(decrypt_with(item, &w2.key).unwrap(), written.plaintext);
    }
}

#[test]
fn unknown_fields_are_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let w = Builder::new()
        .extra_fields(true)
        .applet("game", 300_000)
        .data("game", "alice", 50)
        .write(&backup_dir(&tmp));
    let text = std::fs::read_to_string(w.metadata_path("game")).unwrap();
    assert!(text.contains("axon_future_field") && text.contains("\"compression\""));
    let b = axon::open(&w.dir).unwrap();
    assert_eq!(b.items.len(), 2);
    for (item, written) in b.items.iter().zip(&w.items) {
        assert!(axon::check_item(item)
            .unwrap()
            .iter()
            .all(|s| *s == ChunkState::Ok));
        assert_eq!(decrypt_with(item, &w.key).unwrap(), written.plaintext);
    }
}

#[test]
fn optional_fields_may_be_absent_and_ids_may_be_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let w = Builder::new()
        .applet("game", 10)
        .data("game", "alice", 10)
        .write(&backup_dir(&tmp));
    edit_json(&w.metadata_path("game"), |m| {
        for k in [
            "id",
            "description",
            "author_pubkey",
            "parameters",
            "is_local",
            "category",
            "created_at",
        ] {
            m.as_object_mut().unwrap().remove(k);
        }
    });
    edit_json(&w.applet_data_path("game"), |d| {
        d[0]["id"] = json!(42);
        d[0]["last_updated"] = Value::Null;
        d[0].as_object_mut().unwrap().remove("owner_pubkey");
    });
    for f in [
        "total_applets",
        "total_chunks",
        "total_data_instances",
        "total_high_scores",
    ] {
        edit_json(&w.backup_manifest_path(), |m| {
            m.as_object_mut().unwrap().remove(f);
        });
    }
    let b = axon::open(&w.dir).unwrap();
    assert_eq!(b.items[0].created_at, None);
    assert_eq!(b.items[1].created_at, None);
    assert_eq!(
        b.items[1].kind,
        AxonItemKind::AppletData {
            instance_id: "42".into(),
            owner_username: "alice".into()
        }
    );
    assert_eq!(
        decrypt_with(&b.items[1], &w.key).unwrap(),
        w.items[1].plaintext
    );
}

#[test]
fn applet_names_map_to_folder_names() {
    let tmp = tempfile::tempdir().unwrap();
    let names = [CHESS, "a/b/c", "two  spaces", "Café Ω ♞", "plain"];
    let mut builder = Builder::new();
    for name in names {
        builder = builder.applet(name, 100).data(name, "erin", 20);
    }
    let w = builder.write(&backup_dir(&tmp));
    for (name, folder) in [
        (CHESS, "Chess___Deluxe_Edition"),
        ("a/b/c", "a_b_c"),
        ("two  spaces", "two__spaces"),
        ("Café Ω ♞", "Café_Ω_♞"),
        ("plain", "plain"),
    ] {
        assert!(
            w.dir.join(folder).join("metadata.json").is_file(),
            "{folder}"
        );
        assert_eq!(folder_for(name), folder);
    }
    // Python's json.dump escapes non-ASCII, as the fixture does.
    assert!(std::fs::read_to_string(w.backup_manifest_path())
        .unwrap()
        .contains("Caf\\u00e9 \\u03a9 \\u265e"));

    let b = axon::open(&w.dir).unwrap();
    assert_eq!(b.items.len(), 2 * names.len());
    for (item, written) in b.items.iter().zip(&w.items) {
        assert_eq!(item.applet, written.applet);
        let folder = w.dir.join(folder_for(&written.applet));
        let sub = if written.owner.is_some() {
            folder.join("data_chunks").join("erin")
        } else {
            folder.join("chunks")
        };
        assert!(
            item.chunk_paths
                .iter()
                .all(|p| p.parent() == Some(sub.as_path())),
            "{:?}",
            item.chunk_paths
        );
        assert_eq!(decrypt_with(item, &w.key).unwrap(), written.plaintext);
    }
    assert_eq!(find(&b, "a/b/c", None).label(), "applet 'a/b/c'");
}

#[test]
fn applets_sharing_a_folder_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // Axon wrote both into a_b; the second overwrote the first's metadata.
    let w = Builder::new()
        .applet("a b", 10)
        .applet("a/b", 10)
        .write(&backup_dir(&tmp));
    let err = axon::open(&w.dir).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, AxonError::Field { field, .. } if field == "applets[1]"),
        "{err:?}"
    );
    assert!(
        msg.contains("\"a b\"") && msg.contains("\"a/b\"") && msg.contains("\"a_b\""),
        "{msg}"
    );
}

#[test]
fn metadata_name_must_match_the_listed_applet() {
    let tmp = tempfile::tempdir().unwrap();
    let w = Builder::new().applet("game", 10).write(&backup_dir(&tmp));
    edit_json(&w.metadata_path("game"), |m| {
        m["name"] = json!("other game")
    });
    let err = axon::open(&w.dir).unwrap_err();
    assert!(
        matches!(&err, AxonError::Field { field, path, .. } if field == "name" && *path == w.metadata_path("game")),
        "{err:?}"
    );
    assert!(err.to_string().contains("\"other game\""), "{err}");
}

#[test]
fn names_that_escape_the_backup_are_refused() {
    for bad in ["..", ".", ""] {
        let tmp = tempfile::tempdir().unwrap();
        let w = Builder::new()
            .applet("game", 10)
            .data("game", "alice", 10)
            .write(&backup_dir(&tmp));
        edit_json(&w.applet_data_path("game"), |d| {
            d[0]["owner_username"] = json!(bad)
        });
        let err = axon::open(&w.dir).unwrap_err();
        assert!(
            matches!(&err, AxonError::Field { field, .. } if field == "[0].owner_username"),
            "{bad:?}: {err:?}"
        );

        let tmp = tempfile::tempdir().unwrap();
        let w = Builder::new().applet("game", 10).write(&backup_dir(&tmp));
        edit_json(&w.backup_manifest_path(), |m| m["applets"] = json!([bad]));
        let err = axon::open(&w.dir).unwrap_err();
        assert!(
            matches!(&err, AxonError::Field { field, .. } if field == "applets[0]"),
            "{bad:?}: {err:?}"
        );
    }
}

#[test]
fn pieces_need_not_end_on_a_block_boundary() {
    for chunk_size in [1000, 7, 16, 17] {
        let tmp = tempfile::tempdir().unwrap();
        let w = Builder::new()
            .chunk_size(chunk_size)
            .applet("game", 5000)
            .applet("small", 3)
            .data("game", "alice", 0)
            .write(&backup_dir(&tmp));
        let b = axon::open(&w.dir).unwrap();
        for (item, written) in b.items.iter().zip(&w.items) {
            assert_eq!(item.manifest.chunk_size, chunk_size as u32);
            assert!(axon::check_item(item)
                .unwrap()
                .iter()
                .all(|s| *s == ChunkState::Ok));
            assert_eq!(
                decrypt_with(item, &w.key).unwrap(),
                written.plaintext,
                "chunk_size {chunk_size}, {}",
                item.label()
            );
        }
    }
}

#[test]
fn a_manifest_without_pieces_cannot_decrypt() {
    let tmp = tempfile::tempdir().unwrap();
    let w = Builder::new().applet("game", 10).write(&backup_dir(&tmp));
    edit_json(&w.metadata_path("game"), |m| {
        m["code_manifest"]["chunk_hashes"] = json!([])
    });
    let b = axon::open(&w.dir).unwrap();
    assert_eq!(axon::check_item(&b.items[0]).unwrap(), vec![]);
    let err = decrypt_to_vec(&b.items[0], &w.items[0].aes_key).unwrap_err();
    assert!(matches!(err, AxonError::BadItem { .. }), "{err:?}");
}

#[test]
fn a_failing_writer_is_reported() {
    struct Full;
    impl std::io::Write for Full {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "disk full",
            ))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = Builder::new().applet("game", 100).write(&backup_dir(&tmp));
    let b = axon::open(&w.dir).unwrap();
    let err = axon::decrypt_item(&b.items[0], &w.items[0].aes_key, &mut Full).unwrap_err();
    assert!(matches!(err, AxonError::Output { .. }), "{err:?}");
    assert!(err.to_string().contains("disk full"));
}

#[test]
fn fixture_content_is_not_trivially_repetitive() {
    let c = content("x", 4096);
    assert_ne!(c[..2048], c[2048..]);
    assert!(c.iter().collect::<std::collections::BTreeSet<_>>().len() > 200);
}

// Produced once with pyca/cryptography 48 (the library Axon BBS uses), following
// Axon's BitSyncService.create_encrypted_content: json.dumps(..., sort_keys=True),
// AES-256-CBC + PKCS7, RSA-OAEP(MGF1-SHA256, SHA256, no label), MD5 key id of the
// stripped SPKI PEM. A throwaway test key, used for nothing else.
const KAT_PRIVATE_KEY_PEM: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIIEvwIBADANBgkqhkiG9w0BAQEFAASCBKkwggSlAgEAAoIBAQCypNqONSwjVWRp\n\
svm0GIMPViebwFvcwzz+SoymyyA5N2o19NNAP9LA9IXGGt3K5qV4RlrA7hpa52EW\n\
g9/iZg9a+16xOyHaUIf9+/4p3GfvQy3Hb6ADQgK1Uw01nPSPb1qLnpaQqC97ftGC\n\
LKz7KVRwiralECVPzk6P+og8e/VkStgtBiIYRH1N7W9AaBY6A40XFmqk0FNpkFmA\n\
5jbfrVwJAuDEzqh6lk1DG311BybGHAbOQNLFaEgC1CTR+1Eewm/Cg82H2BV4paqh\n\
gs+z0PKlEhzb6kGvvwQ1Fp0c6G4VnzVdu25ueVWVD/2owprz7Vo0jz5cRYRBV52I\n\
8CZUbV6pAgMBAAECggEABai+V424BVarfwz8y7L+X5blST+3641P7suaJGjyZiEL\n\
GHuM9qaxOl6rg8ecdUuP/CY9jdL/bWEkIUH/t7FdWYWH0nCy7nKE28cUp0/CPiEp\n\
bUZ+ce0eTHz9lCu/hpXYXOxsFiEfiM5zs0Lz1b7jwJOnN8XERfd4vyc/XGLeLYen\n\
v3DSFuTrL17tm1RQfu3Li4G7T8JnN9FKLWKNJuqDuRS4m/tdqb4HqVsdL9N82OlC\n\
DMuAnQBkaAwnMMzgmT47QF1Tzz9X94aqfDLfyo9Umpc9WWFBWpbVcxNY8PAERySf\n\
Mw1sK8VSJNrOegh9C7UYb5cIVy6sweiFyL6Ae2rOZQKBgQDagohw4ISlhcX1JAbq\n\
5fJBKvCPi2FueiPyZRZeuaOvDqg3RWrkZY9rZAadnLLnS1j0lktu7iKK5OXDRF9R\n\
aHs6hmkV9bgLM8oNtKbwp+qMCKM/3C7F7lcQjIicXbCadl0N9Z2cdRV3y3DyhIyH\n\
euZdVDCb+nl2g7bMB2j+HJJT5QKBgQDRS1C/TjwDRhX6l5dfD6qX4eWXRbxemXod\n\
8rD/5/eRStrDn2QgdiSkY+Kbp4oUytU8x5aEG38CRyg0fWz4LgfoYVaFmHTkt0Df\n\
p+GTU3lS4xuQKLuFSXdXxf9Xt/YZXj5a78eQurhP01edxime/kiTALKiDlnh8Epu\n\
SiZIwmZ7dQKBgQCcai5DJuStG/pdhaGSCnKEpbk3990R2UrcG/KMcjSyfjp5/i4L\n\
OowUorB9qIsEOJJ/2wo6aSq+5CV4xvu4aaM0fLzCpHdPRY5Qi02pHXovLYu2jeXJ\n\
d9hJF2A/Fm3x0+K+uGBPfByW+UFryOhTnu1CR57YOM8zwAtdN7y3kjpI5QKBgQCU\n\
+ZAzbAOprOSOKAM2Rhd+3uumvpuzlnlnAc3digcdY3POVRFXTeENJpAxjZLq8+nO\n\
xp6r0Eqam33Rxwmeql00mryUgY2LE6nYyU32qS8twbxn46Z+3GlXj/cOQEKrkfq+\n\
jfi2W0JAh8XQ5zHPG18bTB7a3W47Neg1ExCnL8D01QKBgQCSZxcfoFbCIWt0408F\n\
lqU7YWz9wXSOuohFuD1Ljx0O10OCzmmmXafspaPfBnyxuUtAvkc9QitFnIsdwVKF\n\
hdNhumXuL3gZi9m1aJOvX5CfLt2y1RM5esY128gIZwklxXPXovxWmfR4vVECUmLR\n\
9NV2Ae0zWVebJb5lSAYcmRHVyg==\n\
-----END PRIVATE KEY-----\n";
const KAT_KEY_ID: &str = "c73ee289cd94ddb8d36bd56304d9627f";
const KAT_PLAINTEXT: &str =
    r#"{"board": "chess", "moves": ["e4", "e5", "Nf3"], "note": "caf\u00e9 \u2014 known answer"}"#;
const KAT_CIPHERTEXT_HEX: &str = "a95fa1426de538c4cc06c2ac4c61330318497aef134c1c3391a67424219466adb06794c99aadb601dfbb7ceb7e058cc6e91f63215994838fa0d403ef100a941ccb26cd0d9a8b5be7c52ac9c39b9c5c7496a79e2dff7a4d8cc8b64e8daed35c67";
const KAT_CODE_MANIFEST: &str = r#"{"content_hash": "0fdceaffac0f8141e5f64401af209ad56f7f284f7b8ff2364a16de4565650426", "chunk_size": 262144, "chunk_hashes": ["3fe8602f02dd61488d291d1209fc4462e63d5480385df42ba8f2be3cfea9e283"], "encryption_iv": "anGoTWkRmef2N8cYveZUZA==", "encrypted_aes_keys": {"c73ee289cd94ddb8d36bd56304d9627f": "c6E0RG0by4kUehVjtBMxj5ODgMi0lsSU/K3qiuYbVuOkuBvCOLRJ1Hiu9b5I57e9YiE8rSbzhCEi0DDhX8AQmAscuJe0guYRB3yh3bEYmXUnoR8g8jBAuyPOAOiv69nY09sQC1acKv4taCTKaZEOyWHyxWkfzqufGq3bS7qs41ge2top0HOTT+YsEf5fCgPSngxSOip4sye55c6DFRsDK3pQbDZW8TtsKCe4baOGle6i3Al/UicypFYPJ0RSxuD5sNXI99BiOdAjC0th/pCv25rmXixthA0LHvipuEd6A0/hwBI0nwhMy5SYOm7/+aOlEiuU9CtGCV1dyXWGJdS/jg=="}}"#;

/// A backup holding content exactly as Axon's Python stack encrypts it.
#[test]
fn known_answer_from_pyca_cryptography() {
    use rsa::pkcs8::DecodePrivateKey;
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(KAT_PRIVATE_KEY_PEM).unwrap();
    assert_eq!(axon::key_id(&key.to_public_key()), KAT_KEY_ID);

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("backup_20250101_000000");
    let folder = dir.join("Known_Answer");
    std::fs::create_dir_all(folder.join("chunks")).unwrap();
    std::fs::write(
        dir.join("backup_manifest.json"),
        r#"{"backup_date": "20250101_000000", "total_applets": 1, "total_chunks": 1,
            "total_data_instances": 0, "total_high_scores": 0, "applets": ["Known Answer"]}"#,
    )
    .unwrap();
    std::fs::write(
        folder.join("metadata.json"),
        format!(r#"{{"id": "0b6f5a52-8a7e-4a58-9d3e-3f0f3d8d1c11", "name": "Known Answer", "code_manifest": {KAT_CODE_MANIFEST}}}"#),
    )
    .unwrap();
    std::fs::write(
        folder.join("chunks/0.chunk"),
        hex::decode(KAT_CIPHERTEXT_HEX).unwrap(),
    )
    .unwrap();

    let b = axon::open(&dir).unwrap();
    assert_eq!(b.items.len(), 1);
    assert_eq!(axon::check_item(&b.items[0]).unwrap(), vec![ChunkState::Ok]);
    let plain = decrypt_with(&b.items[0], &key).unwrap();
    assert_eq!(plain, KAT_PLAINTEXT.as_bytes());
}
