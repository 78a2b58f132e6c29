//! The federation surface, end to end: real nodes served in-process on
//! loopback ports, real SQLite files and chunk dirs, and clients that dial
//! them through the node's own `Dialer` (mutual TLS pinned to node ids) with
//! the identity of another real node.
//!
//! Every wait is bounded: a broken node fails a test, it never hangs it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitsync::crypto::{self, ContentId, Hash, NodeId};
use bitsync::invite::Invite;
use bitsync::keyring::ENVELOPE_FORMAT;
use bitsync::manifest::{now_ms, Manifest};
use bitsync::node::Node;
use bitsync::proto::federation_client::FederationClient;
use bitsync::proto::*;
use bitsync::replicator::{self, Client};
use bitsync::server::RunningNode;
use bitsync::store::PeerState;
use prost::Message;
use tempfile::TempDir;
use tonic::Code;

use crate::support::*;

// ---- helpers ---------------------------------------------------------------

/// Settings written into a test node's config.toml.
#[derive(Clone)]
struct Cfg {
    chunk_size: u32,
    list_page_max: u32,
    max_chunks_per_request: u32,
    max_streams_per_peer: u32,
}

impl Default for Cfg {
    fn default() -> Self {
        Cfg {
            chunk_size: 4096,
            list_page_max: 1000,
            max_chunks_per_request: 4096,
            max_streams_per_peer: 16,
        }
    }
}

impl Cfg {
    fn toml(&self) -> String {
        format!(
            "name = \"\"\nchunk_size = {}\n[limits]\nlist_page_max = {}\nmax_chunks_per_request = {}\nmax_streams_per_peer = {}\nrequest_timeout_secs = 30\n",
            self.chunk_size, self.list_page_max, self.max_chunks_per_request, self.max_streams_per_peer
        )
    }
}

/// A real data dir (`bitsync init`), with `cfg` as its config.toml, opened.
fn make_node(cfg: &Cfg) -> (TempDir, Node) {
    bitsync::tls::install_crypto_provider();
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("node");
    let n = new_node_with_config(&dir, &cfg.toml());
    (tmp, n)
}

/// A node serving Federation on 127.0.0.1:0 and Admin on its socket.
async fn serve_node(cfg: &Cfg) -> (TempDir, RunningNode) {
    let (tmp, n) = make_node(cfg);
    (tmp, crate::support::node::serve(n).await)
}

fn server_node(s: &RunningNode) -> &Node {
    &s.state.node
}

fn trust(server: &RunningNode, peer: &NodeId) {
    server_node(server)
        .db()
        .upsert_peer(peer, "", "", PeerState::Trusted, false)
        .unwrap();
}

/// A Federation client of `server`, authenticated as `caller`.
async fn connect(caller: &Node, server: &RunningNode) -> Client {
    let ch = within(
        20,
        "connecting",
        dialer(caller).channel(server_node(server).id(), &server.listen_address.to_string()),
    )
    .await
    .expect("dialing the test node");
    replicator::client(ch)
}

/// Chunks of the large items in the streaming tests: 128 of 512 KiB. 64 MiB is
/// far more than HTTP/2 flow control lets a server push ahead of its reader
/// (the node's client windows are a few MiB; even 16 MiB windows leave most
/// of the item unsent), so these streams are still running when the test acts.
const LARGE_CHUNK: u32 = 512 * 1024;
const LARGE_CHUNKS: usize = 128;

fn db_conn(n: &Node) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(n.paths().db()).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c
}

fn envelope_rows(n: &Node, item: &ContentId, recipient: Option<&NodeId>) -> i64 {
    let c = db_conn(n);
    match recipient {
        Some(r) => c
            .query_row(
                "SELECT COUNT(*) FROM envelopes WHERE content_id = ?1 AND recipient = ?2",
                [item.to_hex(), r.to_hex()],
                |r| r.get(0),
            )
            .unwrap(),
        None => c
            .query_row(
                "SELECT COUNT(*) FROM envelopes WHERE content_id = ?1",
                [item.to_hex()],
                |r| r.get(0),
            )
            .unwrap(),
    }
}

fn code_of<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error status, got {v:?}"),
        Err(s) => s.code(),
    }
}

/// Read a whole chunk stream (bounded).
async fn drain_chunks(
    s: &mut tonic::Streaming<ChunkData>,
) -> Result<Vec<ChunkData>, tonic::Status> {
    let mut out = Vec::new();
    loop {
        match within(30, "a chunk message", s.message()).await? {
            Some(m) => out.push(m),
            None => return Ok(out),
        }
    }
}

/// One ListManifests page (the call must succeed).
async fn list_page(fed: &mut Client, after_seq: u64, limit: u32) -> ListManifestsResponse {
    fed.list_manifests(ListManifestsRequest { after_seq, limit })
        .await
        .unwrap()
        .into_inner()
}

/// GetManifests of `content_ids` (the call must succeed).
async fn get_manifests(fed: &mut Client, content_ids: Vec<String>) -> GetManifestsResponse {
    fed.get_manifests(GetManifestsRequest {
        content_ids,
        envelope_format: ENVELOPE_FORMAT,
        caller_kem_key: None,
        envelopes_only: false,
    })
    .await
    .unwrap()
    .into_inner()
}

/// The chunk stream of `chunk_ids` (the call must succeed).
async fn open_chunks(fed: &mut Client, chunk_ids: Vec<String>) -> tonic::Streaming<ChunkData> {
    fed.stream_chunks(StreamChunksRequest { chunk_ids })
        .await
        .unwrap()
        .into_inner()
}

