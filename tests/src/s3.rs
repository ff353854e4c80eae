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

/// A loopback TCP proxy in front of a server that keeps a copy of everything clients send,
/// so a test can check which HTTP headers really went over the wire (S3 servers like s3s-fs
/// accept but do not keep some of them, e.g. server-side encryption).
pub struct RecordingProxy {
    port: u16,
    sent: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    stall: std::sync::Arc<std::sync::Mutex<Option<Vec<u8>>>>,
}

impl RecordingProxy {
    /// Forwards every connection on a new port to `127.0.0.1:upstream_port`.
    pub fn start(upstream_port: u16) -> RecordingProxy {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = sent.clone();
        let stall: std::sync::Arc<std::sync::Mutex<Option<Vec<u8>>>> = Default::default();
        let stall_outer = stall.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
                    continue;
                };
                let (mut c_read, mut s_write) = (
                    client.try_clone().expect("clone client"),
                    server.try_clone().expect("clone server"),
                );
                let record = record.clone();
                let stall = stall.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match c_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                // Hold requests that contain the stall pattern for as long
                                // as it is set: a server that stops answering them.
                                while let Some(p) =
                                    stall.lock().unwrap_or_else(|e| e.into_inner()).clone()
                                {
                                    if !buf[..n].windows(p.len()).any(|w| w == p.as_slice()) {
                                        break;
                                    }
                                    std::thread::sleep(Duration::from_millis(50));
                                }
                                record
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .extend_from_slice(&buf[..n]);
                                if s_write.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = s_write.shutdown(std::net::Shutdown::Write);
                });
                let (mut s_read, mut c_write) = (server, client);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_read, &mut c_write);
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        RecordingProxy {
            port,
            sent,
            stall: stall_outer,
        }
    }

    /// From now on, requests whose bytes contain `pattern` are held (not forwarded) until
    /// [`RecordingProxy::release`].
    pub fn stall_on(&self, pattern: &[u8]) {
        *self.stall.lock().unwrap_or_else(|e| e.into_inner()) = Some(pattern.to_vec());
    }

    pub fn release(&self) {
        *self.stall.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The request line and headers of every request sent so far, in order (bodies dropped;
    /// header names lower-cased).
    pub fn requests(&self) -> Vec<(String, Vec<(String, String)>)> {
        let data = self.sent.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut out = Vec::new();
        let mut i = 0;
        while i < data.len() {
            // A request starts with an upper-case method at a line start.
            let starts = ["GET ", "PUT ", "POST ", "HEAD ", "DELETE "]
                .iter()
                .any(|m| data[i..].starts_with(m.as_bytes()));
            if !starts {
                i += 1;
                continue;
            }
            let Some(end) = find(&data[i..], b"\r\n\r\n") else {
                break;
            };
            let head = String::from_utf8_lossy(&data[i..i + end]).into_owned();
            let mut lines = head.split("\r\n");
            let line = lines.next().unwrap_or_default().to_string();
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            // Skip the body by its length, so body bytes are never taken for a request.
            let body = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .and_then(|(_, v)| v.parse::<usize>().ok())
                .unwrap_or(0);
            out.push((line, headers));
            i += end + 4 + body;
        }
        out
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
