//! The `bitsync` command line: parsing, passphrase handling, output formats.
//!
//! Commands print their result on stdout (the last line of `put` is the
//! content id, for scripts) and diagnostics on stderr. A failure prints one
//! line naming the thing and the fix, and exits with the code of its
//! [`Kind`](crate::error::Kind) (see `Error::exit_code`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use zeroize::Zeroizing;

use crate::content::{self, Output, PutOptions};
use crate::crypto::Hash;
use crate::error::{Error, IoContext, Result};
use crate::node::{self, InitOutcome, Node};
use crate::store::PeerState;

#[derive(Parser, Debug)]
#[command(
    name = "bitsync",
    version,
    about = "A peer-to-peer federation node: encrypted chunks, signed manifests, gRPC over mutual TLS or Tor"
)]
pub struct Cli {
    /// Data dir of the node [default: $XDG_DATA_HOME/bitsync or ~/.local/share/bitsync]
    #[arg(long, global = true, env = "BITSYNC_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// File holding the passphrase of a sealed node key (else $BITSYNC_PASSPHRASE, else a prompt)
    #[arg(long, global = true, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create the data dir: config, node key, empty database (does nothing if it exists)
    Init {
        /// Seal the node key with a passphrase
        #[arg(long)]
        seal: bool,
    },
    /// Print this node's id
    Id {
        /// Print the public key (PEM) as well
        #[arg(long)]
        public_key: bool,
        /// Print the node's TLS certificate (PEM) as well, for grpcurl or grpcio
        #[arg(long)]
        cert: bool,
    },
    /// Publish a file (or - for stdin) as a new item; prints its content id last
    Put {
        file: PathBuf,
        /// What the item is: file, applet, message, …
        #[arg(long, default_value = "file")]
        kind: String,
        /// Name stored (encrypted) with the item [default: the file name]
        #[arg(long)]
        name: Option<String>,
    },
    /// Decrypt and verify an item
    Get {
        content_id: String,
        /// Output file (written atomically); - or absent: stdout
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// List items
    Ls {
        /// One JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Manage trusted peers
    Peer {
        #[command(subcommand)]
        command: PeerCommand,
    },
    /// Re-hash every chunk, check every manifest signature and the database
    Verify,
    /// Run the node: Federation on TCP (mutual TLS), Admin on <data-dir>/admin.sock
    Serve {
        /// Federation address, overriding `listen` in config.toml (port 0 picks one)
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
        /// Also serve on an onion service with embedded Tor (as `[tor] enabled = true`)
        #[arg(long)]
        tor: bool,
    },
    /// Make a one-time invite token on the running node (printed as the last line)
    Invite {
        /// How long the token stays valid (e.g. 30m, 1h, 2d)
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
    /// Make this node a complete copy of a peer's instance, from an invite token or a trusted peer's id
    Clone {
        token_or_peer: String,
        /// Take chunks from this local backup repository (hash-checked); only the rest comes over the network
        #[arg(long, value_name = "DIR")]
        from_backup: Option<PathBuf>,
    },
    /// Show the running node's status (JSON)
    Status,
    /// Add a snapshot of this node to a backup repository (or: backup verify|ls --repo DIR)
    Backup(crate::backup::cli::BackupArgs),
    /// Restore a backup snapshot into a new data dir (--data-dir)
    Restore(crate::backup::cli::RestoreArgs),
    /// Copy this instance's database and chunks elsewhere: consistent, verified, atomic
    CloneInstance(crate::backup::cli::CloneInstanceArgs),
    /// Import an Axon BBS backup directory (legacy items; with --axon-key also native ones)
    ImportAxon(crate::backup::cli::ImportAxonArgs),
}

#[derive(Subcommand, Debug)]
pub enum PeerCommand {
    /// Trust a node
    Add {
        node_id: String,
        /// host:port or xxx.onion[:port]
        address: String,
        #[arg(long, default_value = "")]
        name: String,
        /// Keep this peer's content mirrored while `bitsync serve` runs
        #[arg(long)]
        mirror: bool,
    },
    /// List peers
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Stop trusting a node, at once (open connections included)
    Revoke { node_id: String },
}

impl Cli {
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(node::default_data_dir)
    }

    /// The passphrase: $BITSYNC_PASSPHRASE, else --passphrase-file, else a terminal prompt.
    pub fn passphrase(&self, confirm: bool) -> Result<Zeroizing<String>> {
        if let Ok(p) = std::env::var("BITSYNC_PASSPHRASE") {
            if !p.is_empty() {
                return Ok(Zeroizing::new(p));
            }
        }
        if let Some(f) = &self.passphrase_file {
            let text = Zeroizing::new(
                std::fs::read_to_string(f).ctx(format!("passphrase file {}", f.display()))?,
            );
            let p = text.trim_end_matches(['\n', '\r']).to_string();
            if p.is_empty() {
                return Err(Error::invalid(format!(
                    "passphrase file {} is empty",
                    f.display()
                )));
            }
            return Ok(Zeroizing::new(p));
        }
        if !std::io::stdin().is_terminal() {
            return Err(Error::auth(
                "a passphrase is needed and there is no terminal: set BITSYNC_PASSPHRASE or pass --passphrase-file",
            ));
        }
        let p =
            Zeroizing::new(rpassword::prompt_password("passphrase: ").ctx("reading passphrase")?);
        if confirm {
            let again =
                Zeroizing::new(rpassword::prompt_password("again: ").ctx("reading passphrase")?);
            if *again != *p {
                return Err(Error::invalid("the passphrases differ"));
            }
        }
        if p.is_empty() {
            return Err(Error::invalid("empty passphrase"));
        }
        Ok(p)
    }

    pub fn open_node(&self) -> Result<Node> {
        Node::open(&self.data_dir(), &|| self.passphrase(false))
    }
}

pub fn progress_bar(total: u64, what: &str) -> ProgressBar {
    let pb = if std::io::stderr().is_terminal() {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io(format!("starting the async runtime: {e}")))
}

pub fn run(cli: &Cli) -> Result<()> {
    crate::tls::install_crypto_provider();
    match &cli.command {
        Command::Serve { listen, tor } => {
            let n = cli.open_node()?;
            let opts = crate::server::ServeOptions { listen: listen.clone(), tor: *tor };
            runtime()?.block_on(crate::server::serve(n, opts))
        }
        Command::Invite { ttl } => runtime()?.block_on(async {
            let sock = crate::node::Paths::new(cli.data_dir()).admin_socket();
            let mut admin = crate::proto::admin_client::AdminClient::new(crate::transport::admin_channel(&sock).await?);
            let r = admin
                .create_invite(crate::proto::CreateInviteRequest { ttl_seconds: ttl.as_secs().max(1) })
                .await
                .map_err(Error::from)?
                .into_inner();
            eprintln!("one-time invite, valid for {}; on the other node run: bitsync clone <token>", humantime::format_duration(*ttl));
            println!("{}", r.token);
            Ok(())
        }),
        Command::Status => runtime()?.block_on(async {
            let sock = crate::node::Paths::new(cli.data_dir()).admin_socket();
            let mut admin = crate::proto::admin_client::AdminClient::new(crate::transport::admin_channel(&sock).await?);
            let s = admin.status(crate::proto::StatusRequest {}).await.map_err(Error::from)?.into_inner();
            let jobs: Vec<_> = s.jobs.iter().map(|j| {
                let p = j.progress.clone().unwrap_or_default();
                let phase = crate::proto::progress::Phase::try_from(p.phase).map(|ph| ph.as_str_name()).unwrap_or("PHASE_UNSPECIFIED");
                serde_json::json!({"kind": j.kind, "peer": j.peer, "phase": phase, "items_done": p.items_done,
                    "bytes_done": p.bytes_done, "last_error": p.errors.last()})
            }).collect();
            let v = serde_json::json!({
                "node_id": s.node_id, "name": s.name, "version": s.version, "listen_address": s.listen_address,
                "onion_address": s.onion_address, "manifests": s.manifests, "chunks": s.chunks,
                "stored_bytes": s.stored_bytes, "head_seq": s.head_seq, "trusted_peers": s.trusted_peers,
                "jobs": jobs, "uptime_ms": s.uptime_ms,
            });
            println!("{}", serde_json::to_string_pretty(&v).expect("json"));
            Ok(())
        }),
        Command::Clone { token_or_peer, from_backup } => {
            let local = from_backup.as_deref().map(crate::backup::hybrid::RepoChunks::open).transpose()?.map(std::sync::Arc::new);
            let dir = cli.data_dir();
            if !dir.join("bitsync.db").exists() {
                if let InitOutcome::Created(id) = node::init(&dir, None)? {
                    eprintln!("initialized {} as node {id}", dir.display());
                }
            }
            let n = cli.open_node()?;
            runtime()?.block_on(clone_command(n, token_or_peer, local))
        }
        _ => run_sync(cli),
    }
}

async fn clone_command(
    n: Node,
    target: &str,
    local: Option<std::sync::Arc<crate::backup::hybrid::RepoChunks>>,
) -> Result<()> {
    let n = std::sync::Arc::new(n);
    let (dialer, _) = crate::server::dialer(&n)?;
    let rep = crate::replicator::Replicator::new(n.clone(), dialer);
    if let Some(l) = &local {
        rep.set_local_chunks(l.clone());
    }
    let pb = progress_bar(0, "clone");
    let out = crate::replicator::clone_now(&rep, target, |p| {
        pb.set_length(p.bytes_total);
        pb.set_position(p.bytes_done);
    })
    .await;
    pb.finish_and_clear();
    if let Some(l) = &local {
        use crate::backup::hybrid::ChunkSource;
        use std::sync::atomic::Ordering::Relaxed;
        eprintln!(
            "{} chunks ({} bytes) taken from {}, each hash-checked",
            l.hits.load(Relaxed),
            l.hit_bytes.load(Relaxed),
            l.describe()
        );
    }
    let (out, failure) = match out {
        Ok(o) => (o, None),
        Err((e, o)) => (o, Some(e)),
    };
    for e in out.errors.iter().filter(|e| {
        failure
            .as_ref()
            .map(|f| f.message() != e.as_str())
            .unwrap_or(true)
    }) {
        eprintln!("  problem: {e}");
    }
    if let Some(e) = failure {
        if out.bytes > 0 || out.items > 0 {
            eprintln!(
                "received {} items, {} bytes before stopping; they are kept",
                out.items, out.bytes
            );
        }
        return Err(e);
    }
    // Exit 0 only if every item here is complete and verified.
    let ids = n.db.content_ids()?;
    let incomplete = ids
        .iter()
        .filter(|id| !n.db.is_complete(id).unwrap_or(false))
        .count();
    let secs = out.elapsed.as_secs_f64().max(0.001);
    println!(
        "cloned {} items ({} new), {} bytes received in {:.1} s ({:.1} MB/s)",
        ids.len(),
        out.items,
        out.bytes,
        secs,
        out.bytes as f64 / secs / 1e6
    );
    if incomplete > 0 {
        return Err(Error::unavailable(format!(
            "{incomplete} item(s) are incomplete; run the clone again to resume"
        )));
    }
    Ok(())
}

fn run_sync(cli: &Cli) -> Result<()> {
    match &cli.command {
        Command::Init { seal } => {
            let pass = if *seal {
                Some(cli.passphrase(true)?)
            } else {
                None
            };
            let dir = cli.data_dir();
            match node::init(&dir, pass.as_deref().map(|s| s.as_str()))? {
                InitOutcome::Created(id) => {
                    eprintln!("initialized {}", dir.display());
                    println!("{id}");
                }
                InitOutcome::AlreadyInitialized(_) if *seal => {
                    return Err(Error::exists(format!(
                        "{} is already initialized and its key was left as it is; \
                         --seal only applies to a new data dir",
                        dir.display()
                    )));
                }
                InitOutcome::AlreadyInitialized(id) => {
                    eprintln!("{} is already initialized; nothing changed", dir.display());
                    println!("{id}");
                }
            }
        }
        Command::Id { public_key, cert } => {
            let n = cli.open_node()?;
            println!("{}", n.id());
            if !*public_key && !*cert {
                if let Ok(onion) = std::fs::read_to_string(n.paths.tor().join("hostname")) {
                    println!("{}:{}", onion.trim(), crate::server::ONION_PORT);
                }
            }
            if *public_key {
                print!("{}", n.identity.public_pem());
            }
            if *cert {
                print!("{}", crate::tls::certificate_pem(&n.identity)?);
            }
        }
        Command::Put { file, kind, name } => {
            let n = cli.open_node()?;
            let (mut input, total, default_name): (Box<dyn std::io::Read>, u64, String) = if file
                == Path::new("-")
            {
                (Box::new(std::io::stdin().lock()), 0, String::new())
            } else {
                let f = std::fs::File::open(file).ctx(format!("input file {}", file.display()))?;
                let meta = f.metadata().ctx(format!("input file {}", file.display()))?;
                if meta.is_dir() {
                    return Err(Error::invalid(format!(
                        "{} is a directory; put takes a file",
                        file.display()
                    )));
                }
                let nm = file
                    .file_name()
                    .and_then(|s| s.to_str())
                    .unwrap_or("")
                    .to_string();
                (Box::new(f), meta.len(), nm)
            };
            crate::manifest::check_item_size(total, n.config.chunk_size)?;
            let pb = progress_bar(total, "put");
            let opts = PutOptions {
                kind: kind.clone(),
                name: name.clone().unwrap_or(default_name),
            };
            let id = content::put(&n, &mut input, &opts, &|done| pb.set_position(done))?;
            pb.finish_and_clear();
            println!("{id}");
        }
        Command::Get { content_id, output } => {
            let n = cli.open_node()?;
            let id = Hash::parse(content_id, "content id")?;
            let m = content::load_manifest(&n, &id)?;
            let pb = progress_bar(m.body().size, "get");
            let progress = |done| pb.set_position(done);
            match output.as_deref() {
                Some(p) if p != Path::new("-") => {
                    content::get(&n, &id, Output::File(p), &progress)?;
                }
                _ => {
                    let stdout = std::io::stdout();
                    let mut lock = stdout.lock();
                    content::get(&n, &id, Output::Stream(&mut lock), &progress)?;
                }
            }
            pb.finish_and_clear();
        }
        Command::Ls { json } => {
            let n = cli.open_node()?;
            list_content(&n, *json)?;
        }
        Command::Peer { command } => {
            let n = cli.open_node()?;
            match command {
                PeerCommand::Add {
                    node_id,
                    address,
                    name,
                    mirror,
                } => {
                    let id = Hash::parse(node_id, "node id")?;
                    if id == n.id() {
                        return Err(Error::invalid("that is this node's own id"));
                    }
                    check_address(address)?;
                    let p =
                        n.db.upsert_peer(&id, name, address, PeerState::Trusted, *mirror)?;
                    eprintln!(
                        "trusted {} at {}{}",
                        p.node_id,
                        p.address,
                        if p.mirror { " (mirror)" } else { "" }
                    );
                }
                PeerCommand::Ls { json } => list_peers(&n, *json)?,
                PeerCommand::Revoke { node_id } => {
                    let id = Hash::parse(node_id, "node id")?;
                    let p = n.db.revoke_peer(&id)?;
                    eprintln!("revoked {}", p.node_id);
                }
            }
        }
        Command::Verify => {
            let n = cli.open_node()?;
            let pb = progress_bar(0, "verify");
            let report = content::verify(&n, &|done, total| {
                pb.set_length(total);
                pb.set_position(done);
            })?;
            pb.finish_and_clear();
            for p in &report.problems {
                println!("{p}");
            }
            eprintln!(
                "checked {} chunks and {} manifests: {} problem(s)",
                report.chunks_checked,
                report.manifests_checked,
                report.problems.len()
            );
            if !report.problems.is_empty() {
                return Err(Error::integrity(format!(
                    "verify found {} problem(s)",
                    report.problems.len()
                )));
            }
        }
        Command::Backup(a) => crate::backup::cli::backup(cli, a)?,
        Command::Restore(a) => crate::backup::cli::restore(cli, a)?,
        Command::CloneInstance(a) => crate::backup::cli::clone_instance(cli, a)?,
        Command::ImportAxon(a) => crate::backup::cli::import_axon(cli, a)?,
        Command::Serve { .. }
        | Command::Invite { .. }
        | Command::Clone { .. }
        | Command::Status => {
            unreachable!("async commands are dispatched by run()")
        }
    }
    Ok(())
}

/// Accept `host:port` or `xxx.onion[:port]`.
pub fn check_address(a: &str) -> Result<()> {
    let ok = match a.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok(),
        None => a.ends_with(".onion"),
    };
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "address {a:?} is not host:port or an .onion address"
        )))
    }
}