/// The code a StreamChunks call of `chunk_ids` is refused with.
async fn stream_chunks_code(fed: &mut Client, chunk_ids: Vec<String>) -> Code {
    code_of(
        fed.stream_chunks(StreamChunksRequest { chunk_ids })
            .await
            .map(|_| ()),
    )
}

/// Read a chunk stream whose first chunk has arrived until `cause` cuts it
/// (each message within `secs`, pausing `pause` after each, a slow reader):
/// the status it ends with and the chunks it delivered. Running to the end fails.
async fn read_until_cut(
    st: &mut tonic::Streaming<ChunkData>,
    secs: u64,
    cause: &str,
    pause: Duration,
) -> (tonic::Status, usize) {
    let what = format!("the chunk stream to be cut by {cause}");
    let mut got = 1;
    loop {
        match within(secs, &what, st.message()).await {
            Ok(Some(_)) => got += 1,
            Ok(None) => panic!("the chunk stream ran to the end ({got} chunks) despite {cause}"),
            Err(e) => return (e, got),
        }
        tokio::time::sleep(pause).await;
    }
}

/// A server whose chunks are `LARGE_CHUNK` bytes, holding one item of
/// `LARGE_CHUNKS` chunks (data seed `seed`), and a caller it trusts.
struct LargeItem {
    _dirs: (TempDir, TempDir),
    s: RunningNode,
    a: Node,
    item: ContentId,
    /// The item's chunk ids, in order.
    ids: Vec<String>,
}

async fn large_item(seed: u64) -> LargeItem {
    let cfg = Cfg {
        chunk_size: LARGE_CHUNK,
        ..Cfg::default()
    };
    let (s_dir, s) = serve_node(&cfg).await;
    let (a_dir, a) = make_node(&Cfg::default());
    trust(&s, &a.id());
    let item = put(
        server_node(&s),
        "large",
        &data(seed, LARGE_CHUNKS * LARGE_CHUNK as usize),
    );
    let (m, _) = server_node(&s).db().manifest(&item).unwrap().unwrap();
    let ids = m.chunk_ids().map(|c| c.to_hex()).collect();
    LargeItem {
        _dirs: (s_dir, a_dir),
        s,
        a,
        item,
        ids,
    }
}

fn manifest_of(r: &ManifestResult) -> Manifest {
    let sm = r.manifest.as_ref().unwrap_or_else(|| {
        panic!(
            "result for {} has no manifest: {:?}",
            r.content_id, r.problem
        )
    });
    Manifest::from_signed(sm.body.clone(), sm.signature.clone()).expect("the manifest verifies")
}

// ---- listing ---------------------------------------------------------------

/// Pages are capped by `list_page_max`, follow the seq cursor, and never skip
/// an item, even while items are added and re-keyed between pages; an item
/// whose envelopes changed is listed again at its new seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_never_skip_while_items_are_added() {
    let cfg = Cfg {
        list_page_max: 7,
        ..Cfg::default()
    };
    let (_s_dir, s) = serve_node(&cfg).await;
    let (_a_dir, a) = make_node(&Cfg::default());
    trust(&s, &a.id());

    // Published before A's key is known, so A's envelopes come just in time.
    let mut published: Vec<ContentId> = (0..20)
        .map(|i| put(server_node(&s), &format!("early {i}"), &data(i, 100)))
        .collect();
    let mut fed = connect(&a, &s).await;

    let hello = fed.hello(HelloRequest {}).await.unwrap().into_inner();
    assert_eq!(hello.node_id, server_node(&s).id().to_hex());
    assert!(hello.allowed.contains(&"fetch".to_string()), "{hello:?}");

    // A writer adds 30 more items while the client pages.
    let node = s.state.node.clone();
    let writer = tokio::task::spawn_blocking(move || {
        (20..50u64)
            .map(|i| {
                std::thread::sleep(Duration::from_millis(3));
                put(&node, &format!("late {i}"), &data(i, 100))
            })
            .collect::<Vec<_>>()
    });

    let mut cursor = 0u64;
    let mut listings: HashMap<String, Vec<u64>> = HashMap::new();
    let mut rekeyed: HashMap<String, u64> = HashMap::new(); // id -> seq GetManifests reported
    let mut pages = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "listing did not converge");
        let page = list_page(&mut fed, cursor, 1000).await;
        pages += 1;
        assert!(
            page.manifests.len() <= 7,
            "page of {} over list_page_max 7",
            page.manifests.len()
        );
        let mut prev = cursor;
        for m in &page.manifests {
            assert!(m.seq > prev, "seqs must rise: {} after {prev}", m.seq);
            prev = m.seq;
            listings
                .entry(m.content_id.clone())
                .or_default()
                .push(m.seq);
        }
        if let Some(last) = page.manifests.last() {
            assert_eq!(page.next_after_seq, last.seq);
        } else {
            assert_eq!(
                page.next_after_seq, cursor,
                "an empty page keeps the cursor"
            );
            assert!(!page.more);
        }
        // After the first page, re-key the first three items (already passed).
        if pages == 1 {
            let ids: Vec<String> = page
                .manifests
                .iter()
                .take(3)
                .map(|m| m.content_id.clone())
                .collect();
            let r = get_manifests(&mut fed, ids).await;
            for res in r.results {
                assert!(res.problem.is_none(), "{:?}", res.problem);
                rekeyed.insert(res.content_id.clone(), res.seq);
            }
        }
        cursor = page.next_after_seq;
        if page.manifests.is_empty() && writer.is_finished() {
            break;
        }
        if page.manifests.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    published.extend(within(30, "the writer", writer).await.unwrap());
    // One more pass: the writer may have committed after our last empty page.
    loop {
        let page = list_page(&mut fed, cursor, 0).await;
        for m in &page.manifests {
            listings
                .entry(m.content_id.clone())
                .or_default()
                .push(m.seq);
        }
        cursor = page.next_after_seq;
        if !page.more {
            break;
        }
    }
    assert!(
        pages > 50 / 7,
        "the listing must have taken several pages, took {pages}"
    );

    for id in &published {
        assert!(
            listings.contains_key(&id.to_hex()),
            "item {id} was skipped by the cursor"
        );
    }
    assert_eq!(
        listings.len(),
        published.len(),
        "listed ids that were never published"
    );
    assert_eq!(rekeyed.len(), 3);
    for (id, new_seq) in &rekeyed {
        let seqs = &listings[id];
        assert_eq!(
            seqs.len(),
            2,
            "re-keyed item {id} must be listed again, was listed at {seqs:?}"
        );
        assert_eq!(
            seqs[1], *new_seq,
            "listed again at the seq GetManifests reported"
        );
        assert!(seqs[1] > seqs[0]);
    }
    for (id, seqs) in &listings {
        if !rekeyed.contains_key(id) {
            assert_eq!(
                seqs.len(),
                1,
                "item {id} listed {} times without changing",
                seqs.len()
            );
        }
    }

    // A fresh listing from zero with the default page size: each item once.
    let mut all = Vec::new();
    let mut c = 0;
    loop {
        let page = list_page(&mut fed, c, 0).await;
        assert!(page.manifests.len() <= 7);
        all.extend(page.manifests.iter().map(|m| m.content_id.clone()));
        c = page.next_after_seq;
        if !page.more {
            break;
        }
    }
    assert_eq!(all.len(), 50);
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 50);
    assert_eq!(c, server_node(&s).db().head_seq().unwrap());
    s.shutdown().await;
}

