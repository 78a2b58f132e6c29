//! Blind peers (issue 14, PROTOCOL.md §2.1): a node trusted `blind` holds,
//! verifies and serves an instance it cannot read. Real nodes, real
//! processes: A publishes, M joins with an `invite --blind` token, clones
//! and then mirrors A, and can read nothing of what it stores; the trust
//! level is the operator's to set, shown by `peer ls` and Admin; and a
//! schema-3 database made by the bitsync before trust levels migrates in place.

use std::fs;
use std::path::{Path, PathBuf};

use bitsync::crypto::{ContentId, Hash};
use bitsync::keyring::ENVELOPE_FORMAT;
use bitsync::proto::{GetLinkEnvelopesRequest, GetManifestsRequest, ListPeersRequest};
use bitsync::store::{Level, PeerState};
use tempfile::TempDir;
use tonic::Code;

use crate::support::*;

mod relay;

/// The exit code of `get` on an item held without a key (src/error.rs).
const NO_KEY_EXIT: i32 = 11;

/// A CLI data dir with small chunks, so items span several chunk files.
fn init_cli(dir: &Path) -> String {
    let id = ok_at(dir, &["init"]).last_line();
    set_chunk_size(dir, 4096);
    id
}

/// `put` of `bytes` under `name` on `dir`; the content id.
fn put_cli(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let f = dir.with_extension(format!("{name}.in"));
    fs::write(&f, bytes).unwrap();
    let id = ok_at(dir, &["put", f.to_str().unwrap(), "--name", name]).last_line();
    fs::remove_file(&f).unwrap();
    id
}

/// `peer ls --json` on `dir`, the entry of `id`.
fn peer_entry(dir: &Path, id: &str) -> serde_json::Value {
    let o = ok_at(dir, &["peer", "ls", "--json"]);
    let v: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    v.into_iter()
        .find(|p| p["node_id"] == id)
        .unwrap_or_else(|| panic!("{id} not in peer ls: {o:?}"))
}

/// How many rows `sql` (a `SELECT count(*)`) counts in `dir`'s database.
fn count(dir: &Path, sql: &str, param: &str) -> i64 {
    db_read_only(dir)
        .query_row(sql, [param], |r| r.get(0))
        .unwrap()
}

/// Every file under `dir` (database, WAL, chunks, config, keys) holding `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    walk(dir)
        .into_iter()
        .filter(|p| {
            let b = fs::read(p).unwrap_or_default();
            b.windows(needle.len()).any(|w| w == needle)
        })
        .collect()
}

/// What M must never hold of an item: windows of its plaintext, its name,
/// and its key.
fn secrets_of(plain: &[u8], name: &str, key: &[u8]) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = [0, plain.len() / 2, plain.len() - 48]
        .iter()
        .map(|&at| plain[at..at + 48].to_vec())
        .collect();
    v.push(name.as_bytes().to_vec());
    v.push(key.to_vec());
    v
}

/// No envelope for the node `?1` (in a node's `envelopes` table).
const ENV_FOR: &str = "SELECT count(*) FROM envelopes WHERE recipient = ?1";
/// Link keys made by another node for `?1` (a node's own `L(self→self)` is
/// nobody's gift).
const LINKS_FOR: &str = "SELECT count(*) FROM link_keys WHERE recipient = ?1 AND sender != ?1";

/// A publishing A (served) and M, which joined it with a blind token and
/// cloned it; the items are (content id, name, plaintext).
struct BlindScene {
    tmp: TempDir,
    a_dir: PathBuf,
    m_dir: PathBuf,
    a_hex: String,
    m_hex: String,
    items: Vec<(String, String, Vec<u8>)>,
    a: Serve,
}

impl BlindScene {
    fn new() -> BlindScene {
        bitsync::tls::install_crypto_provider();
        let tmp = TempDir::new().unwrap();
        let (a_dir, m_dir) = (tmp.path().join("a"), tmp.path().join("m"));
        let a_hex = init_cli(&a_dir);
        let items = (0..3u64)
            .map(|i| {
                let name = format!("secret-name-{i}-9f3c.txt");
                let plain = data(100 + i, 20_000 + 3_000 * i as usize);
                (put_cli(&a_dir, &name, &plain), name, plain)
            })
            .collect();
        let a = Serve::start(&a_dir);
        let m_hex = ok_at(&m_dir, &["init"]).last_line();
        let scene = BlindScene {
            tmp,
            a_dir,
            m_dir,
            a_hex,
            m_hex,
            items,
            a,
        };
        let token = ok_at(&scene.a_dir, &["invite", "--blind"]).last_line();
        let o = scene.clone_with(&scene.m_dir, &token);
        assert!(o.text().contains("cloned 3 items"), "{o:?}");
        scene
    }

