//! The client side against a trusted but hostile (or broken) peer: a real
//! `bitsync clone` process dials, through the node's own mutual TLS, either a
//! real node serving items it published with a broken writer (chunks of the
//! wrong length, manifests that add up to more than a message), or a small
//! Federation server of this test that presents that node's key and relays
//! to it, misbehaving on purpose: it repeats pages, goes backwards,
//! advertises seqs no node can hold, stalls its streams, sends oversize
//! chunks. Every run is bounded (`CMD_TIMEOUT`): a loop or a hang fails the
//! test, it never holds it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bitsync::crypto::{self, ContentId, Hash, ItemKey, NodeId};

type ChunkId = Hash;
use bitsync::identity::Identity;
use bitsync::manifest::{self, ItemMeta, Manifest};
use bitsync::node::Node;
use bitsync::proto::federation_server::{Federation, FederationServer};
use bitsync::proto::*;
use bitsync::replicator::{self, Client};
use bitsync::server::RunningNode;
use bitsync::store::PeerState;
use futures::Stream;
use prost::Message;
use tempfile::TempDir;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::support::*;

const CHUNK: u32 = 4096;
/// The victim's `request_timeout_secs`: also how long a chunk stream may stay silent.
const TIMEOUT_SECS: u64 = 3;

// ---- the hostile peer --------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Debug)]
enum Misbehave {
    /// Always the first page again, saying more are ready.
    RepeatPage,
    /// Each page in reverse seq order, saying more are ready.
    Backwards,
    /// The last item of each page at seq 2^63 + 5.
    HugeSeq,
    /// StreamChunks: headers, then nothing.
    StallChunks,
    /// StreamChunks: the blobs given instead of the peer's own chunks.
    Oversize,
    /// Watch: headers, then nothing (no heartbeat).
    StallWatch,
    /// GetManifests: the manifests without the caller's envelopes, not
    /// saying the caller is blind.
    DropEnvelopes,
    /// GetManifests: the manifests without envelopes, saying the caller is
    /// blind (PROTOCOL.md §2.1).
    ClaimBlind,
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A Federation server relaying to a real node (as the victim, so envelopes
/// are the victim's), with a misbehaviour.
struct Hostile {
    up: Client,
    how: Arc<Mutex<Misbehave>>,
    lists: Arc<AtomicUsize>,
    watches: Arc<AtomicUsize>,
    /// Chunk id -> bytes sent for it in `Oversize` mode.
    blobs: Arc<HashMap<String, Vec<u8>>>,
}

impl Hostile {
    fn how(&self) -> Misbehave {
        *self.how.lock().unwrap()
    }
}

/// A running relay: where it listens, what it was asked, and its
/// misbehaviour, which the test may change while it runs.
struct Relay {
    addr: String,
    lists: Arc<AtomicUsize>,
    watches: Arc<AtomicUsize>,
    how: Arc<Mutex<Misbehave>>,
}

#[tonic::async_trait]
impl Federation for Hostile {
    type StreamChunksStream = Boxed<ChunkData>;
    type WatchStream = Boxed<WatchEvent>;

    async fn hello(&self, r: Request<HelloRequest>) -> Result<Response<HelloResponse>, Status> {
        self.up.clone().hello(r.into_inner()).await
    }
    async fn join(&self, _: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        Err(Status::unimplemented("no joining here"))
    }
    async fn list_manifests(
        &self,
        r: Request<ListManifestsRequest>,
    ) -> Result<Response<ListManifestsResponse>, Status> {
        self.lists.fetch_add(1, Ordering::Relaxed);
        let mut req = r.into_inner();
        let how = self.how();
        if how == Misbehave::RepeatPage {
            req.after_seq = 0;
        }
        let mut page = self.up.clone().list_manifests(req).await?.into_inner();
        match how {
            Misbehave::RepeatPage => page.more = true,
            Misbehave::Backwards => {
                page.manifests.reverse();
                page.more = true;
            }
            Misbehave::HugeSeq => {
                if let Some(last) = page.manifests.last_mut() {
                    last.seq = (1u64 << 63) + 5;
                    page.next_after_seq = last.seq;
                }
            }
            _ => {}
        }
        Ok(Response::new(page))
    }
    async fn get_manifests(
        &self,
        r: Request<GetManifestsRequest>,
    ) -> Result<Response<GetManifestsResponse>, Status> {
        let mut resp = self.up.clone().get_manifests(r.into_inner()).await?;
        let how = self.how();
        if matches!(how, Misbehave::DropEnvelopes | Misbehave::ClaimBlind) {
            let r = resp.get_mut();
            r.results.iter_mut().for_each(|x| x.envelope = None);
            r.caller_blind = how == Misbehave::ClaimBlind;
        }
        Ok(resp)
    }
    async fn get_link_envelopes(
        &self,
        r: Request<GetLinkEnvelopesRequest>,
    ) -> Result<Response<GetLinkEnvelopesResponse>, Status> {
        self.up.clone().get_link_envelopes(r.into_inner()).await
    }
    async fn stream_chunks(
        &self,
        r: Request<StreamChunksRequest>,
    ) -> Result<Response<Self::StreamChunksStream>, Status> {
        if self.how() == Misbehave::StallChunks {
            return Ok(Response::new(Box::pin(futures::stream::pending())));
        }
        let mut req = r.into_inner();
        let mut ours = Vec::new();
        if self.how() == Misbehave::Oversize {
            req.chunk_ids.retain(|id| match self.blobs.get(id) {
                Some(b) => {
                    ours.push(Ok(ChunkData {
                        chunk_id: id.clone(),
                        data: b.clone().into(),
                        problem: None,
                    }));
                    false
                }
                None => true,
            });
        }
        let theirs = self.up.clone().stream_chunks(req).await?.into_inner();
        Ok(Response::new(Box::pin(futures::StreamExt::chain(
            futures::stream::iter(ours),
            theirs,
        ))))
    }
    async fn get_instance_config(
        &self,
        r: Request<GetInstanceConfigRequest>,
    ) -> Result<Response<InstanceConfig>, Status> {
        self.up.clone().get_instance_config(r.into_inner()).await
    }
    async fn watch(&self, r: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        self.watches.fetch_add(1, Ordering::Relaxed);
        if self.how() == Misbehave::StallWatch {
            return Ok(Response::new(Box::pin(futures::stream::pending())));
        }
        let s = self.up.clone().watch(r.into_inner()).await?.into_inner();
        Ok(Response::new(Box::pin(s)))
    }
}

/// Serve `svc` on 127.0.0.1:0 inside the node TLS of `identity` (the real
/// server configuration, so the real dialer pins and accepts it).
async fn serve_hostile(identity: &Identity, svc: Hostile) -> std::net::SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(bitsync::tls::server_config(identity).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = tx.send(Ok::<_, std::io::Error>(tls)).await;
                }
            });
        }
    });
    let fed = FederationServer::new(svc)
        .max_encoding_message_size(16 << 20)
        .max_decoding_message_size(16 << 20);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(fed)
            .serve_with_incoming(ReceiverStream::new(rx)),
    );
    addr
}