// ---- just-in-time re-keying -------------------------------------------------

/// Three nodes: a server and two callers. Each (item, caller) gets exactly one
/// envelope, made once; the caller can open it and decrypt the item; a second
/// fetch does no RSA work (the same randomized OAEP bytes come back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jit_rekey_makes_one_envelope_per_item_and_peer() {
    let (_s_dir, s) = serve_node(&Cfg::default()).await;
    let (_a_dir, a) = make_node(&Cfg::default());
    let (_b_dir, b) = make_node(&Cfg::default());
    trust(&s, &a.id());
    trust(&s, &b.id());
    let contents: Vec<Vec<u8>> = (0..5)
        .map(|i| data(100 + i, 3 * 4096 + 17 * i as usize))
        .collect();
    let items: Vec<ContentId> = contents
        .iter()
        .enumerate()
        .map(|(i, c)| put(server_node(&s), &format!("item-{i}.bin"), c))
        .collect();
    let ids: Vec<String> = items.iter().map(|i| i.to_hex()).collect();
    for it in &items {
        assert_eq!(
            envelope_rows(server_node(&s), it, None),
            1,
            "only the server's own envelope so far"
        );
    }
    let head0 = server_node(&s).db().head_seq().unwrap();

    let fa1 = connect(&a, &s).await;
    let fa2 = connect(&a, &s).await;
    let fb = connect(&b, &s).await;
    // A asks twice at once (two connections), B at the same time.
    let req = || GetManifestsRequest {
        content_ids: ids.clone(),
        envelope_format: ENVELOPE_FORMAT,
        caller_kem_key: None,
        envelopes_only: false,
    };
    let (ra1, ra2, rb) = within(60, "concurrent GetManifests", async {
        let (mut x, mut y, mut z) = (fa1.clone(), fa2.clone(), fb.clone());
        tokio::join!(
            x.get_manifests(req()),
            y.get_manifests(req()),
            z.get_manifests(req())
        )
    })
    .await;
    let (ra1, ra2, rb) = (
        ra1.unwrap().into_inner(),
        ra2.unwrap().into_inner(),
        rb.unwrap().into_inner(),
    );
    assert_eq!(ra1.results.len(), 5);

    for (i, it) in items.iter().enumerate() {
        assert_eq!(
            envelope_rows(server_node(&s), it, Some(&a.id())),
            1,
            "one envelope row for (item {i}, A)"
        );
        assert_eq!(
            envelope_rows(server_node(&s), it, Some(&b.id())),
            1,
            "one envelope row for (item {i}, B)"
        );
        assert_eq!(envelope_rows(server_node(&s), it, None), 3);
        let (x, y, z) = (&ra1.results[i], &ra2.results[i], &rb.results[i]);
        assert_eq!(x.content_id, ids[i], "results come in request order");
        let ea = x.envelope.as_ref().unwrap();
        assert_eq!(ea.recipient, a.id().to_hex());
        assert_eq!(
            ea.wrapped_key,
            y.envelope.as_ref().unwrap().wrapped_key,
            "both of A's calls got the stored envelope"
        );
        let stored = server_node(&s)
            .db()
            .envelope(it, &a.id().to_hex())
            .unwrap()
            .unwrap();
        assert_eq!(stored, ea.wrapped_key);

        // A opens its envelope and decrypts the metadata; B's envelope is not A's.
        let m = manifest_of(x);
        assert_eq!(m.id(), *it);
        let key = open_envelope(&a, &mut fa1.clone(), it, &ea.wrapped_key)
            .await
            .expect("A unwraps its envelope");
        let meta = ItemMeta::decode(
            crypto::decrypt_meta(&key, &m.body().encrypted_meta)
                .unwrap()
                .as_slice(),
        )
        .unwrap();
        assert_eq!(meta.name, format!("item-{i}.bin"));
        let eb = z.envelope.as_ref().unwrap();
        assert_eq!(eb.recipient, b.id().to_hex());
        assert!(
            a.open_envelope(it, &eb.wrapped_key).is_err(),
            "A must not open B's envelope"
        );
        assert!(open_envelope(&b, &mut fb.clone(), it, &eb.wrapped_key)
            .await
            .is_ok());
    }
    // One seq bump per (item, peer) that was re-keyed: 5 items x 2 peers.
    let head1 = server_node(&s).db().head_seq().unwrap();
    assert_eq!(head1, head0 + 10);

    // A decrypts a whole item with the key and the streamed chunks.
    let m = manifest_of(&ra1.results[4]);
    let key = a
        .open_envelope(
            &m.id(),
            &ra1.results[4].envelope.as_ref().unwrap().wrapped_key,
        )
        .unwrap();
    let chunk_ids: Vec<String> = m.chunk_ids().map(|c| c.to_hex()).collect();
    let mut st = open_chunks(&mut fa1.clone(), chunk_ids).await;
    let msgs = drain_chunks(&mut st).await.unwrap();
    let n = msgs.len();
    let mut plain = Vec::new();
    for (i, msg) in msgs.iter().enumerate() {
        assert!(msg.problem.is_none());
        plain.extend(crypto::decrypt_chunk(&key, i as u64, i + 1 == n, &msg.data).unwrap());
    }
    assert_eq!(plain, contents[4]);

    // Second fetch: the stored bytes again (OAEP is randomized, so a re-wrap
    // would differ), and no seq moves.
    let seqs: Vec<u64> = items
        .iter()
        .map(|i| server_node(&s).db().manifest(i).unwrap().unwrap().1)
        .collect();
    let again = fa1.clone().get_manifests(req()).await.unwrap().into_inner();
    for ((x, y), seq) in ra1.results.iter().zip(&again.results).zip(&seqs) {
        assert_eq!(
            x.envelope.as_ref().unwrap().wrapped_key,
            y.envelope.as_ref().unwrap().wrapped_key
        );
        assert_eq!(y.seq, *seq, "the item's seq did not move");
    }
    assert_eq!(
        server_node(&s).db().head_seq().unwrap(),
        head1,
        "a cached fetch changes nothing"
    );
    s.shutdown().await;
}

