//! Pieces shared by the datasaver agent, coordinator and `dsctl`: the
//! generated gRPC types (`proto`), TLS identity loading and peer identities
//! (`tls`), names of targets and backups (`names`), the stream codecs used on
//! both ends of a transfer (`codec`, `checksum`), configuration helpers
//! (`config`), join tokens and the pinned first contact (`enroll`), the cleaning of text received from other processes (`text`)
//! and the binaries' own liveness probe (`probe`).

pub mod checksum;
pub mod codec;
pub mod config;
pub mod crl;
pub mod crypt;
pub mod enroll;
pub mod names;
#[cfg(feature = "pki")]
pub mod pki;
pub mod probe;
#[cfg(feature = "telemetry")]
pub mod telemetry;
pub mod text;
pub mod tls;
pub mod wal;

/// Generated code for the `datasaver.v1` protocol.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("datasaver.v1");
}

/// Flattens an error and its causes into one line, skipping causes whose
/// text an earlier part already contains (tonic and hyper repeat themselves).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    error_chain_after(&e.to_string(), e.source())
}

/// Like [`error_chain`], starting from `head` (for errors whose own text is
/// not the useful part, such as a gRPC status) and then `source`'s chain.
pub fn error_chain_after(head: &str, source: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut parts = vec![head.to_string()];
    let mut cur = source;
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// Version of this build, reported by agents and the coordinator.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Size of the data chunks streamed over gRPC. Large enough to keep per-message
/// overhead negligible, small enough that a handful in flight stay cheap.
pub const CHUNK_SIZE: usize = 1024 * 1024;

/// gRPC message size limit both ends configure: a chunk plus framing headroom.
pub const MAX_MESSAGE_SIZE: usize = 8 * 1024 * 1024;

/// HTTP/2 flow-control windows for the data streams. The 64 KiB default
/// makes a sender stop for a window update every few frames; a few chunks of
/// window keep a transfer moving while still bounding what is in flight.
pub const H2_STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// Connection-wide window: room for two streams at full speed.
pub const H2_CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// Largest HTTP/2 frame accepted: fewer, larger frames per chunk.
pub const H2_MAX_FRAME: u32 = 256 * 1024;