    /// `clone --token-file` of `token` on `dir`, required to succeed.
    fn clone_with(&self, dir: &Path, token: &str) -> Out {
        let tf = self.tmp.path().join("token");
        fs::write(&tf, token).unwrap();
        ok_at(dir, &["clone", "--token-file", tf.to_str().unwrap()])
    }

    /// The level is A's record of M, from the invite; M's role at A is
    /// what A's answers said; peer ls and Admin/ListPeers show them.
    async fn levels_and_roles(&self) {
        let (a_dir, m_dir, a_hex, m_hex) = (&self.a_dir, &self.m_dir, &self.a_hex, &self.m_hex);
        let pm = peer_entry(a_dir, m_hex);
        assert_eq!(
            (&pm["state"], &pm["level"]),
            (&"trusted".into(), &"blind".into())
        );
        assert_eq!(
            pm["role"],
            serde_json::Value::Null,
            "A fetched nothing of M"
        );
        let pa = peer_entry(m_dir, a_hex);
        assert_eq!(
            (&pa["level"], &pa["role"]),
            (&"keyed".into(), &"blind".into())
        );
        let table = ok_at(a_dir, &["peer", "ls"]).text();
        let row = table
            .lines()
            .find(|l| l.starts_with(m_hex.as_str()))
            .unwrap();
        assert!(row.contains("  trusted  blind  "), "{table}");
        let mut admin = admin_client(&self.a.socket()).await;
        let listed = admin
            .list_peers(ListPeersRequest {})
            .await
            .unwrap()
            .into_inner();
        let info = listed.peers.iter().find(|p| p.node_id == *m_hex).unwrap();
        assert_eq!(info.level, "blind");
    }

    /// M lists what the signed manifests say in the clear, never the names;
    /// `get` fails with the blind error and its exit code; `verify` passes.
    fn listing_get_and_verify(&self) {
        let ls = ls_json(&self.m_dir);
        assert_eq!(ls.len(), 3, "{ls:?}");
        for (id, _, plain) in &self.items {
            let it = ls.iter().find(|x| x["content_id"] == id.as_str()).unwrap();
            assert_eq!(
                (&it["blind"], &it["name"], &it["kind"]),
                (&true.into(), &"".into(), &"file".into()),
                "{it}"
            );
            assert_eq!(it["size"], plain.len() as u64);
            assert_eq!(it["publisher"], self.a_hex.as_str());
            assert!(it["seq"].as_u64().unwrap() > 0);
            assert_eq!(it["complete"], true);
        }
        let table = ok_at(&self.m_dir, &["ls"]).text();
        assert!(
            table.lines().next().unwrap().contains("SEQ  PUBLISHER"),
            "{table}"
        );
        assert_eq!(table.matches("(blind: no key)").count(), 3, "{table}");
        assert!(table.contains(&self.a_hex[..12]), "{table}");

        let out = self.tmp.path().join("out");
        let (id, _, plain) = &self.items[0];
        let o = at(&self.m_dir, &["get", id, "-o", out.to_str().unwrap()]);
        assert_eq!(o.code, NO_KEY_EXIT, "{o:?}");
        assert!(
            o.stderr
                .contains("no key: this node mirrors this item blind"),
            "{o:?}"
        );
        assert!(!out.exists());
        // A keyed node's get still works (A's own), so the code is M's verdict.
        assert_eq!(
            &ok_at(&self.a_dir, &["get", id]).stdout,
            plain,
            "A reads its item"
        );

        let o = ok_at(&self.m_dir, &["verify"]);
        assert!(o.stderr.contains("3 manifests: 0 problem(s)"), "{o:?}");
    }