/// One item the server cannot re-key (its own envelope is gone), one unknown
/// and one malformed id: each gets its own problem, the rest succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_manifests_reports_per_item_problems() {
    let (_s_dir, s) = serve_node(&Cfg::default()).await;
    let (_a_dir, a) = make_node(&Cfg::default());
    trust(&s, &a.id());
    let items: Vec<ContentId> = (0..4)
        .map(|i| put(server_node(&s), &format!("p{i}"), &data(200 + i, 5000)))
        .collect();
    let broken = items[2];
    let n = db_conn(server_node(&s))
        .execute(
            "DELETE FROM envelopes WHERE content_id = ?1 AND recipient = ?2",
            [broken.to_hex(), server_node(&s).id().to_hex()],
        )
        .unwrap();
    assert_eq!(n, 1);
    let unknown = Hash::of(b"no such item");
    let mut ids: Vec<String> = items.iter().map(|i| i.to_hex()).collect();
    ids.insert(1, unknown.to_hex());
    ids.push("not-a-content-id".into());

    let mut fed = connect(&a, &s).await;
    let r = get_manifests(&mut fed, ids.clone()).await;
    assert_eq!(r.results.len(), ids.len());
    for (res, id) in r.results.iter().zip(&ids) {
        assert_eq!(&res.content_id, id, "results in request order");
        if *id == broken.to_hex() {
            let p = res
                .problem
                .as_ref()
                .expect("the un-rekeyable item has a problem");
            assert_eq!(p.code, Code::NotFound as i32, "{p:?}");
            assert!(p.message.contains("key"), "{p:?}");
            // The manifest comes along, flagged no_key, for the caller to
            // keep awaiting a key (PROTOCOL.md §2.3); never an envelope.
            assert!(res.no_key && res.envelope.is_none(), "{res:?}");
            assert_eq!(manifest_of(res).id(), broken);
        } else if *id == unknown.to_hex() {
            assert_eq!(res.problem.as_ref().unwrap().code, Code::NotFound as i32);
        } else if id == "not-a-content-id" {
            assert_eq!(
                res.problem.as_ref().unwrap().code,
                Code::InvalidArgument as i32
            );
        } else {
            assert!(res.problem.is_none(), "{id}: {:?}", res.problem);
            let m = manifest_of(res);
            open_envelope(
                &a,
                &mut fed,
                &m.id(),
                &res.envelope.as_ref().unwrap().wrapped_key,
            )
            .await
            .unwrap();
            assert_eq!(m.id().to_hex(), *id);
        }
    }
    assert_eq!(
        envelope_rows(server_node(&s), &broken, Some(&a.id())),
        0,
        "no envelope was made for the broken item"
    );
    s.shutdown().await;
}

// ---- chunks ----------------------------------------------------------------

