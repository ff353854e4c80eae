//! What is known only while the coordinator runs about each target's WAL
//! stream: whether an agent is streaming now and the server's position as
//! the agent last reported it (on the stream, or in its heartbeat) (for the lag in `dsctl wal`, `/metrics` and
//! `wal.lag`). Everything stored is in the index.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

#[derive(Debug, Clone, Default)]
pub struct State {
    /// streams open now (more than one only while a reconnecting agent's
    /// old call has not ended yet)
    pub streams: u32,
    /// the server's position and when it was reported
    pub server: Option<(u64, DateTime<Utc>)>,
    /// the slot's `wal_status` as the agent last read it
    pub slot_status: Option<String>,
}

#[derive(Clone, Default)]
pub struct Live(Arc<Mutex<HashMap<String, State>>>);

/// An open stream; dropping it ends it.
pub struct Streaming {
    live: Live,
    target: String,
}

impl Drop for Streaming {
    fn drop(&mut self) {
        if let Ok(mut m) = self.live.0.lock() {
            if let Some(s) = m.get_mut(&self.target) {
                s.streams = s.streams.saturating_sub(1);
            }
        }
    }
}

impl Live {
    pub fn start(&self, target: &str) -> Streaming {
        if let Ok(mut m) = self.0.lock() {
            m.entry(target.to_string()).or_default().streams += 1;
        }
        Streaming {
            live: self.clone(),
            target: target.to_string(),
        }
    }

    pub fn server_position(&self, target: &str, lsn: u64, at: DateTime<Utc>) {
        if let Ok(mut m) = self.0.lock() {
            m.entry(target.to_string()).or_default().server = Some((lsn, at));
        }
    }

    /// The server's position as the agent's heartbeat says, which reaches
    /// the coordinator even while the WAL stream cannot store: it only ever
    /// moves the known position forward (the stream's own reports are
    /// newer while it runs).
    pub fn server_moved_to(&self, target: &str, lsn: u64, at: DateTime<Utc>) {
        if let Ok(mut m) = self.0.lock() {
            let s = m.entry(target.to_string()).or_default();
            if s.server.is_none_or(|(l, _)| lsn > l) {
                s.server = Some((lsn, at));
            }
        }
    }

    pub fn slot_status(&self, target: &str, status: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.entry(target.to_string()).or_default().slot_status =
                (!status.is_empty()).then(|| status.to_string());
        }
    }

    pub fn get(&self, target: &str) -> State {
        self.0
            .lock()
            .ok()
            .and_then(|m| m.get(target).cloned())
            .unwrap_or_default()
    }
}
