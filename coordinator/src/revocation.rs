//! Revoked certificates (`DATASAVER_TLS_CRL`): the client-certificate check
//! the TLS server uses, reloaded when the CRL file changes, and the live
//! connections of each certificate, so that revoking one refuses its next
//! handshake and closes what it already has open.
//!
//! - [`ReloadingVerifier`] is the server's `ClientCertVerifier` for the
//!   whole life of the process; each (re)load swaps the webpki verifier
//!   inside it. The root hints live outside the lock: rustls borrows them.
//! - [`Connections`] maps serial → the cancellation tokens of its live
//!   connections; [`Guarded`] is the stream tonic serves, failing its I/O once
//!   its token is cancelled (hyper then drops the connection and every
//!   stream on it).
//! - [`watch`] polls the file every [`POLL`]: a new CRL that does not parse or
//!   is not signed by the fleet CA is logged and the previous one kept.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use datasaver_common::tls::{client_verifier, identity_from_der};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// How often the CRL file is checked for changes.
pub const POLL: Duration = Duration::from_secs(datasaver_common::crl::RELOAD_SECS);

/// The setting that names the CRL file.
pub const SETTING: &str = "DATASAVER_TLS_CRL";

macro_rules! lock {
    ($m:expr) => {
        $m.lock().unwrap_or_else(|p| p.into_inner())
    };
}

/// A CRL file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("DATASAVER_TLS_CRL: {path}: {message}")]
pub struct CrlError {
    pub path: String,
    pub message: String,
}

/// A CRL read, parsed and checked against the fleet CA.
pub struct LoadedCrl {
    pub der: CertificateRevocationListDer<'static>,
    pub info: datasaver_common::crl::CrlInfo,
    /// BLAKE3 of the file, to notice changes
    pub hash: [u8; 32],
}

impl LoadedCrl {
    pub fn serials(&self) -> HashSet<String> {
        self.info.revoked.iter().map(|r| r.serial.clone()).collect()
    }
}

/// Reads `path` and checks it is one CRL signed by the fleet CA `ca`.
pub fn load(path: &Path, bytes: &[u8], ca: &CertificateDer<'_>) -> Result<LoadedCrl, CrlError> {
    let err = |message: String| CrlError {
        path: path.display().to_string(),
        message,
    };
    let der = datasaver_common::crl::from_pem(bytes).map_err(err)?;
    let info = datasaver_common::crl::inspect(der.as_ref()).map_err(err)?;
    datasaver_common::crl::verify(der.as_ref(), ca.as_ref()).map_err(|m| {
        err(format!(
            "{m} (it must be the crl.pem `dsctl certs revoke` writes with this fleet's CA)"
        ))
    })?;
    Ok(LoadedCrl {
        der,
        info,
        hash: *blake3::hash(bytes).as_bytes(),
    })
}

/// Reads the file for [`load`].
pub fn read(path: &Path) -> Result<Vec<u8>, CrlError> {
    std::fs::read(path).map_err(|e| CrlError {
        path: path.display().to_string(),
        message: format!(
            "cannot read it: {e} (create it with `dsctl certs init` or `dsctl certs revoke`)"
        ),
    })
}

/// The server's client-certificate check, whose CRL can change under it.
#[derive(Debug)]
pub struct ReloadingVerifier {
    hints: Vec<DistinguishedName>,
    inner: RwLock<Arc<dyn ClientCertVerifier>>,
}

impl ReloadingVerifier {
    pub fn new(inner: Arc<dyn ClientCertVerifier>) -> Self {
        Self {
            hints: inner.root_hint_subjects().to_vec(),
            inner: RwLock::new(inner),
        }
    }

    pub fn swap(&self, inner: Arc<dyn ClientCertVerifier>) {
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = inner;
    }

    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ClientCertVerifier for ReloadingVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.current().client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let r = self
            .current()
            .verify_client_cert(end_entity, intermediates, now);
        if let Err(e) = &r {
            // The accept loop logs the peer address; this says whose
            // certificate it was (a revoked or expired one is a name to act on).
            match identity_from_der(end_entity.as_ref()) {
                Ok(id) => tracing::warn!(
                    certificate = %id,
                    serial = %id.serial,
                    error = %e,
                    "client certificate refused"
                ),
                Err(_) => tracing::warn!(error = %e, "client certificate refused"),
            }
        }
        r
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// One live connection's entry in [`Connections`].
struct Live {
    name: String,
    token: CancellationToken,
}

/// The live TLS connections by certificate serial.
#[derive(Default)]
pub struct Connections {
    next: AtomicU64,
    live: Mutex<HashMap<String, HashMap<u64, Live>>>,
}

impl Connections {
    /// Registers a connection of certificate `serial` (of `name`); it is
    /// removed again when the returned registration is dropped.
    pub fn register(self: &Arc<Self>, serial: &str, name: &str) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        lock!(self.live)
            .entry(serial.to_string())
            .or_default()
            .insert(
                id,
                Live {
                    name: name.to_string(),
                    token: token.clone(),
                },
            );
        Registration {
            conns: self.clone(),
            serial: serial.to_string(),
            id,
            token,
        }
    }