/// 1,000 chunks in one call, all verified and in request order; unknown ids
/// come back as per-chunk NOT_FOUND without breaking the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_chunks_delivers_1000_chunks_and_reports_unknown_ids() {
    let (_s_dir, s) = serve_node(&Cfg::default()).await; // 4096-byte chunks
    let (_a_dir, a) = make_node(&Cfg::default());
    trust(&s, &a.id());
    let plain = data(300, 1000 * 4096 - 123);
    let item = put(server_node(&s), "big", &plain);
    let mut fed = connect(&a, &s).await;
    let r = get_manifests(&mut fed, vec![item.to_hex()]).await;
    let m = manifest_of(&r.results[0]);
    assert_eq!(m.chunk_count(), 1000);
    let key = open_envelope(
        &a,
        &mut fed,
        &m.id(),
        &r.results[0].envelope.as_ref().unwrap().wrapped_key,
    )
    .await
    .unwrap();

    let mut ids: Vec<String> = m.chunk_ids().map(|c| c.to_hex()).collect();
    let unknown: Vec<String> = (0..3)
        .map(|i| Hash::of(format!("unknown {i}").as_bytes()).to_hex())
        .collect();
    ids.insert(0, unknown[0].clone());
    ids.insert(501, unknown[1].clone());
    ids.push(unknown[2].clone());
    let mut st = open_chunks(&mut fed, ids.clone()).await;
    let msgs = drain_chunks(&mut st)
        .await
        .expect("the stream ends cleanly");
    assert_eq!(msgs.len(), 1003);
    let mut out = Vec::new();
    let mut idx = 0u64;
    for (msg, id) in msgs.iter().zip(&ids) {
        assert_eq!(&msg.chunk_id, id, "chunks come in request order");
        if unknown.contains(id) {
            let p = msg.problem.as_ref().expect("unknown id has a problem");
            assert_eq!(p.code, Code::NotFound as i32);
            assert!(msg.data.is_empty());
            continue;
        }
        assert!(msg.problem.is_none(), "{:?}", msg.problem);
        assert_eq!(
            Hash::of(&msg.data).to_hex(),
            *id,
            "chunk bytes match their id"
        );
        out.extend(crypto::decrypt_chunk(&key, idx, idx == 999, &msg.data).unwrap());
        idx += 1;
    }
    assert_eq!(out, plain);
    s.shutdown().await;
}

/// A chunk altered on the server's disk is a per-chunk DATA_LOSS, moved to
/// quarantine and forgotten, so it is never served (NOT_FOUND next time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_chunk_is_data_loss_and_quarantined() {
    let (_s_dir, s) = serve_node(&Cfg::default()).await;
    let (_a_dir, a) = make_node(&Cfg::default());
    trust(&s, &a.id());
    let item = put(server_node(&s), "three", &data(400, 3 * 4096));
    let (m, _) = server_node(&s).db().manifest(&item).unwrap().unwrap();
    let chunks: Vec<Hash> = m.chunk_ids().collect();
    let bad = chunks[1];
    let path = server_node(&s).chunks().file(&bad).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();

    let mut fed = connect(&a, &s).await;
    let ids: Vec<String> = chunks.iter().map(|c| c.to_hex()).collect();
    let mut st = open_chunks(&mut fed, ids.clone()).await;
    let msgs = drain_chunks(&mut st).await.unwrap();
    assert_eq!(msgs.len(), 3);
    assert!(
        msgs[0].problem.is_none() && msgs[2].problem.is_none(),
        "the good chunks still arrive"
    );
    let p = msgs[1]
        .problem
        .as_ref()
        .expect("the altered chunk has a problem");
    assert_eq!(p.code, Code::DataLoss as i32, "{p:?}");
    assert!(msgs[1].data.is_empty(), "bad bytes are never sent");
    assert!(!path.exists(), "the bad chunk left the chunk dir");
    assert!(
        server_node(&s)
            .paths()
            .quarantine()
            .join(bad.to_hex())
            .exists(),
        "the bad chunk is in quarantine"
    );
    assert!(
        !server_node(&s).db().has_chunk(&bad).unwrap(),
        "the bad chunk is no longer present"
    );

    let mut st = open_chunks(&mut fed, vec![ids[1].clone()]).await;
    let msgs = drain_chunks(&mut st).await.unwrap();
    assert_eq!(
        msgs[0].problem.as_ref().unwrap().code,
        Code::NotFound as i32
    );
    s.shutdown().await;
}

// ---- trust -----------------------------------------------------------------

/// A node that is not a peer, and a revoked one, are refused on every call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_and_revoked_callers_are_denied() {
    let (_s_dir, s) = serve_node(&Cfg::default()).await;
    let (_c_dir, c) = make_node(&Cfg::default());
    let (_r_dir, r) = make_node(&Cfg::default());
    let item = put(server_node(&s), "secret", &data(500, 100));
    trust(&s, &r.id());
    server_node(&s).db().revoke_peer(&r.id()).unwrap();
    for caller in [&c, &r] {
        let mut fed = connect(caller, &s).await;
        assert_eq!(
            code_of(fed.hello(HelloRequest {}).await),
            Code::PermissionDenied
        );
        let e = fed
            .list_manifests(ListManifestsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(
            e.message().contains(&caller.id().to_hex()),
            "the refusal names the caller: {}",
            e.message()
        );
        assert_eq!(
            code_of(
                fed.get_manifests(GetManifestsRequest {
                    content_ids: vec![item.to_hex()],
                    envelope_format: ENVELOPE_FORMAT,
                    caller_kem_key: None,
                    envelopes_only: false,
                })
                .await
            ),
            Code::PermissionDenied
        );
        assert_eq!(
            stream_chunks_code(&mut fed, vec![item.to_hex()]).await,
            Code::PermissionDenied
        );
        assert_eq!(
            code_of(fed.watch(WatchRequest::default()).await.map(|_| ())),
            Code::PermissionDenied
        );
        assert_eq!(
            code_of(fed.get_instance_config(GetInstanceConfigRequest {}).await),
            Code::PermissionDenied
        );
    }
    assert_eq!(
        envelope_rows(server_node(&s), &item, None),
        1,
        "nothing was re-keyed for them"
    );
    s.shutdown().await;
}

