//! A real S3-compatible server for the tests: `s3s-fs` (SigV4 authentication on, multipart,
//! ranges, ListObjectsV2, DeleteObjects), started on a free loopback port with its own data
//! dir and keys. Objects are files under `root/<bucket>/`; unfinished multipart parts are
//! `root/.upload_id-*` files, which lets tests prove an aborted upload left nothing behind.
//!
//! The binary comes from `tests/install-s3-server.sh` (into `/opt/datasaver-test-s3`), or
//! `DATASAVER_TEST_S3S_FS` names it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{free_port, tcp_port_open, wait_until, Proc, ProcSpec};

/// Where `tests/install-s3-server.sh` installs s3s-fs by default.
pub const DEFAULT_S3S_FS: &str = "/opt/datasaver-test-s3/bin/s3s-fs";

/// The s3s-fs binary, or a panic that says how to install it.
pub fn s3s_fs_binary() -> PathBuf {
    let p = std::env::var_os("DATASAVER_TEST_S3S_FS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_S3S_FS));
    assert!(
        p.is_file(),
        "S3 test server {} not found: run tests/install-s3-server.sh (scripts/test.sh does), \
         or set DATASAVER_TEST_S3S_FS",
        p.display()
    );
    p
}

pub struct S3Server {
    proc: Proc,
    root: tempfile::TempDir,
    port: u16,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
}

impl S3Server {
    /// Starts a server with one empty bucket, `backups`.
    pub fn start() -> S3Server {
        let root = crate::short_tempdir("dss3");
        let bucket = "backups".to_string();
        std::fs::create_dir_all(root.path().join(&bucket)).expect("create bucket dir");
        let access_key = format!("AKDS{:012}", std::process::id());
        // Test-only credentials of a throwaway server (so on its argv, which is fine here).
        let secret_key = format!("test-secret-{}", free_port());
        for _ in 0..5 {
            let port = free_port();
            let spec = ProcSpec::new(s3s_fs_binary())
                .args(["--host", "127.0.0.1", "--port"])
                .arg(port.to_string())
                .args(["--access-key", &access_key, "--secret-key", &secret_key])
                .arg(root.path())
                .env("RUST_LOG", "s3s_fs=warn,s3s=warn");
            let mut proc = Proc::spawn_in_tempdir("s3s-fs", spec);
            if wait_until(Duration::from_secs(20), || {
                tcp_port_open(port) || !proc.is_running()
            }) && proc.is_running()
            {
                return S3Server {
                    proc,
                    root,
                    port,
                    access_key,
                    secret_key,
                    bucket,
                };
            }
            proc.kill(crate::Sig::Kill);
        }
        panic!("s3s-fs did not start (see its log above)");
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's data dir (buckets are its subdirectories).
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The environment a coordinator needs to use this server's bucket.
    pub fn coordinator_env(&self, prefix: &str) -> Vec<(String, String)> {
        vec![
            ("DATASAVER_STORAGE_BACKEND".into(), "s3".into()),
            ("DATASAVER_S3_BUCKET".into(), self.bucket.clone()),
            ("DATASAVER_S3_ENDPOINT".into(), self.endpoint()),
            ("DATASAVER_S3_REGION".into(), "us-east-1".into()),
            ("DATASAVER_S3_ACCESS_KEY".into(), self.access_key.clone()),
            ("DATASAVER_S3_SECRET_KEY".into(), self.secret_key.clone()),
            ("DATASAVER_S3_PREFIX".into(), prefix.into()),
            ("DATASAVER_S3_FORCE_PATH_STYLE".into(), "true".into()),
        ]
    }

    /// Every stored object key in the bucket (relative to the bucket), sorted. (s3s-fs keeps
    /// its metadata and temp files beside the buckets, not in them.)
    pub fn objects(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk(&self.root.path().join(&self.bucket), "", &mut out);
        out.sort();
        out
    }

    /// Parts of multipart uploads that were neither completed nor aborted.
    pub fn pending_upload_parts(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.root.path())
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(".upload_id-"))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Stops the server abruptly (SIGKILL), as a crash or a network cut would.
    pub fn kill(&mut self) {
        self.proc.kill(crate::Sig::Kill);
        self.proc.wait_exit(Duration::from_secs(10));
        assert!(
            wait_until(Duration::from_secs(10), || !tcp_port_open(self.port)),
            "s3s-fs port {} still open after kill",
            self.port
        );
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.proc.respawn();
        assert!(
            wait_until(Duration::from_secs(20), || tcp_port_open(self.port)),
            "s3s-fs did not come back on port {}",
            self.port
        );
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }
}

fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let key = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        match e.file_type() {
            Ok(t) if t.is_dir() => walk(&e.path(), &key, out),
            Ok(_) => out.push(key),
            Err(_) => {}
        }
    }
}
