//! Continuous WAL (`DATASAVER_WAL=stream`, issue 14): the server's WAL,
//! received over the replication protocol through a physical slot, cut
//! into segments, compressed (zstd), optionally encrypted, and sent to the
//! coordinator's `StreamWal`. The position reported to the server as
//! flushed — which lets the slot release WAL — is only ever what the
//! coordinator acknowledged as stored; the segment in progress is stored as
//! a partial every `DATASAVER_WAL_SYNC_INTERVAL`, and on a planned stop.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use datasaver_common::proto::agent_service_client::AgentServiceClient;
use datasaver_common::proto::{
    wal_ack, wal_upload, WalFileEnd, WalFileStart, WalHello, WalHistory, WalPosition, WalUpload,
};
use datasaver_common::wal::{Lsn, Segment};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::config::{AgentConfig, WalSettings};
use crate::pipeline::transform::Chain;
use crate::replication::{Event, ReplConn, WalStream};
use crate::segmenter::{Pieces, Segmenter};

/// What the coordinator has acknowledged of this process's stream: one
/// contiguous run of WAL, `from` to `to` (a base backup is completed only
/// once its WAL is inside it).
#[derive(Default)]
pub struct WalState {
    run: std::sync::Mutex<Option<(Lsn, Lsn)>>,
    changed: tokio::sync::Notify,
    /// the server's WAL end as last read (0: not yet), for the heartbeat
    server: std::sync::atomic::AtomicU64,
    /// asks the stream to store the segment in progress now, not at the
    /// next sync interval (a base backup waiting for its end)
    flush: tokio::sync::Notify,
}

impl WalState {
    /// Notes the server's WAL end as the replication connection said.
    fn server_at(&self, lsn: Lsn) {
        self.server
            .fetch_max(lsn.0, std::sync::atomic::Ordering::Relaxed);
    }