// ---- the scene: a real source, a victim data dir -------------------------------

struct Scene {
    _tmp: TempDir,
    source: RunningNode,
    victim: PathBuf,
    /// A client of the source authenticated as the victim.
    up: Client,
}

impl Scene {
    /// A source with 4096-byte chunks, prepared by `prepare` before it
    /// serves, and a victim it trusts (not yet knowing the source).
    async fn new(prepare: impl FnOnce(&Node)) -> Scene {
        bitsync::tls::install_crypto_provider();
        let tmp = TempDir::new().unwrap();
        let n = init_node(&tmp.path().join("source"), CHUNK);
        prepare(&n);
        let source = crate::support::node::serve(n).await;
        let victim = tmp.path().join("victim");
        let id = blocking(|| ok_at(&victim, &["init"]).last_line());
        let victim_id: NodeId = Hash::parse(&id, "node id").unwrap();
        source
            .state
            .node
            .db()
            .upsert_peer(&victim_id, "victim", "", PeerState::Trusted, false)
            .unwrap();
        let d = dialer(&open(&victim));
        let ch = within(
            20,
            "dialing the source as the victim",
            d.channel(source.state.node.id(), &source.listen_address.to_string()),
        )
        .await
        .unwrap();
        Scene {
            _tmp: tmp,
            source,
            victim,
            up: replicator::client(ch),
        }
    }

    /// The victim's `request_timeout_secs` (unary deadline, and how long a
    /// chunk stream may stay silent) down to `TIMEOUT_SECS`.
    fn short_timeout(&self) {
        let cfg = self.victim.join("config.toml");
        let text = std::fs::read_to_string(&cfg).unwrap();
        assert!(text.contains("request_timeout_secs = 60"), "{text}");
        let text = text.replace(
            "request_timeout_secs = 60",
            &format!("request_timeout_secs = {TIMEOUT_SECS}"),
        );
        std::fs::write(&cfg, text).unwrap();
    }

