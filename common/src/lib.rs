//! Pieces shared by the datasaver agent, coordinator and `dsctl`: the
//! generated gRPC types (`proto`), TLS identity loading and peer identities
//! (`tls`), names of targets and backups (`names`), the stream codecs used on
//! both ends of a transfer (`codec`, `checksum`) and configuration helpers
//! (`config`).

pub mod checksum;
pub mod codec;
pub mod config;
pub mod crypt;
pub mod names;
pub mod tls;

/// Generated code for the `datasaver.v1` protocol.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("datasaver.v1");
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
