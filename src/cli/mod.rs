//! The `bitsync` command line: parsing, passphrase handling, output formats.
//!
//! Commands print their result on stdout (the last line of `put` is the
//! content id, for scripts) and diagnostics on stderr. A failure prints one
//! line naming the thing and the fix, and exits with the code of its
//! [`Kind`](crate::error::Kind) (see `Error::exit_code`).
//!
//! One file per group of commands; each takes the parsed arguments and calls
//! the room that does the work with plain values (paths, option structs),
//! so nothing below the CLI sees [`Cli`].

// The doc comments of the argument types are clap's `--help` text, written
// for a terminal (`<data-dir>`, `[IPv6]:port`), not rustdoc markup.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

mod backup;
mod chunks;
mod clone;
mod clone_instance;
mod content;
mod import_axon;
pub mod logs;
pub(crate) mod output;
mod peer;
mod serve;
mod status;
mod table;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use zeroize::Zeroizing;

use crate::error::{Error, IoContext, Result};
use crate::node::{self, InitOutcome, Node};
use output::{out, outln};

pub(crate) use backup::{BackupArgs, RestoreArgs};
pub(crate) use chunks::ChunksCommand;
pub(crate) use clone_instance::CloneInstanceArgs;
pub(crate) use import_axon::ImportAxonArgs;
pub(crate) use peer::PeerCommand;

#[derive(Parser, Debug)]
#[command(
    name = "bitsync",
    version,
    about = "A peer-to-peer federation node: encrypted chunks, signed manifests, gRPC over mutual TLS or Tor"
)]
pub struct Cli {
    /// Data dir of the node [default: $XDG_DATA_HOME/bitsync or ~/.local/share/bitsync]
    #[arg(long, global = true, env = "BITSYNC_DATA_DIR", value_name = "DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// File holding the passphrase of a sealed node key (else $BITSYNC_PASSPHRASE, else a prompt)
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) passphrase_file: Option<PathBuf>,
    /// Log lines on stderr as text or as one JSON object per line [default: `log_format` in config.toml, else text]
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    pub(crate) log_format: Option<crate::config::LogFormat>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

impl Cli {
    /// The log filter when `RUST_LOG` is unset: a node that serves reports its
    /// connections and jobs; a one-shot command speaks only of trouble.
    pub fn default_log_filter(&self) -> &'static str {
        if matches!(self.command, Command::Serve { .. }) {
            "info"
        } else {
            "warn"
        }
    }
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Create the data dir: config, node key, empty database (does nothing if it exists)
    Init {
        /// Seal the node key with a passphrase
        #[arg(long)]
        seal: bool,
        /// Keep the chunks in this S3-compatible bucket (s3://bucket/prefix)
        /// instead of <data-dir>/chunks; endpoint and credentials from the
        /// AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)
        #[arg(long, value_name = "URL")]
        chunks: Option<String>,
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
    /// Where the chunks are stored: move them to an object store or back
    Chunks {
        #[command(subcommand)]
        command: ChunksCommand,
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
        /// Serve Prometheus metrics and the status page (plain HTTP, unauthenticated),
        /// overriding `metrics_listen` in config.toml
        #[arg(long, value_name = "HOST:PORT")]
        metrics: Option<String>,
    },
    /// Make a one-time invite token on the running node (printed as the last line)
    Invite {
        /// How long the token stays valid (e.g. 30m, 1h, 2d)
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// The joiner becomes a blind peer: it may hold, verify and serve
        /// this instance, never read it (recorded here, not in the token)
        #[arg(long)]
        blind: bool,
    },
    /// Make this node a complete copy of a peer's instance, from an invite token or a trusted peer's id
    Clone {
        /// An invite token, a trusted peer's id, or - to read the token from
        /// stdin (one line), which keeps it out of `ps`
        #[arg(required_unless_present = "token_file")]
        token_or_peer: Option<String>,
        /// Read the invite token from this file (its first line)
        #[arg(long, value_name = "FILE", conflicts_with = "token_or_peer")]
        token_file: Option<PathBuf>,
        /// Take chunks from this backup repository (a directory or s3://bucket/prefix; hash-checked); only the rest comes over the network
        #[arg(long, value_name = "REPO")]
        from_backup: Option<PathBuf>,
    },
    /// Show the running node: addresses, peers, mirrors with their lag, jobs with progress
    Status {
        /// The JSON object scripts read, instead of the table
        #[arg(long)]
        json: bool,
    },
    /// Add a snapshot of this node to a backup repository (or: backup verify|ls --repo DIR)
    Backup(BackupArgs),
    /// Restore a backup snapshot into a new data dir (--data-dir)
    Restore(RestoreArgs),
    /// Copy this instance's database and chunks elsewhere: consistent, verified, atomic
    CloneInstance(CloneInstanceArgs),
    /// Import an Axon BBS backup directory (legacy items; with --axon-key also native ones)
    ImportAxon(ImportAxonArgs),
}