    fn source_id(&self) -> String {
        self.source.state.node.id().to_hex()
    }

    /// A hostile relay in front of the source, with its key.
    async fn hostile(&self, how: Misbehave, blobs: HashMap<String, Vec<u8>>) -> Relay {
        let svc = Hostile {
            up: self.up.clone(),
            how: Arc::new(Mutex::new(how)),
            lists: Arc::default(),
            watches: Arc::default(),
            blobs: Arc::new(blobs),
        };
        let (lists, watches, how) = (svc.lists.clone(), svc.watches.clone(), svc.how.clone());
        let addr = serve_hostile(self.source.state.node.identity(), svc).await;
        Relay {
            addr: addr.to_string(),
            lists,
            watches,
            how,
        }
    }

    /// `bitsync clone <source id>` on the victim, the source known at `address`.
    fn clone_via(&self, address: &str) -> Out {
        let src = self.source_id();
        blocking(|| {
            ok_at(&self.victim, &["peer", "add", &src, address]);
            at(&self.victim, &["clone", &src])
        })
    }

    fn clone_direct(&self) -> Out {
        self.clone_via(&self.source.listen_address.to_string())
    }

    /// The victim's ids of items, via `ls --json` (complete or not).
    fn victim_items(&self) -> Vec<String> {
        let o = blocking(|| ok_at(&self.victim, &["ls", "--json"]));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| i["content_id"].as_str().unwrap().to_string())
            .collect()
    }
}

/// A blocking step (a child process) inside the multi-threaded test runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Publish an item with a broken writer: its manifest (signed by `node`,
/// `size` bytes in `CHUNK`-byte chunks) lists `ids`, and the blobs in
/// `store` are put in the chunk dir as they are.
fn publish_crafted(node: &Node, size: u64, ids: Vec<ChunkId>, store: &[&[u8]]) -> ContentId {
    let mut present = Vec::new();
    for b in store {
        let id = Hash::of(b);
        node.chunks().write(&id, b).unwrap();
        present.push((id, b.len() as u64));
    }
    node.chunks().sync().unwrap();
    let key = ItemKey::random();
    let meta = ItemMeta {
        name: "crafted".into(),
    }
    .encode_to_vec();
    let body = manifest::native_body(
        node.identity(),
        "file",
        size,
        CHUNK,
        ids,
        crypto::encrypt_meta(&key, &meta),
        manifest::now_ms(),
    );
    let m = Manifest::create(node.identity(), body).unwrap();
    let own = (
        node.id().to_hex(),
        crypto::wrap_key(node.identity().public(), &key),
    );
    node.db().insert_manifest(&m, &[own], &present).unwrap();
    m.id()
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Two chunks: the first right (4112 bytes of ciphertext), the last `last`
/// where the manifest's 5000 bytes need 920.
fn two_chunk_item(node: &Node, last: &[u8], store_last: bool, seed: u64) -> (ContentId, ChunkId) {
    let first = random_bytes(CHUNK as usize + 16, seed);
    let ids = vec![Hash::of(&first), Hash::of(last)];
    let store: Vec<&[u8]> = if store_last {
        vec![&first, last]
    } else {
        vec![&first]
    };
    (publish_crafted(node, 5000, ids.clone(), &store), ids[1])
}

#[track_caller]
fn assert_code(o: &Out, code: i32, needle: &str) {
    assert_eq!(o.code, code, "expected exit {code}: {o:?}");
    assert!(o.stderr.contains(needle), "stderr lacks {needle:?}: {o:?}");
}

// ---- bug 1: the cursor must strictly advance ------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_that_does_not_advance_fails_the_clone_naming_the_peer() {
    let scene = Scene::new(|n| {
        for i in 0..3 {
            put(n, &format!("f{i}"), &random_bytes(100, i));
        }
    })
    .await;
    let src = scene.source_id();
    for how in [Misbehave::RepeatPage, Misbehave::Backwards] {
        let r = scene.hostile(how, HashMap::new()).await;
        let (addr, lists) = (r.addr, r.lists);
        let t = Instant::now();
        let o = scene.clone_via(&addr);
        assert_code(&o, 5, &format!("protocol violation by peer {src}"));
        assert!(
            lists.load(Ordering::Relaxed) <= 3,
            "{how:?}: {} listing calls",
            lists.load(Ordering::Relaxed)
        );
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{how:?}: {:?}",
            t.elapsed()
        );
    }
}