/// Revoking a peer (through Admin, as the operator does) cuts its open Watch
/// and StreamChunks streams and refuses new calls on the same open channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_cuts_open_streams() {
    // Far more than flow control lets the server push ahead (see LARGE_CHUNKS),
    // so the stream is still running when the revocation lands.
    let LargeItem {
        _dirs,
        s,
        a,
        item,
        ids,
    } = large_item(600).await;

    let mut fed = connect(&a, &s).await;
    let mut watch = fed
        .watch(WatchRequest { after_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    let first = within(10, "the first watch event", watch.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.kind, watch_event::Kind::Item as i32);
    assert_eq!(first.content_id, item.to_hex());
    let mut chunks = open_chunks(&mut fed, ids).await;
    let c0 = within(10, "the first chunk", chunks.message())
        .await
        .unwrap()
        .unwrap();
    assert!(c0.problem.is_none());

    let revoked = admin_client(&s.admin_socket)
        .await
        .revoke_peer(RevokePeerRequest {
            node_id: a.id().to_hex(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.state, "revoked");

    // The chunk stream ends with PERMISSION_DENIED before delivering everything.
    let (status, got) = read_until_cut(&mut chunks, 15, "the revocation", Duration::ZERO).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        got < LARGE_CHUNKS,
        "only what was already in flight arrives, got {got}"
    );

    // The watch stream says REVOKED, then ends.
    let mut saw_revoked = false;
    loop {
        match within(15, "the watch stream to be cut", watch.message()).await {
            Ok(Some(ev)) if ev.kind == watch_event::Kind::Revoked as i32 => saw_revoked = true,
            Ok(Some(ev)) => assert!(!saw_revoked, "an event after REVOKED: {ev:?}"),
            Ok(None) => break,
            Err(e) => panic!("the watch stream should end cleanly after REVOKED, got {e:?}"),
        }
    }
    assert!(
        saw_revoked,
        "the watch stream ended without a REVOKED event"
    );

    // The channel is still open, but every new call is refused.
    assert_eq!(
        code_of(fed.hello(HelloRequest {}).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code_of(fed.list_manifests(ListManifestsRequest::default()).await),
        Code::PermissionDenied
    );
    s.shutdown().await;
}

/// Dialing a trusted address but expecting another node id: the node there
/// presents a different key, and the handshake fails as PermissionDenied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_node_id_fails_the_handshake() {
    let (_s_dir, s) = serve_node(&Cfg::default()).await;
    let (_t_dir, t) = serve_node(&Cfg::default()).await;
    let (_a_dir, a) = make_node(&Cfg::default());
    trust(&s, &a.id());
    trust(&t, &a.id());
    // A believes S lives at T's address.
    let err = within(
        20,
        "the handshake",
        dialer(&a).channel(server_node(&s).id(), &t.listen_address.to_string()),
    )
    .await
    .expect_err("the handshake must fail");
    assert_eq!(err.kind(), bitsync::error::Kind::Denied, "{err}");
    assert!(
        err.to_string().contains(&server_node(&s).id().to_hex()),
        "{err}"
    );
    // The right pairing works.
    let mut fed = connect(&a, &t).await;
    fed.hello(HelloRequest {}).await.unwrap();
    s.shutdown().await;
    t.shutdown().await;
}

/// A server that answers the ClientHello out of order (a Finished message
/// before any ServerHello) is a broken or hostile endpoint, not the wrong
/// node: UNAVAILABLE, although rustls' message ("unexpected message ... when
/// expecting ServerHello") reads like a refused certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbled_handshake_is_unavailable_not_denied() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_a_dir, a) = make_node(&Cfg::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut hello = [0u8; 512];
        let _ = sock.read(&mut hello).await;
        // Handshake record, TLS 1.2 framing: Finished (20) with 32 bytes.
        let mut record = vec![0x16, 0x03, 0x03, 0x00, 36, 20, 0, 0, 32];
        record.extend([0u8; 32]);
        sock.write_all(&record).await.unwrap();
        let _ = sock.read(&mut hello).await;
    });
    let err = within(20, "the handshake", dialer(&a).channel(a.id(), &address))
        .await
        .expect_err("the handshake must fail");
    assert!(err.to_string().contains("unexpected"), "{err}");
    assert_eq!(err.kind(), bitsync::error::Kind::Unavailable, "{err}");
    server.abort();
}