fn list_content(n: &Node, json: bool) -> Result<()> {
    let mut rows = Vec::new();
    let mut after = 0;
    loop {
        let page = n.db.list_after(after, 1000)?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for s in page {
            let m = content::load_manifest(n, &s.content_id)?;
            let name = content::item_meta(n, &m)
                .map(|m| m.name)
                .unwrap_or_default();
            let complete = n.db.is_complete(&s.content_id)?;
            rows.push((s, name, complete));
        }
    }
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|(s, name, complete)| {
                serde_json::json!({
                    "content_id": s.content_id.to_hex(), "seq": s.seq, "kind": s.kind, "name": name,
                    "size": s.size, "chunks": s.chunk_count, "created_at_ms": s.created_at_ms,
                    "publisher": s.publisher.to_hex(), "complete": complete,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return Ok(());
    }
    println!(
        "{:<64}  {:<8} {:>12}  {:<8}  NAME",
        "CONTENT ID", "KIND", "SIZE", "STATE"
    );
    for (s, name, complete) in rows {
        println!(
            "{:<64}  {:<8} {:>12}  {:<8}  {}",
            s.content_id,
            s.kind,
            s.size,
            if complete { "ok" } else { "partial" },
            name
        );
    }
    Ok(())
}

fn list_peers(n: &Node, json: bool) -> Result<()> {
    let peers = n.db.peers()?;
    if json {
        let v: Vec<_> = peers
            .iter()
            .map(|p| {
                serde_json::json!({"node_id": p.node_id.to_hex(), "name": p.name, "address": p.address,
                    "state": p.state.as_str(), "mirror": p.mirror, "added_at_ms": p.added_at_ms})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return Ok(());
    }
    println!(
        "{:<64}  {:<8}  {:<6}  {:<24}  NAME",
        "NODE ID", "STATE", "MIRROR", "ADDRESS"
    );
    for p in peers {
        println!(
            "{:<64}  {:<8}  {:<6}  {:<24}  {}",
            p.node_id,
            p.state.as_str(),
            if p.mirror { "yes" } else { "" },
            p.address,
            p.name
        );
    }
    Ok(())
}