    /// Closes every live connection whose certificate is in `revoked`;
    /// returns (serial, name, connections closed) for each.
    pub fn close_revoked(&self, revoked: &HashSet<String>) -> Vec<(String, String, usize)> {
        let g = lock!(self.live);
        let mut out = Vec::new();
        for (serial, conns) in g.iter() {
            if !revoked.contains(serial) || conns.is_empty() {
                continue;
            }
            let mut name = String::new();
            for l in conns.values() {
                l.token.cancel();
                name.clone_from(&l.name);
            }
            out.push((serial.clone(), name, conns.len()));
        }
        out
    }

    /// How many connections of `serial` are live.
    pub fn count(&self, serial: &str) -> usize {
        lock!(self.live).get(serial).map_or(0, HashMap::len)
    }
}

/// A connection's place in [`Connections`].
pub struct Registration {
    conns: Arc<Connections>,
    serial: String,
    id: u64,
    token: CancellationToken,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut g = lock!(self.conns.live);
        if let Some(m) = g.get_mut(&self.serial) {
            m.remove(&self.id);
            if m.is_empty() {
                g.remove(&self.serial);
            }
        }
    }
}

/// A stream whose reads and writes fail once its certificate is revoked.
pub struct Guarded<S> {
    inner: S,
    /// `None`: a connection without a readable identity (its requests are
    /// refused by the services' interceptors anyway).
    revoked: Option<(Pin<Box<WaitForCancellationFutureOwned>>, Registration)>,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, registration: Option<Registration>) -> Self {
        Self {
            inner,
            revoked: registration.map(|r| (Box::pin(r.token.clone().cancelled_owned()), r)),
        }
    }

    /// Polls the token first, so its waker is registered and a cancel wakes
    /// the connection's task even while it waits for the peer.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Some((f, _)) = &mut self.revoked {
            if f.as_mut().poll(cx).is_ready() {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the client's certificate was revoked",
                ));
            }
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Closing is always allowed: it is what a revoked connection should do.
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Guarded<S> {
    type ConnectInfo = S::ConnectInfo;

    // The inner stream's info, so `req.peer_certs()` still finds the
    // client's certificate.
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Revocation as the coordinator runs it: the verifier, the live connections
/// and the CRL file (if `DATASAVER_TLS_CRL` is set).
pub struct Revocation {
    pub verifier: Arc<ReloadingVerifier>,
    pub connections: Arc<Connections>,
    ca_certs: Vec<CertificateDer<'static>>,
    enrolled: Enrolled,
    path: Option<PathBuf>,
    state: Mutex<State>,
}

/// What the TLS server trusts besides the fleet CA when the coordinator
/// holds an enrollment CA: that CA as an anchor of its own, its CRL (used
/// only beside a fleet CRL), and clients without a certificate (to enroll).
#[derive(Clone, Default)]
pub struct Enrolled {
    pub anchor: Option<CertificateDer<'static>>,
    pub crl: Option<CertificateRevocationListDer<'static>>,
}

fn build(
    ca_certs: &[CertificateDer<'static>],
    enrolled: &Enrolled,
    fleet_crl: Option<CertificateRevocationListDer<'static>>,
) -> Result<Arc<dyn ClientCertVerifier>, datasaver_common::tls::TlsError> {
    let mut roots = ca_certs.to_vec();
    roots.extend(enrolled.anchor.clone());
    let mut crls = Vec::new();
    if let Some(c) = fleet_crl {
        crls.push(c);
        crls.extend(enrolled.crl.clone());
    }
    client_verifier(&roots, crls, enrolled.anchor.is_some())
}

#[derive(Default)]
struct State {
    /// hash of the CRL in use
    current: Option<[u8; 32]>,
    /// hash of the last file that could not be used (logged once)
    rejected: Option<[u8; 32]>,
    /// the last read error (logged once)
    unreadable: Option<String>,
    revoked: HashSet<String>,
}

impl Revocation {
    /// Sets up the verifier; with a CRL path, the file must exist and be a
    /// CRL of the fleet CA (start-up fails otherwise).
    pub fn start(
        ca_certs: &[CertificateDer<'static>],
        path: Option<PathBuf>,
        enrolled: Enrolled,
    ) -> Result<Arc<Self>, crate::StartError> {
        let (inner, state) = match &path {
            None => (build(ca_certs, &enrolled, None)?, State::default()),
            Some(p) => {
                let ca = ca_certs.first().ok_or_else(|| {
                    crate::StartError::Crl(format!(
                        "{SETTING}: the fleet CA file holds no certificate"
                    ))
                })?;
                let crl = read(p)
                    .and_then(|b| load(p, &b, ca))
                    .map_err(|e| crate::StartError::Crl(e.to_string()))?;
                let inner = build(ca_certs, &enrolled, Some(crl.der.clone())).map_err(|e| {
                    crate::StartError::Crl(format!("{SETTING}: {}: {e}", p.display()))
                })?;
                tracing::info!(crl = %p.display(), revoked = crl.info.revoked.len(), "certificate revocation list loaded");
                let state = State {
                    current: Some(crl.hash),
                    revoked: crl.serials(),
                    ..State::default()
                };
                (inner, state)
            }
        };
        Ok(Arc::new(Self {
            verifier: Arc::new(ReloadingVerifier::new(inner)),
            connections: Arc::default(),
            ca_certs: ca_certs.to_vec(),
            enrolled,
            path,
            state: Mutex::new(state),
        }))
    }

    /// Whether `serial` is revoked by the CRL in use.
    pub fn is_revoked(&self, serial: &str) -> bool {
        lock!(self.state).revoked.contains(serial)
    }

    /// Registers a connection that completed its handshake. A certificate
    /// revoked between its handshake and here is cut off at once.
    pub fn register(&self, serial: &str, name: &str) -> Registration {
        let r = self.connections.register(serial, name);
        if self.is_revoked(serial) {
            r.token.cancel();
        }
        r
    }

    /// Looks at the CRL file once: loads it if it changed, then closes the
    /// connections of every certificate it revokes.
    pub fn check(&self) {
        let Some(path) = &self.path else {
            return;
        };
        let bytes = match read(path) {
            Ok(b) => b,
            Err(e) => {
                let msg = e.to_string();
                let mut st = lock!(self.state);
                if st.unreadable.as_deref() != Some(msg.as_str()) {
                    tracing::error!(error = %msg, "cannot reload the certificate revocation list; keeping the one loaded");
                    st.unreadable = Some(msg);
                }
                return;
            }
        };
        let hash = *blake3::hash(&bytes).as_bytes();
        {
            let mut st = lock!(self.state);
            st.unreadable = None;
            if st.current == Some(hash) || st.rejected == Some(hash) {
                return;
            }
        }
        let loaded = match self.ca_certs.first() {
            Some(ca) => load(path, &bytes, ca).and_then(|crl| {
                build(&self.ca_certs, &self.enrolled, Some(crl.der.clone()))
                    .map(|v| (crl, v))
                    .map_err(|e| CrlError {
                        path: path.display().to_string(),
                        message: e.to_string(),
                    })
            }),
            None => return,
        };
        match loaded {
            Err(e) => {
                tracing::error!(error = %e, "the new certificate revocation list cannot be used; keeping the one loaded");
                lock!(self.state).rejected = Some(hash);
            }
            Ok((crl, verifier)) => {
                let revoked = crl.serials();
                self.verifier.swap(verifier);
                {
                    let mut st = lock!(self.state);
                    st.current = Some(hash);
                    st.rejected = None;
                    st.revoked.clone_from(&revoked);
                }
                tracing::info!(crl = %path.display(), revoked = revoked.len(), "certificate revocation list reloaded");
                for (serial, name, n) in self.connections.close_revoked(&revoked) {
                    tracing::warn!(certificate = %name, serial = %serial, connections = n, "closing the connections of a revoked certificate");
                }
            }
        }
    }
}

/// Reloads the CRL every [`POLL`] until `cancel`.
pub async fn watch(rev: Arc<Revocation>, cancel: CancellationToken) {
    if rev.path.is_none() {
        return;
    }
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(POLL) => {}
        }
        let r = rev.clone();
        // File reads and signature checks stay off the async workers.
        let _ = tokio::task::spawn_blocking(move || r.check()).await;
    }
}