// ---- bug 4: seqs no node can hold -----------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seqs_over_i64_max_are_refused_on_both_sides() {
    let scene = Scene::new(|n| {
        put(n, "a", b"one");
        put(n, "b", b"two");
    })
    .await;
    // Server side: an out-of-range cursor is INVALID_ARGUMENT, never a wrap to the start.
    let mut up = scene.up.clone();
    for after_seq in [u64::MAX, 1 << 63] {
        let e = up
            .list_manifests(ListManifestsRequest {
                after_seq,
                limit: 0,
            })
            .await
            .expect_err("an out-of-range after_seq must be refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        let e = up
            .watch(WatchRequest { after_seq })
            .await
            .expect_err("an out-of-range watch must be refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    }
    let ok = up
        .list_manifests(ListManifestsRequest {
            after_seq: i64::MAX as u64,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ok.manifests.is_empty());
    // Client side: a source advertising such a seq is a protocol violation,
    // and the cursor saved for it never goes negative.
    let r = scene.hostile(Misbehave::HugeSeq, HashMap::new()).await;
    let o = scene.clone_via(&r.addr);
    assert_code(&o, 5, "largest seq");
    let cursor: i64 = db_read_only(&scene.victim)
        .query_row(
            "SELECT cursor FROM peers WHERE node_id = ?1",
            [scene.source_id()],
            |r| r.get(0),
        )
        .unwrap();
    assert!((0..=2).contains(&cursor), "cursor {cursor}");
}

// ---- bug 2: a stalled stream ----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_chunk_stream_is_cancelled_and_the_clone_fails_cleanly() {
    let data = random_bytes(20_000, 9);
    let mut id = None;
    let scene = Scene::new(|n| id = Some(put(n, "big", &data))).await;
    scene.short_timeout();
    let r = scene.hostile(Misbehave::StallChunks, HashMap::new()).await;
    let t = Instant::now();
    let o = scene.clone_via(&r.addr);
    assert_code(&o, 8, "stalled");
    assert!(
        t.elapsed() < Duration::from_secs(10 * TIMEOUT_SECS),
        "took {:?}",
        t.elapsed()
    );
    // It resumes next time, from an honest source.
    let o = scene.clone_direct();
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(scene.victim_items(), [id.unwrap().to_hex()]);
}

/// A mirror whose source's Watch goes silent reconnects after 45 s; a source
/// whose listing then loops is a protocol violation: the mirror shows
/// FAILED with the reason and backs off instead of listing forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_drops_a_silent_watch_and_backs_off_from_a_looping_source() {
    let scene = Scene::new(|n| {
        put(n, "a", b"mirrored");
    })
    .await;
    let src = scene.source_id();
    let relay = scene.hostile(Misbehave::StallWatch, HashMap::new()).await;
    let serve = blocking(|| {
        ok_at(
            &scene.victim,
            &["peer", "add", &src, &relay.addr, "--mirror"],
        );
        Serve::start(&scene.victim)
    });
    let opened = Instant::now();
    blocking(|| {
        wait_for(60, "the mirror to open its watch", || {
            (relay.watches.load(Ordering::Relaxed) > 0).then_some(())
        })
    });
    // While the watch is silent, the source turns to repeating its first page.
    *relay.how.lock().unwrap() = Misbehave::RepeatPage;
    let job = |needle: &'static str| {
        blocking(|| {
            wait_for(90, needle, || {
                let o = ok_at(&scene.victim, &["status", "--json"]);
                let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                let jobs = st["jobs"].as_array()?.clone();
                let j = jobs.into_iter().find(|j| j["kind"] == "mirror")?;
                let err = j["last_error"].as_str().unwrap_or("");
                (j["phase"] == "FAILED" && err.contains(needle)).then_some(())
            })
        })
    };
    job("protocol violation by peer");
    let log = serve.log();
    assert!(log.contains("was silent for 45 s"), "{log}");
    assert!(
        opened.elapsed() >= Duration::from_secs(44),
        "{:?}",
        opened.elapsed()
    );
    // Backing off: a handful of listings in 5 s, not thousands.
    let before = relay.lists.load(Ordering::Relaxed);
    blocking(|| std::thread::sleep(Duration::from_secs(5)));
    let more = relay.lists.load(Ordering::Relaxed) - before;
    assert!(more <= 12, "{more} listing calls in 5 s");
}