/// An invite works once, then is refused as UNAUTHENTICATED, and an expired
/// one is refused as UNAUTHENTICATED too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invite_works_once_then_fails_and_expires() {
    let (_s_dir, s) = serve_node(&Cfg::default()).await;
    let (_j_dir, j) = make_node(&Cfg::default());
    let (_k_dir, k) = make_node(&Cfg::default());

    let resp = admin_client(&s.admin_socket)
        .await
        .create_invite(CreateInviteRequest {
            ttl_seconds: 600,
            blind: false,
        })
        .await
        .unwrap()
        .into_inner();
    let inv = Invite::decode(&resp.token).unwrap();
    assert_eq!(inv.node_id, server_node(&s).id());
    assert_eq!(inv.addresses, vec![s.listen_address.to_string()]);
    assert!(inv.expires_at_ms > now_ms() + 500_000);
    let join = |secret: String| JoinRequest {
        secret,
        name: "joiner".into(),
        address: "127.0.0.1:9".into(),
    };

    // J is not trusted yet; it joins with the secret from the token.
    let mut fj = connect(&j, &s).await;
    assert_eq!(
        code_of(fj.hello(HelloRequest {}).await),
        Code::PermissionDenied
    );
    let r = fj.join(join(inv.secret_text())).await.unwrap().into_inner();
    assert_eq!(r.node_id, server_node(&s).id().to_hex());
    fj.hello(HelloRequest {})
        .await
        .expect("J is trusted after joining");
    let p = server_node(&s).db().peer(&j.id()).unwrap().unwrap();
    assert_eq!(p.state, PeerState::Trusted);
    assert_eq!(
        p.public_key.as_deref(),
        Some(j.identity().spki()),
        "the joiner's key was recorded from TLS"
    );
    assert_eq!(p.name, "joiner");

    // Used: refused for anyone, the joiner included.
    let mut fk = connect(&k, &s).await;
    let e = fk.join(join(inv.secret_text())).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(
        code_of(fj.join(join(inv.secret_text())).await),
        Code::Unauthenticated
    );
    assert!(!server_node(&s).db().is_trusted(&k.id()).unwrap());

    // Expired (stored directly with an expiry in the past).
    let old = Invite::new(
        server_node(&s).id(),
        vec![s.listen_address.to_string()],
        now_ms() - 1000,
    );
    server_node(&s)
        .db()
        .create_invite(
            &old.secret_hash(),
            old.expires_at_ms,
            bitsync::store::Level::Keyed,
        )
        .unwrap();
    let e = fk.join(join(old.secret_text())).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("expired"), "{e:?}");

    // Expired through Admin with a 1-second TTL.
    let short = admin_client(&s.admin_socket)
        .await
        .create_invite(CreateInviteRequest {
            ttl_seconds: 1,
            blind: false,
        })
        .await
        .unwrap()
        .into_inner();
    let short = Invite::decode(&short.token).unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(
        code_of(fk.join(join(short.secret_text())).await),
        Code::Unauthenticated
    );

    // A made-up secret, and a malformed one.
    let fake = Invite::new(server_node(&s).id(), vec!["x:1".into()], now_ms() + 60_000);
    assert_eq!(
        code_of(fk.join(join(fake.secret_text())).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code_of(fk.join(join("%%%".into())).await),
        Code::Unauthenticated
    );
    assert!(
        !server_node(&s).db().is_trusted(&k.id()).unwrap(),
        "K never got in"
    );
    s.shutdown().await;
}

// ---- TLS without a node certificate ----------------------------------------

#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client that presents no certificate, offering only `version`.
fn anonymous_tls(version: &'static rustls::SupportedProtocolVersion) -> Arc<rustls::ClientConfig> {
    let p = bitsync::tls::provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[version])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(p)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

async fn anonymous_channel(
    addr: std::net::SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let cfg = cfg.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = rustls::pki_types::ServerName::try_from("bitsync").unwrap();
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    tonic::transport::Endpoint::from_static("http://bitsync.test")
        .connect_with_connector(connector)
        .await
}

/// No client certificate: the handshake completes (client auth is optional),
/// and every Federation call, Join included, is UNAUTHENTICATED. TLS 1.2 is
/// not offered at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_certificate_is_unauthenticated() {
    let (_s_dir, s) = serve_node(&Cfg::default()).await;
    let ch = within(
        20,
        "an anonymous connection",
        anonymous_channel(s.listen_address, anonymous_tls(&rustls::version::TLS13)),
    )
    .await
    .expect("TLS 1.3 without a client certificate connects");
    let mut fed = FederationClient::new(ch);
    let e = fed.hello(HelloRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("certificate"), "{e:?}");
    assert_eq!(
        code_of(fed.list_manifests(ListManifestsRequest::default()).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code_of(fed.join(JoinRequest::default()).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code_of(fed.watch(WatchRequest::default()).await.map(|_| ())),
        Code::Unauthenticated
    );

    let tls12 = within(
        20,
        "a TLS 1.2 attempt",
        anonymous_channel(s.listen_address, anonymous_tls(&rustls::version::TLS12)),
    )
    .await;
    assert!(
        tls12.is_err(),
        "a TLS 1.2-only client must not get a connection"
    );
    s.shutdown().await;
}

// ---- limits ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_resource_exhausted() {
    let cfg = Cfg {
        max_chunks_per_request: 8,
        max_streams_per_peer: 2,
        ..Cfg::default()
    };
    let (_s_dir, s) = serve_node(&cfg).await;
    let (_a_dir, a) = make_node(&Cfg::default());
    let (_b_dir, b) = make_node(&Cfg::default());
    trust(&s, &a.id());
    trust(&s, &b.id());
    let mut fa = connect(&a, &s).await;
    let mut fb = connect(&b, &s).await;

    // Too many chunk ids in one request; exactly the limit is fine.
    let ids = |n: usize| {
        (0..n)
            .map(|i| Hash::of(format!("c{i}").as_bytes()).to_hex())
            .collect::<Vec<_>>()
    };
    let e = fa
        .stream_chunks(StreamChunksRequest { chunk_ids: ids(9) })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains('8'),
        "the error names the limit: {e:?}"
    );
    let mut st = open_chunks(&mut fa, ids(8)).await;
    assert_eq!(drain_chunks(&mut st).await.unwrap().len(), 8);
    // A malformed chunk id fails the whole call.
    assert_eq!(
        stream_chunks_code(&mut fa, vec!["zz".into()]).await,
        Code::InvalidArgument
    );
    // Too many manifests in one GetManifests.
    let e = fa
        .get_manifests(GetManifestsRequest {
            content_ids: ids(1001),
            envelope_format: ENVELOPE_FORMAT,
            caller_kem_key: None,
            envelopes_only: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);

    // Concurrent streams per peer: two open watches use A's slots.
    let w1 = fa
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let _w2 = fa
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let e = fa
        .watch(WatchRequest::default())
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(
        stream_chunks_code(&mut fa, ids(1)).await,
        Code::ResourceExhausted
    );
    // The limit is per peer: B is unaffected.
    let _wb = fb
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    // Closing a stream frees its slot (bounded wait).
    drop(w1);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match fa.watch(WatchRequest::default()).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("the slot of a closed stream was never freed: {e:?}"),
        }
    }
    s.shutdown().await;
}