    /// The server's WAL end as last read (0: not streaming).
    pub fn server(&self) -> u64 {
        self.server.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A stream (re)starting at `from`: the run goes on if it continues it,
    /// or starts again there.
    fn started(&self, from: Lsn) {
        let mut r = self.run.lock().unwrap_or_else(|p| p.into_inner());
        *r = match *r {
            Some((a, b)) if from >= a && from <= b => Some((a, b)),
            _ => Some((from, from)),
        };
    }

    fn stored(&self, to: Lsn) {
        let mut r = self.run.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((a, b)) = *r {
            *r = Some((a, b.max(to)));
        }
        drop(r);
        self.changed.notify_waiters();
    }

    /// The run stored so far.
    pub fn run(&self) -> Option<(Lsn, Lsn)> {
        *self.run.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the WAL from `start` to `end` is stored, or `limit`
    /// passes (false).
    pub async fn wait_stored(&self, start: Lsn, end: Lsn, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            if matches!(self.run(), Some((a, b)) if a <= start && b >= end) {
                return true;
            }
            // The end is usually inside the segment in progress: have it
            // stored now (again each second, as the server's bytes come).
            self.flush.notify_one();
            let slice = (tokio::time::Instant::now() + Duration::from_secs(1)).min(deadline);
            if tokio::time::timeout_at(slice, changed).await.is_err()
                && tokio::time::Instant::now() >= deadline
            {
                return false;
            }
        }
    }
}

/// How long a planned stop waits for the last partial's acknowledgement.
const STOP_WAIT: Duration = Duration::from_secs(5);
/// How often the slot's `wal_status` is read for `wal.slot_at_risk`.
const SLOT_CHECK_EVERY: Duration = Duration::from_secs(30);

/// Streams until `cancel` fires or the session's channel breaks, starting
/// again after each failure with a growing pause.
pub async fn run(
    config: Arc<AgentConfig>,
    settings: WalSettings,
    channel: Channel,
    state: Arc<WalState>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = std::time::Instant::now();
        let result = once(&config, &settings, channel.clone(), &state, &cancel).await;
        if cancel.is_cancelled() {
            return;
        }
        match result {
            Ok(()) => {
                backoff = Duration::from_secs(1);
                continue;
            }
            Err(e) => {
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_secs(1);
                }
                tracing::error!(target = %config.target.name, error = %e, retry_in = ?backoff, "WAL streaming stopped");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

fn chain_for(config: &AgentConfig) -> Result<Chain, String> {
    let t = &config.target;
    let level = if t.compression == datasaver_common::codec::Compression::Zstd {
        t.compression_level
    } else {
        3
    };
    // One segment at a time on the calling thread: workers' buffers would
    // sit beside the stream's for files of 16 MiB.
    Chain::encode_pages(
        datasaver_common::codec::Compression::Zstd,
        level,
        0,
        t.encrypt_to.as_ref().map(|e| &e.recipient),
    )
    .map_err(|e| e.to_string())
}

fn extension(config: &AgentConfig) -> &'static str {
    if config.target.encrypt_to.is_some() {
        ".zst.age"
    } else {
        ".zst"
    }
}

/// Sends one file: start, chunks, end. Compression runs on a blocking
/// thread a received piece at a time, each output sent as it comes: the
/// stored form is never held whole beside the raw bytes.
async fn send_file(
    config: &Arc<AgentConfig>,
    tx: &mpsc::Sender<WalUpload>,
    name: String,
    raw: Pieces,
    end_lsn: u64,
) -> Result<(), String> {
    let c = config.clone();
    let tx = tx.clone();
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        let send = |m: wal_upload::Msg| {
            tx.blocking_send(WalUpload { msg: Some(m) })
                .map_err(|_| "the coordinator's WAL stream closed".to_string())
        };
        let mut hasher = datasaver_common::checksum::Checksum::new();
        for piece in raw.iter() {
            hasher.update(piece);
        }
        send(wal_upload::Msg::File(WalFileStart {
            name,
            raw_blake3: hasher.finish().trim_start_matches("blake3:").to_string(),
            raw_bytes: raw.len() as u64,
            end_lsn,
        }))?;
        let mut chain = chain_for(&c)?;
        let mut stored = datasaver_common::checksum::Checksum::new();
        let mut out = |piece: Vec<u8>| -> Result<(), String> {
            if piece.is_empty() {
                return Ok(());
            }
            stored.update(&piece);
            send(wal_upload::Msg::Chunk(piece))
        };
        for piece in raw.iter() {
            out(chain.push(piece).map_err(|e| e.to_string())?)?;
        }
        out(chain.finish().map_err(|e| e.to_string())?)?;
        send(wal_upload::Msg::End(WalFileEnd {
            checksum: stored.finish().trim_start_matches("blake3:").to_string(),
        }))
    })
    .await
    .map_err(|e| format!("encoding WAL failed: {e}"))?
}

fn partial_name(seg: Segment, seg_size: u64) -> String {
    format!("{}.partial", seg.name(seg_size))
}