// ---- bug 3: chunk lengths against the signed manifest -------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_of_the_wrong_length_are_never_stored_and_fail_the_clone() {
    let short = b"4byt".to_vec();
    let huge = random_bytes(7 << 20, 3);
    let mut ids = Vec::new();
    let scene = Scene::new(|n| {
        ids.push(put(n, "good", b"fine").to_hex());
        // The source holds a 4-byte last chunk where 920 bytes are due...
        two_chunk_item(n, &short, true, 1);
        // ...and the relay sends a 7 MiB one for this item.
        two_chunk_item(n, &huge, false, 2);
    })
    .await;
    let blobs = HashMap::from([(Hash::of(&huge).to_hex(), huge.clone())]);
    let r = scene.hostile(Misbehave::Oversize, blobs).await;
    let o = scene.clone_via(&r.addr);
    assert_code(&o, 5, "2 item(s)");
    assert!(o.stderr.contains("signed manifest says 920"), "{o:?}");
    assert_eq!(scene.victim_items(), ids, "only the good item is listed");
    let c = db_read_only(&scene.victim);
    for bad in [Hash::of(&short), Hash::of(&huge)] {
        let n: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM chunks WHERE chunk_id = ?1",
                [bad.to_hex()],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 0, "chunk {bad} was stored");
    }
}

#[test]
fn verify_reports_a_chunk_of_the_wrong_length() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("n");
    let n = init_node(&dir, CHUNK);
    put(&n, "good", b"fine");
    let (id, _) = two_chunk_item(&n, b"4byt", true, 5);
    drop(n);
    let o = at(&dir, &["verify"]);
    assert_eq!(o.code, 5, "{o:?}");
    let all = format!("{}{}", o.text(), o.stderr);
    assert!(all.contains(&id.to_hex()), "{o:?}");
    assert!(all.contains("signed manifest says 920"), "{o:?}");
}

// ---- bug 5: GetManifests sized by bytes -----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_adding_up_to_more_than_a_message_arrive_in_several_batches() {
    // 4 items of 65536 chunks (256 MiB each at 4096 bytes): 2.2 MB of chunk
    // ids per manifest, 8.9 MB together, over the 8 MiB cap. Each lists one
    // chunk 65536 times, so the clone moves 4 chunks, not 1 GiB.
    const N: u64 = 65536;
    let mut ids = Vec::new();
    let scene = Scene::new(|n| {
        for k in 0..4 {
            let c = random_bytes(CHUNK as usize + 16, 100 + k);
            let list = vec![Hash::of(&c); N as usize];
            ids.push(publish_crafted(n, N * CHUNK as u64, list, &[&c]).to_hex());
        }
    })
    .await;
    let o = scene.clone_direct();
    assert_eq!(o.code, 0, "{o:?}");
    let mut got = scene.victim_items();
    got.sort();
    ids.sort();
    assert_eq!(got, ids);
}

// ---- bug 7 (first part): a rejected item fails the clone -----------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_item_makes_the_clone_exit_non_zero() {
    let mut ids = Vec::new();
    let scene = Scene::new(|n| {
        ids.push(put(n, "a", b"kept").to_hex());
        ids.push(put(n, "b", b"tampered").to_hex());
        let c = rusqlite::Connection::open(n.paths().db()).unwrap();
        c.execute(
            "UPDATE manifests SET signature = zeroblob(384) WHERE content_id = ?1",
            [&ids[1]],
        )
        .unwrap();
    })
    .await;
    let o = scene.clone_direct();
    assert_code(&o, 5, "1 item(s)");
    assert!(o.stderr.contains("rejected"), "{o:?}");
    assert_eq!(scene.victim_items(), ids[..1]);
}

// ---- blind peers: an envelope may be missing only when the source says so ------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_envelope_is_data_loss_unless_the_source_serves_the_caller_blind() {
    let scene = Scene::new(|n| {
        for i in 0..2 {
            put(n, &format!("b{i}"), &random_bytes(6000, 40 + i));
        }
    })
    .await;
    // Keyed: no envelope, and no word of being blind, rejects every item.
    let r = scene
        .hostile(Misbehave::DropEnvelopes, HashMap::new())
        .await;
    let o = scene.clone_via(&r.addr);
    assert_code(&o, 5, "result has no envelope");
    assert!(scene.victim_items().is_empty(), "nothing stored");
    // Told it is blind: stored verified, without a key, and get says so.
    let r = scene.hostile(Misbehave::ClaimBlind, HashMap::new()).await;
    let o = scene.clone_via(&r.addr);
    assert_eq!(o.code, 0, "{o:?}");
    let items = scene.victim_items();
    assert_eq!(items.len(), 2);
    let o = blocking(|| at(&scene.victim, &["get", &items[0]]));
    assert_code(&o, 11, "no key: this node mirrors this item blind");
    blocking(|| ok_at(&scene.victim, &["verify"]));
}