// ---- instance config -------------------------------------------------------

fn key_pem(n: &Node) -> String {
    std::fs::read_to_string(n.paths().key()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_config_holds_no_key_material() {
    let (_s_dir, s) = serve_node(&Cfg::default()).await;
    let (_a_dir, a) = make_node(&Cfg::default());
    let (_b_dir, b) = make_node(&Cfg::default());
    trust(&s, &a.id());
    server_node(&s)
        .db()
        .upsert_peer(&b.id(), "bee", "127.0.0.1:7", PeerState::Trusted, true)
        .unwrap();
    server_node(&s)
        .db()
        .set_setting("instance.motto", "hello")
        .unwrap();
    let mut fa = connect(&a, &s).await;
    fa.hello(HelloRequest {}).await.unwrap(); // records A's key on the server
    let cfg = fa
        .get_instance_config(GetInstanceConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cfg.node_id, server_node(&s).id().to_hex());
    assert_eq!(
        cfg.settings.get("instance.motto").map(String::as_str),
        Some("hello")
    );
    let bee = cfg
        .peers
        .iter()
        .find(|p| p.node_id == b.id().to_hex())
        .expect("peer B is listed");
    assert_eq!(
        (
            bee.name.as_str(),
            bee.address.as_str(),
            bee.state.as_str(),
            bee.mirror
        ),
        ("bee", "127.0.0.1:7", "trusted", true)
    );
    assert!(cfg.peers.iter().any(|p| p.node_id == a.id().to_hex()));

    let text = format!("{cfg:?}");
    let wire = cfg.encode_to_vec();
    assert!(
        !text.to_uppercase().contains("PRIVATE"),
        "no field may mention a private key: {text}"
    );
    for pem in [key_pem(server_node(&s)), key_pem(&a), key_pem(&b)] {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(
            !text.contains(&body[..64]),
            "a private key leaked into the instance config"
        );
        let der = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(&body)
                .unwrap()
        };
        assert!(
            !wire.windows(64).any(|w| der.windows(64).next() == Some(w)),
            "private key bytes on the wire"
        );
    }
    for (k, v) in &cfg.settings {
        assert!(
            !k.to_lowercase().contains("secret") && !v.contains("PRIVATE"),
            "{k} = {v}"
        );
    }
    s.shutdown().await;
}

// ---- shutdown ----------------------------------------------------------------

/// `RunningNode::shutdown` while a chunk stream is running: the stream is
/// ended promptly with UNAVAILABLE (CANCELLED is accepted too) instead of
/// holding the drain, the client never hangs, and shutdown returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_ends_an_active_stream() {
    let LargeItem {
        _dirs, s, a, ids, ..
    } = large_item(700).await;
    let addr = s.listen_address;
    let server_id = server_node(&s).id();

    let mut fed = connect(&a, &s).await;
    let mut st = open_chunks(&mut fed, ids).await;
    within(10, "the first chunk", st.message())
        .await
        .unwrap()
        .unwrap();

    let started = Instant::now();
    let stopping = tokio::spawn(s.shutdown());
    // A slow reader (20 ms a chunk: 2.6 s for the whole item) keeps reading.
    let (end, got) = read_until_cut(&mut st, 20, "the shutdown", Duration::from_millis(20)).await;
    assert!(
        matches!(end.code(), Code::Unavailable | Code::Cancelled),
        "the stream must end with UNAVAILABLE/CANCELLED, got {end:?} after {got} chunks"
    );
    assert!(got < LARGE_CHUNKS);
    within(20, "shutdown to return", stopping).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "shutdown took {:?}",
        started.elapsed()
    );

    // The node no longer answers.
    let again = within(20, "a call after shutdown", async {
        let ch = dialer(&a).channel(server_id, &addr.to_string()).await?;
        replicator::client(ch)
            .hello(HelloRequest {})
            .await
            .map_err(bitsync::Error::from)?;
        Ok::<_, bitsync::Error>(())
    })
    .await;
    assert!(again.is_err(), "a node that was shut down still answered");
}

/// A peer's input is quoted in errors only in part (issue 11, bug 7): a 1 MB
/// "chunk id" came back whole in `grpc-message`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_id_is_not_echoed_whole_in_errors() {
    let (_ts, server) = serve_node(&Cfg::default()).await;
    let (_tc, caller) = make_node(&Cfg::default());
    trust(&server, &caller.id());
    let mut fed = connect(&caller, &server).await;
    let huge = "z".repeat(1 << 20);
    let e = fed
        .stream_chunks(StreamChunksRequest {
            chunk_ids: vec![huge.clone()],
        })
        .await
        .expect_err("a 1 MB chunk id is refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let msg = e.message();
    assert!(
        msg.len() < 300,
        "{} bytes echoed: {}…",
        msg.len(),
        &msg[..200.min(msg.len())]
    );
    assert!(
        msg.contains("chunk id") && msg.contains("zzzz") && msg.contains("…"),
        "{msg}"
    );
    assert!(msg.contains(&format!("{} bytes", huge.len())), "{msg}");

    let r = fed
        .get_manifests(GetManifestsRequest {
            content_ids: vec![huge.clone()],
            envelope_format: ENVELOPE_FORMAT,
            caller_kem_key: None,
            envelopes_only: false,
        })
        .await;
    let text = match r {
        Err(s) => s.message().to_string(),
        Ok(r) => r.into_inner().results[0]
            .problem
            .as_ref()
            .expect("a malformed id has a problem")
            .message
            .clone(),
    };
    assert!(text.len() < 300, "{} bytes echoed in a problem", text.len());
    server.shutdown().await;
}
