//! Admin over TCP (`admin_listen`): mutual TLS pinned to node ids, open to
//! this node's own key and to the ids in `admin_peers`, refused to others.

use bitsync::node::{self, Node};
use bitsync::proto::admin_client::AdminClient;
use bitsync::proto::StatusRequest;
use bitsync::server::{self, ServeOptions};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_over_tcp_admits_only_the_node_and_its_admin_peers() {
    bitsync::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let operator = new_node(&tmp.path().join("operator"));
    let stranger = new_node(&tmp.path().join("stranger"));
    let a_dir = tmp.path().join("a");
    node::init(&a_dir, None).unwrap();
    let port = free_port();
    let cfg = std::fs::read_to_string(a_dir.join("config.toml"))
        .unwrap()
        .replace(
            "admin_peers = []",
            &format!(
                "admin_listen = \"127.0.0.1:{port}\"\nadmin_peers = [\"{}\"]",
                operator.id()
            ),
        );
    std::fs::write(a_dir.join("config.toml"), cfg).unwrap();
    let a = Node::open(&a_dir, &node::no_passphrase).unwrap();
    let a_id = a.id();
    let running = server::start(
        a,
        ServeOptions {
            listen: Some("127.0.0.1:0".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let addr = format!("127.0.0.1:{port}");

    // The node's own key.
    let own = dialer(&running.state.node);
    let mut admin = AdminClient::new(own.channel(a_id, &addr).await.unwrap());
    let s = admin
        .status(StatusRequest {})
        .await
        .expect("own key may call Admin")
        .into_inner();
    assert_eq!(s.node_id, a_id.to_hex());

    // A node listed in admin_peers.
    let op = dialer(&operator);
    let mut admin = AdminClient::new(op.channel(a_id, &addr).await.unwrap());
    admin
        .status(StatusRequest {})
        .await
        .expect("admin_peers entry may call Admin");

    // Any other node.
    let other = dialer(&stranger);
    let mut admin = AdminClient::new(other.channel(a_id, &addr).await.unwrap());
    let e = admin.status(StatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    running.shutdown().await;
}
