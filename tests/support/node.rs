//! Data dirs driven in-process through the library, and reading a node's
//! database behind its back.

use std::fs;
use std::path::Path;
use std::time::Duration;

use bitsync::content::{self, PutOptions};
use bitsync::crypto::ContentId;
use bitsync::node::{self, Node};
use bitsync::server::{self, RunningNode, ServeOptions};
use bitsync::transport::Dialer;

use super::wait::within;

/// Set a fresh data dir's chunk size (plaintext bytes per chunk) in its
/// config.toml: small chunks make items of many chunks from little data.
#[track_caller]
pub fn set_chunk_size(dir: &Path, chunk_size: usize) {
    let cfg = dir.join("config.toml");
    let text = fs::read_to_string(&cfg).unwrap();
    assert!(
        text.contains("chunk_size = 1048576"),
        "default config changed:\n{text}"
    );
    fs::write(
        &cfg,
        text.replace(
            "chunk_size = 1048576",
            &format!("chunk_size = {chunk_size}"),
        ),
    )
    .unwrap();
}

/// A new data dir at `dir` (`node::init`), opened.
pub fn new_node(dir: &Path) -> Node {
    node::init(dir, None).expect("init");
    open(dir)
}

/// A new data dir at `dir` with `config` as its whole config.toml, opened.
pub fn new_node_with_config(dir: &Path, config: &str) -> Node {
    node::init(dir, None).expect("init");
    fs::write(dir.join("config.toml"), config).unwrap();
    open(dir)
}

/// A new data dir at `dir` with `chunk_size` plaintext bytes per chunk, opened.
pub fn init_node(dir: &Path, chunk_size: u32) -> Node {
    node::init(dir, None).expect("init");
    set_chunk_size(dir, chunk_size as usize);
    open(dir)
}

/// Open an unsealed data dir.
pub fn open(dir: &Path) -> Node {
    Node::open(dir, &node::no_passphrase).expect("open node")
}

/// Publish `bytes` as a file item named `name`.
pub fn put(node: &Node, name: &str, bytes: &[u8]) -> ContentId {
    let opts = PutOptions {
        kind: "file".into(),
        name: name.into(),
    };
    content::put(node, &mut &bytes[..], &opts, &|_| {}).expect("put")
}

/// An item's plaintext.
pub fn get(node: &Node, id: &ContentId) -> Vec<u8> {
    let mut out = Vec::new();
    content::get(node, id, content::Output::Stream(&mut out), &|_| {}).expect("get");
    out
}

/// The node's own dialer (Tor is never started for TCP peers).
pub fn dialer(n: &Node) -> Dialer {
    bitsync::server::dialer(n).expect("building the dialer").0
}

/// A read-only connection to a data dir's database, waiting out a writer's lock.
pub fn db_read_only(dir: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open_with_flags(
        dir.join("bitsync.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c
}

/// `node` serving Federation on 127.0.0.1:0 and Admin on its socket, in this
/// process; fails the test if it is not up within 30 s.
pub async fn serve(node: Node) -> RunningNode {
    let opts = ServeOptions {
        listen: Some("127.0.0.1:0".into()),
        ..Default::default()
    };
    within(30, "the node to start", server::start(node, opts))
        .await
        .unwrap()
}

/// The item key in `envelope` (for `node`, from the peer behind `fed`): a
/// format-2 envelope names a link key, which is fetched with
/// `GetLinkEnvelopes` first when `node` does not hold it yet.
pub async fn open_envelope(
    node: &Node,
    fed: &mut bitsync::replicator::Client,
    id: &ContentId,
    envelope: &[u8],
) -> bitsync::Result<bitsync::crypto::ItemKey> {
    match node.open_envelope(id, envelope) {
        Err(e) if e.kind() == bitsync::error::Kind::Integrity => {
            let r = fed
                .get_link_envelopes(bitsync::proto::GetLinkEnvelopesRequest {})
                .await
                .expect("GetLinkEnvelopes")
                .into_inner();
            node.receive_link_envelopes(&r.sender_spki, &r.link_envelopes)?;
            node.open_envelope(id, envelope)
        }
        other => other,
    }
}

/// A Federation client of `server`, authenticated as `caller`.
pub async fn federation_client(caller: &Node, server: &RunningNode) -> bitsync::replicator::Client {
    let ch = within(
        20,
        "connecting",
        dialer(caller).channel(server.state.node.id(), &server.listen_address.to_string()),
    )
    .await
    .expect("dialing the test node");
    bitsync::replicator::client(ch)
}

/// A new node in `tmp/name`, with the process's TLS provider installed.
pub fn fresh(tmp: &tempfile::TempDir, name: &str) -> Node {
    bitsync::tls::install_crypto_provider();
    new_node(&tmp.path().join(name))
}

/// Make `peer` a trusted peer of the running `server` (no address).
pub fn trust(server: &RunningNode, peer: &bitsync::crypto::NodeId) {
    server
        .state
        .node
        .db()
        .upsert_peer(peer, "", "", bitsync::store::PeerState::Trusted, false)
        .unwrap();
}

/// The server's link envelopes for the caller of `fed`.
pub async fn link_envelopes(
    fed: &mut bitsync::replicator::Client,
) -> bitsync::proto::GetLinkEnvelopesResponse {
    fed.get_link_envelopes(bitsync::proto::GetLinkEnvelopesRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// `e` is an integrity failure, which a peer sees as DATA_LOSS.
#[track_caller]
pub fn data_loss(e: bitsync::Error) {
    assert_eq!(e.kind(), bitsync::error::Kind::Integrity, "{e}");
    assert_eq!(tonic::Status::from(e).code(), tonic::Code::DataLoss);
}

/// tests/python/link_unwrap.py opens the same item key as `node`, from
/// FORMAT.md alone (skipped, and said so, without python3's
/// `cryptography` and `kyber_py`).
pub fn python_agrees(node: &Node, id: &ContentId, envelope: &[u8]) {
    let has = std::process::Command::new("python3")
        .args(["-c", "import cryptography, kyber_py"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        eprintln!("skipped: python3 with cryptography and kyber-py is not available");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/link_unwrap.py");
    let o = std::process::Command::new("python3")
        .arg(script)
        .arg(node.paths().root())
        .arg(id.to_hex())
        .arg(hex::encode(envelope))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "link_unwrap.py: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let key = node.open_envelope(id, envelope).unwrap();
    assert_eq!(
        String::from_utf8(o.stdout).unwrap().trim(),
        hex::encode(key.as_bytes())
    );
}

/// Ids of the chunks a node's database records as present.
pub fn recorded_chunks(dir: &Path) -> std::collections::HashSet<String> {
    let c = db_read_only(dir);
    let mut st = c.prepare("SELECT chunk_id FROM chunks").unwrap();
    st.query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

/// The chunk ids of item `content_id`, in order, from a node's database.
pub fn chunks_of(dir: &Path, content_id: &str) -> Vec<String> {
    let c = db_read_only(dir);
    let mut st = c
        .prepare("SELECT chunk_id FROM manifest_chunks WHERE content_id = ?1 ORDER BY idx")
        .unwrap();
    st.query_map([content_id], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}
