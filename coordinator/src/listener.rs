//! The TLS accept loop in front of tonic. Handshakes run in their own tasks
//! (a slow or hostile client cannot stall the loop), and every refused client
//! is logged with its address and the reason. Each accepted connection is
//! registered under its certificate's serial and wrapped in a
//! [`Guarded`] stream, so revoking the certificate closes it.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::revocation::{Guarded, Revocation};

pub type Incoming = ReceiverStream<Result<Guarded<TlsStream<TcpStream>>, std::io::Error>>;

pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    revocation: Arc<Revocation>,
    cancel: CancellationToken,
) -> Incoming {
    let (tx, rx) = mpsc::channel(16);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = tokio::select! {
                _ = cancel.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let revocation = revocation.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(
                    Duration::from_secs(10),
                    acceptor.accept(tcp).into_fallible(),
                )
                .await
                {
                    Ok(Ok(tls)) => {
                        let registration = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| datasaver_common::tls::identity_from_der(c).ok())
                            .map(|id| revocation.register(&id.serial, &id.to_string()));
                        let _ = tx.send(Ok(Guarded::new(tls, registration))).await;
                    }
                    Ok(Err((e, tcp))) => {
                        tracing::warn!(peer = %addr, error = %e, "TLS handshake refused");
                        linger_close(tcp).await;
                    }
                    Err(_) => tracing::warn!(peer = %addr, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Closes a refused connection so its TLS alert ("certificate expired",
/// "revoked") reaches the client. In TLS 1.3 the client sends its first
/// request before the server has judged its certificate; closing a socket
/// with those bytes unread makes the kernel send a reset, and the client
/// then loses the alert and sees only "connection closed". So: end our side,
/// and read what the client still sends (briefly) before the close.
async fn linger_close(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 4096];
    // Long enough for a client on a loaded machine to read the alert.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(n) = tcp.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}