async fn once(
    config: &Arc<AgentConfig>,
    settings: &WalSettings,
    channel: Channel,
    state: &Arc<WalState>,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let e = |e: crate::replication::ReplError| e.to_string();
    let db = &config.target.db;
    let mut repl = ReplConn::connect(db).await.map_err(e)?;
    let sys = repl.identify_system().await.map_err(e)?;
    state.server_at(sys.position);
    let seg_size = repl.seg_size().await.map_err(e)?;
    if repl.ensure_slot(&settings.slot).await.map_err(e)? {
        tracing::info!(slot = %settings.slot, "created replication slot: the server keeps WAL for datasaver from now");
    }
    let (restart, tli) = repl
        .read_slot(&settings.slot)
        .await
        .map_err(e)?
        .unwrap_or((sys.position, sys.timeline));
    let start = Lsn(restart.0 - restart.0 % seg_size);
    let mut histories = Vec::new();
    for t in 2..=sys.timeline {
        let (name, content) = repl.timeline_history(t).await.map_err(e)?;
        histories.push((t, name, content));
    }

    let (tx, rx) = mpsc::channel::<WalUpload>(4);
    tx.send(WalUpload {
        msg: Some(wal_upload::Msg::Hello(WalHello {
            target: config.target.name.clone(),
            system_identifier: sys.system_id.clone(),
            timeline: tli,
            segment_size: seg_size,
            server_version: String::new(),
            extension: extension(config).into(),
            histories: histories
                .iter()
                .map(|(t, _, content)| WalHistory {
                    timeline: *t,
                    content: content.clone(),
                })
                .collect(),
        })),
    })
    .await
    .map_err(|_| "WAL stream closed".to_string())?;
    let max = datasaver_common::MAX_MESSAGE_SIZE;
    let mut client = AgentServiceClient::new(channel)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let mut acks = client
        .stream_wal(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("the coordinator refused the WAL stream: {}", s.message()))?
        .into_inner();
    match acks.message().await {
        Ok(Some(a)) if matches!(a.msg, Some(wal_ack::Msg::Ready(_))) => {}
        Ok(_) => return Err("the coordinator did not accept the WAL stream".into()),
        Err(s) => {
            return Err(format!(
                "the coordinator refused the WAL stream: {}",
                s.message()
            ))
        }
    }
    tracing::info!(target = %config.target.name, slot = %settings.slot, from = %start, timeline = tli, system_identifier = %sys.system_id, "streaming WAL");
    let mut unacked: VecDeque<String> = VecDeque::new();
    for (_, name, content) in histories {
        send_file(config, &tx, name.clone(), content.into(), 0).await?;
        unacked.push_back(name);
    }
    let stream = repl.start(&settings.slot, start, tli).await.map_err(e)?;
    state.started(start);
    let mut s = Streamer {
        state: state.clone(),
        config: config.clone(),
        tx,
        stream,
        seg: Segmenter::new(tli, start, seg_size)?,
        seg_size,
        unacked,
        flushed: None,
        slot_start: restart,
        server: sys.position,
        server_time: 0,
        last_partial: None,
    };
    let mut slot_status = String::new();
    let mut slot_checked = std::time::Instant::now() - SLOT_CHECK_EVERY;
    let mut tick = tokio::time::interval(settings.sync_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                // A planned stop: the last seconds go as a partial.
                s.send_partial().await?;
                s.settle(&mut acks).await;
                return Ok(());
            }
            ev = s.stream.next() => {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(err) => {
                        // The server went away (a shutdown, a failover):
                        // what it sent before is kept as a partial.
                        if s.send_partial().await.is_ok() {
                            s.settle(&mut acks).await;
                        }
                        return Err(e(err));
                    }
                };
                match ev {
                    Event::Data { start, bytes, end, time } => {
                        s.mark(end, time);
                        for done in s.seg.push(start, bytes).map_err(|e| e.to_string())? {
                            let name = done.segment.name(seg_size);
                            let end = done.segment.start(seg_size).0 + seg_size;
                            send_file(&s.config, &s.tx, name.clone(), done.bytes, end).await?;
                            s.unacked.push_back(name);
                        }
                    }
                    Event::Keepalive { end, reply, time } => {
                        s.mark(end, time);
                        if reply {
                            s.report().await?;
                        }
                    }
                    Event::TimelineEnd => {
                        // The server was promoted: keep what this timeline
                        // has, then start again on the next one.
                        s.send_partial().await?;
                        while !s.unacked.is_empty() {
                            match acks.message().await {
                                Ok(Some(a)) => s.acked(a).await?,
                                Ok(None) => return Err("the coordinator ended the WAL stream".into()),
                                Err(st) => return Err(st.message().to_string()),
                            }
                        }
                        tracing::info!(target = %config.target.name, timeline = tli, "timeline ended on the server; following the next one");
                        return Ok(());
                    }
                }
            }
            a = acks.message() => {
                match a {
                    Ok(Some(a)) => s.acked(a).await?,
                    Ok(None) => return Err("the coordinator ended the WAL stream".into()),
                    Err(st) => return Err(format!("the coordinator stopped the WAL stream: {}", st.message())),
                }
            }
            _ = state.flush.notified() => {
                s.send_partial().await?;
            }
            _ = tick.tick() => {
                s.send_partial().await?;
                if s.server_time == 0 {
                    continue;
                }
                // The slot's state, at most every 30 s (a psql each time).
                if slot_checked.elapsed() >= SLOT_CHECK_EVERY {
                    slot_checked = std::time::Instant::now();
                    slot_status = crate::pg::PgTools::new(config.pg_bin_dir.clone())
                        .slot_status(db, &settings.slot)
                        .await
                        .unwrap_or_default();
                }
                s.tx
                    .send(WalUpload { msg: Some(wal_upload::Msg::Position(WalPosition {
                        server_lsn: s.server.0,
                        server_time_micros: s.server_time,
                        slot_status: slot_status.clone(),
                    })) })
                    .await
                    .map_err(|_| "the coordinator's WAL stream closed".to_string())?;
            }
        }
    }
}