    /// Nothing readable under M's data dir (no plaintext, no name, no item
    /// key), and no envelope or link key for M, on M or on A.
    fn nothing_readable_on_m(&self) {
        let (a_dir, m_dir, m_hex) = (&self.a_dir, &self.m_dir, &self.m_hex);
        let a_node = open(a_dir);
        for (id, name, plain) in &self.items {
            let cid: ContentId = Hash::parse(id, "content id").unwrap();
            let own = a_node.db().envelope(&cid, &self.a_hex).unwrap().unwrap();
            let key = a_node.open_envelope(&cid, &own).unwrap();
            for s in secrets_of(plain, name, key.as_bytes()) {
                let found = files_holding(m_dir, &s);
                assert!(found.is_empty(), "M holds a secret of {id} in {found:?}");
            }
        }
        // The search can fail: a file that does hold a plaintext is found.
        let probe = self.tmp.path().join("probe");
        fs::create_dir(&probe).unwrap();
        let (_, name, plain) = &self.items[2];
        fs::write(probe.join("x"), plain).unwrap();
        assert_eq!(
            files_holding(&probe, &secrets_of(plain, name, &[0; 32])[1]).len(),
            1
        );

        let all = |sql: &str| count(m_dir, sql, "x");
        assert_eq!(all("SELECT count(*) FROM envelopes WHERE ?1 = ?1"), 0);
        assert_eq!(all("SELECT count(*) FROM manifests WHERE ?1 = ?1"), 3);
        for dir in [m_dir, a_dir] {
            assert_eq!(count(dir, ENV_FOR, m_hex), 0, "{}", dir.display());
            assert_eq!(count(dir, LINKS_FOR, m_hex), 0, "{}", dir.display());
        }
    }