impl Cli {
    fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(node::default_data_dir)
    }

    /// The passphrase: $BITSYNC_PASSPHRASE, else --passphrase-file, else a terminal prompt.
    fn passphrase(&self, confirm: bool) -> Result<Zeroizing<String>> {
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

    fn open_node(&self) -> Result<Node> {
        Node::open(&self.data_dir(), &|| self.passphrase(false))
    }
}

/// A progress bar on stderr when it is a terminal, hidden otherwise (so
/// scripts and logs get no control characters).
fn progress_bar(total: u64, what: &str) -> ProgressBar {
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
    output::check(dispatch(cli))
}

fn dispatch(cli: &Cli) -> Result<()> {
    match &cli.command {
        Command::Init { seal, chunks } => init(cli, *seal, chunks.as_deref()),
        Command::Id { public_key, cert } => id(cli, *public_key, *cert),
        Command::Put { file, kind, name } => content::put(cli, file, kind, name.as_deref()),
        Command::Get { content_id, output } => content::get(cli, content_id, output.as_deref()),
        Command::Ls { json } => content::list(&cli.open_node()?, *json),
        Command::Peer { command } => peer::run(&cli.open_node()?, command),
        Command::Chunks { command } => chunks::run(&cli.open_node()?, command),
        Command::Verify => content::verify(&cli.open_node()?),
        Command::Serve {
            listen,
            tor,
            metrics,
        } => {
            let opts = crate::server::ServeOptions {
                listen: listen.clone(),
                tor: *tor,
                metrics: metrics.clone(),
            };
            serve::serve(cli, opts)
        }
        Command::Invite { ttl, blind } => serve::invite(&cli.data_dir(), *ttl, *blind),
        Command::Status { json } => status::status(&cli.data_dir(), *json),
        Command::Clone {
            token_or_peer,
            token_file,
            from_backup,
        } => {
            let target = clone::target(token_or_peer.as_deref(), token_file.as_deref())?;
            clone::clone(cli, &target, from_backup.as_deref())
        }
        Command::Backup(a) => backup::backup(cli, a),
        Command::Restore(a) => backup::restore(cli, a),
        Command::CloneInstance(a) => clone_instance::clone_instance(cli, a),
        Command::ImportAxon(a) => import_axon::import_axon(cli, a),
    }
}

fn init(cli: &Cli, seal: bool, chunks: Option<&str>) -> Result<()> {
    let pass = if seal {
        Some(cli.passphrase(true)?)
    } else {
        None
    };
    let dir = cli.data_dir();
    match node::init_with(&dir, pass.as_deref().map(|s| s.as_str()), chunks)? {
        InitOutcome::Created(id) => {
            eprintln!("initialized {}", dir.display());
            if let Some(url) = chunks {
                eprintln!("chunks are stored in {url}");
            }
            outln!("{id}");
        }
        InitOutcome::AlreadyInitialized(_) if seal || chunks.is_some() => {
            return Err(Error::exists(format!(
                "{} is already initialized and was left as it is; \
                 --seal and --chunks only apply to a new data dir",
                dir.display()
            )));
        }
        InitOutcome::AlreadyInitialized(id) => {
            eprintln!("{} is already initialized; nothing changed", dir.display());
            outln!("{id}");
        }
    }
    Ok(())
}

fn id(cli: &Cli, public_key: bool, cert: bool) -> Result<()> {
    let n = cli.open_node()?;
    outln!("{}", n.id());
    if !public_key && !cert {
        if let Ok(onion) = std::fs::read_to_string(n.paths.tor().join("hostname")) {
            outln!("{}:{}", onion.trim(), crate::tor::DEFAULT_ONION_PORT);
        }
    }
    if public_key {
        out!("{}", n.identity.public_pem());
    }
    if cert {
        out!("{}", crate::tls::certificate_pem(&n.identity)?);
    }
    Ok(())
}

/// Ask a yes/no question on the terminal; only "y" or "yes" is a yes.
fn confirm(question: &str) -> Result<bool> {
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .ctx("reading the answer")?;
    let a = line.trim().to_ascii_lowercase();
    Ok(a == "y" || a == "yes")
}