struct Streamer {
    state: Arc<WalState>,
    config: Arc<AgentConfig>,
    tx: mpsc::Sender<WalUpload>,
    stream: WalStream,
    seg: Segmenter,
    seg_size: u64,
    /// names sent and not acknowledged yet, in order
    unacked: VecDeque<String>,
    /// what the coordinator has stored, as reported to the server
    flushed: Option<Lsn>,
    /// the slot's position when streaming started: never report below it
    slot_start: Lsn,
    /// the server's WAL end as the stream last said, and when (its clock)
    server: Lsn,
    server_time: i64,
    /// the last partial sent: (segment, length)
    last_partial: Option<(Segment, usize)>,
}

impl Streamer {
    /// Waits (a few seconds at most) for the coordinator to acknowledge
    /// what was sent.
    async fn settle(&mut self, acks: &mut tonic::Streaming<datasaver_common::proto::WalAck>) {
        let wait = tokio::time::timeout(STOP_WAIT, async {
            while !self.unacked.is_empty() {
                match acks.message().await {
                    Ok(Some(a)) => self.acked(a).await?,
                    _ => break,
                }
            }
            Ok::<(), String>(())
        });
        let _ = wait.await;
    }

    fn mark(&mut self, end: Lsn, time: i64) {
        self.state.server_at(end);
        if time >= self.server_time {
            self.server = self.server.max(end);
            self.server_time = time;
        }
    }

    /// Stores the segment in progress as a partial, if it grew since the
    /// last one.
    async fn send_partial(&mut self) -> Result<(), String> {
        let Some((segment, bytes)) = self.seg.partial() else {
            return Ok(());
        };
        if self.last_partial == Some((segment, bytes.len())) {
            return Ok(());
        }
        let name = partial_name(segment, self.seg_size);
        let end = segment.start(self.seg_size).0 + bytes.len() as u64;
        let len = bytes.len();
        send_file(&self.config, &self.tx, name.clone(), bytes, end).await?;
        self.unacked.push_back(name);
        self.last_partial = Some((segment, len));
        Ok(())
    }

    async fn acked(&mut self, a: datasaver_common::proto::WalAck) -> Result<(), String> {
        let Some(wal_ack::Msg::Stored(st)) = a.msg else {
            return Err("unexpected message on the WAL stream".into());
        };
        match self.unacked.pop_front() {
            Some(n) if n == st.name => {}
            other => {
                return Err(format!(
                    "the coordinator acknowledged {} while {other:?} was next",
                    st.name
                ))
            }
        }
        if st.end_lsn > 0 {
            self.state.stored(Lsn(st.end_lsn));
            let end = Lsn(st.end_lsn).max(self.slot_start);
            self.flushed = Some(self.flushed.map_or(end, |f| f.max(end)));
        }
        self.report().await
    }

    async fn report(&mut self) -> Result<(), String> {
        let written = self.seg.position();
        // Nothing acknowledged yet: 0 tells the server nothing is flushed,
        // and the slot stays where it is.
        let flushed = self.flushed.unwrap_or(Lsn(0));
        self.stream
            .report(written, flushed, false)
            .await
            .map_err(|e| e.to_string())
    }
}