    /// M asking A for key material directly: GetLinkEnvelopes refused and
    /// logged; GetManifests, with an ML-KEM key offered, gives manifests
    /// and no envelope, and pins nothing; A will not rotate a link it never made.
    async fn key_material_refused(&self) {
        let m_node = open(&self.m_dir);
        let a_id = Hash::parse(&self.a_hex, "id").unwrap();
        let ch = within(20, "dialing A", dialer(&m_node).channel(a_id, &self.a.addr))
            .await
            .unwrap();
        let mut fed = bitsync::replicator::client(ch);
        let e = fed
            .get_link_envelopes(GetLinkEnvelopesRequest {})
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("blind peer"), "{e:?}");
        let short = &self.m_hex[..12];
        wait_for(10, "A to log the refusal", || {
            self.a
                .log()
                .lines()
                .any(|l| {
                    l.contains("refused GetLinkEnvelopes from a blind peer") && l.contains(short)
                })
                .then_some(())
        });
        let r = fed
            .get_manifests(GetManifestsRequest {
                content_ids: self.items.iter().map(|(id, _, _)| id.clone()).collect(),
                envelope_format: ENVELOPE_FORMAT,
                caller_kem_key: Some(m_node.signed_kem_key()),
                envelopes_only: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.caller_blind);
        // Asking for envelopes alone (PROTOCOL.md §2.4) is asking for keys.
        let e = fed
            .get_manifests(GetManifestsRequest {
                content_ids: vec![self.items[0].0.clone()],
                envelope_format: ENVELOPE_FORMAT,
                caller_kem_key: None,
                envelopes_only: true,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("blind peer"), "{e:?}");
        for x in &r.results {
            assert!(x.problem.is_none() && x.manifest.is_some(), "{x:?}");
            assert!(x.envelope.is_none(), "an envelope for a blind peer: {x:?}");
        }
        let pinned = "SELECT count(*) FROM peers WHERE node_id = ?1 AND kem_key IS NOT NULL";
        assert_eq!(count(&self.a_dir, pinned, &self.m_hex), 0);
        assert_eq!(count(&self.a_dir, ENV_FOR, &self.m_hex), 0);
        let o = at(&self.a_dir, &["peer", "rekey", &self.m_hex]);
        assert_eq!(o.code, 2, "{o:?}");
        assert!(o.stderr.contains("blind peer"), "{o:?}");
    }

    /// A corrupted chunk on M is caught by verify (exit 5, the chunk named).
    fn verify_catches_a_corrupted_chunk(&self) {
        let chunk = chunks_of(&self.m_dir, &self.items[1].0)[1].clone();
        let id = Hash::parse(&chunk, "chunk id").unwrap();
        flip_byte(&chunk_file(&self.m_dir.join("chunks"), &id), 10);
        let o = at(&self.m_dir, &["verify"]);
        assert_eq!(o.code, 5, "{o:?}");
        assert!(o.text().contains(&chunk), "{o:?}");
    }

    /// M mirrors A: a new item arrives through Watch, blind too; and a new
    /// keyed peer D cloning A (A re-keys every item for it, which moves each
    /// to a new seq) reaches M through Watch as D's envelopes, kept to relay.
    fn mirror_follows_a(&self) {
        let (m_dir, m_hex) = (&self.m_dir, &self.m_hex);
        ok_at(
            m_dir,
            &["peer", "add", &self.a_hex, &self.a.addr, "--mirror"],
        );
        let _m = Serve::start(m_dir);
        let table = ok_at(m_dir, &["status"]).text();
        let row = table
            .lines()
            .find(|l| l.starts_with(&self.a_hex[..12]))
            .unwrap();
        assert!(
            row.contains("  trusted  blind  yes  "),
            "M's role at A: {table}"
        );
        let plain = data(200, 9_000);
        let new_id = put_cli(&self.a_dir, "secret-name-new-9f3c.txt", &plain);
        let every = std::time::Duration::from_millis(300);
        wait_for_every(60, every, "the new item to reach M", || {
            let ls = ls_json(m_dir);
            let it = ls.iter().find(|x| x["content_id"] == new_id.as_str())?;
            (it["complete"] == true && it["blind"] == true).then_some(())
        });
        assert!(files_holding(m_dir, &plain[..48]).is_empty());
        assert_eq!(count(m_dir, ENV_FOR, m_hex), 0);
        assert_eq!(at(m_dir, &["get", &new_id]).code, NO_KEY_EXIT);

        let d_dir = self.tmp.path().join("d");
        let d_hex = ok_at(&d_dir, &["init"]).last_line();
        self.clone_with(&d_dir, &self.a.invite());
        wait_for_every(60, every, "D's envelopes to reach M", || {
            (count(m_dir, ENV_FOR, &d_hex) == 4).then_some(())
        });
        assert_eq!(count(m_dir, ENV_FOR, m_hex), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blind_mirror_stores_verifies_and_serves_what_it_cannot_read() {
    let scene = BlindScene::new();
    scene.levels_and_roles().await;
    scene.listing_get_and_verify();
    scene.nothing_readable_on_m();
    scene.key_material_refused().await;
    scene.verify_catches_a_corrupted_chunk();
    scene.mirror_follows_a();
}

#[test]
fn the_trust_level_is_the_operators_to_set() {
    bitsync::tls::install_crypto_provider();
    let tmp = TempDir::new().unwrap();
    let s_dir = tmp.path().join("s");
    let s = new_node(&s_dir);
    let p = fresh(&tmp, "p");
    let p_hex = p.id().to_hex();
    drop(s);

    // peer add --blind, shown by peer ls; a plain re-add keeps the level.
    ok_at(&s_dir, &["peer", "add", &p_hex, "127.0.0.1:1", "--blind"]);
    assert_eq!(peer_entry(&s_dir, &p_hex)["level"], "blind");
    ok_at(&s_dir, &["peer", "add", &p_hex, "127.0.0.1:2"]);
    assert_eq!(peer_entry(&s_dir, &p_hex)["level"], "blind");
    let o = ok_at(&s_dir, &["peer", "set-level", &p_hex, "keyed"]);
    assert!(o.stderr.contains("is now keyed"), "{o:?}");
    assert_eq!(peer_entry(&s_dir, &p_hex)["level"], "keyed");
    // Malformed: usage (2); not a peer: NOT_FOUND (3).
    assert_eq!(at(&s_dir, &["peer", "set-level", &p_hex, "half"]).code, 2);
    let stranger = "cd".repeat(32);
    assert_eq!(
        at(&s_dir, &["peer", "set-level", &stranger, "blind"]).code,
        3
    );

    // A keyed peer with a known key gets envelopes at put; made blind, it
    // loses every envelope and link key made for it and gets none again.
    let s = open(&s_dir);
    s.db().set_peer_key(&p.id(), p.identity().spki()).unwrap();
    let first = put(&s, "one", &data(1, 5000));
    assert!(s.db().envelope(&first, &p_hex).unwrap().is_some());
    let links = "SELECT count(*) FROM link_keys WHERE recipient = ?1";
    assert_eq!(count(&s_dir, links, &p_hex), 1);
    let peer = s.db().set_peer_level(&p.id(), Level::Blind).unwrap();
    assert_eq!((peer.state, peer.level), (PeerState::Trusted, Level::Blind));
    assert!(s.db().envelope(&first, &p_hex).unwrap().is_none());
    assert_eq!(count(&s_dir, links, &p_hex), 0);
    let second = put(&s, "two", &data(2, 5000));
    assert!(s.db().envelope(&second, &p_hex).unwrap().is_none());
    assert_eq!(count(&s_dir, links, &p_hex), 0);
    assert_eq!(s.db().trust_level(&p.id()).unwrap(), Some(Level::Blind));
    // Keyed again: envelopes for it at the next put.
    s.db().set_peer_level(&p.id(), Level::Keyed).unwrap();
    let third = put(&s, "three", &data(3, 5000));
    assert!(s.db().envelope(&third, &p_hex).unwrap().is_some());
    // Revoked: no level grants anything.
    s.db().revoke_peer(&p.id()).unwrap();
    assert_eq!(s.db().trust_level(&p.id()).unwrap(), None);
}

/// The sealed key of tests/fixtures/schema3 opens with this (its README).
const FIXTURE_PASS: &str = "throwaway-fixture-passphrase";
const SCHEMA3: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/schema3/s");

#[test]
fn a_schema_3_database_migrates_to_trust_levels_in_place() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("s");
    fs::create_dir(&dir).unwrap();
    for f in walk(Path::new(SCHEMA3)) {
        let to = dir.join(f.strip_prefix(SCHEMA3).unwrap());
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::copy(&f, &to).unwrap();
    }
    fs::rename(dir.join("node.key.sealed"), dir.join("node.key")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for f in ["node.key", "node.mlkem"] {
        fs::set_permissions(dir.join(f), fs::Permissions::from_mode(0o600)).unwrap();
    }
    let columns = |table: &str| -> Vec<String> {
        let c = db_read_only(&dir);
        let mut st = c.prepare(&format!("PRAGMA table_info({table})")).unwrap();
        st.query_map([], |r| r.get::<_, String>(1))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    };
    let version = || -> String {
        db_read_only(&dir)
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert_eq!(version(), "3", "the fixture is a schema-3 database");
    assert!(!columns("peers").contains(&"level".to_string()));
    assert!(!columns("invites").contains(&"level".to_string()));

    let run = |args: &[&str]| {
        let o = run(bitsync(&dir)
            .env("BITSYNC_PASSPHRASE", FIXTURE_PASS)
            .args(args));
        assert_eq!(o.code, 0, "{args:?}: {o:?}");
        o
    };
    // The first open migrates; the old peer and invite are what they were: keyed.
    let o = run(&["peer", "ls", "--json"]);
    let peers: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    let old = "ab".repeat(32);
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0]["node_id"], old.as_str());
    assert_eq!(
        (&peers[0]["state"], &peers[0]["level"], &peers[0]["name"]),
        (&"trusted".into(), &"keyed".into(), &"old-peer".into())
    );
    assert_eq!(version(), "4");
    assert!(columns("peers").contains(&"level".to_string()));
    assert!(columns("invites").contains(&"level".to_string()));
    assert!(columns("relayed_links").contains(&"sender_spki".to_string()));
    assert!(columns("peers").contains(&"role".to_string()));
    assert_eq!(peers[0]["role"], serde_json::Value::Null, "not known yet");
    let c = db_read_only(&dir);
    let invite_levels: Vec<String> = c
        .prepare("SELECT level FROM invites")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(invite_levels, ["keyed"], "the unused invite stays keyed");
    drop(c);
    // The items still read, and the new column takes only the two levels.
    let got = run(&[
        "get",
        "67def844f00409fb63571496e17cafd6f4312cdedaad87cf32fdfee0df540fab",
    ]);
    assert_eq!(got.stdout, "schema three item 1\n".repeat(50).into_bytes());
    run(&["verify"]);
    run(&["peer", "set-level", &old, "blind"]);
    assert_eq!(
        run(&["peer", "ls", "--json"])
            .text()
            .matches("\"blind\"")
            .count(),
        1
    );
    let w = rusqlite::Connection::open(dir.join("bitsync.db")).unwrap();
    assert!(w
        .execute("UPDATE peers SET level = 'half' WHERE node_id = ?1", [&old])
        .is_err());
    drop(w);
    // A second open changes nothing more.
    run(&["ls"]);
    assert_eq!(version(), "4");
}
