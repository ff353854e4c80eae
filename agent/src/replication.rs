//! A physical replication client (issue 14, being built): the agent reads
//! WAL from its server over the replication protocol, the way a standby
//! does, so nothing has to be installed in the Postgres container.
//!
//! Why not `pg_receivewal` as a child: it reports WAL as flushed to the
//! server once the bytes reach *its* local disk, and the slot then lets the
//! server recycle them; datasaver reports as flushed only what the
//! coordinator has stored (`WalStream::report`), so a crash of the agent or
//! the coordinator can never turn into a gap — the slot keeps the rest on
//! the server meanwhile.
//!
//! Messages are framed and authenticated (cleartext, MD5, SCRAM-SHA-256)
//! with the `postgres-protocol` crate; `CopyBothResponse`, which that crate
//! does not parse, is recognised here by its tag. TLS to the server is not
//! supported yet: `sslmode=require` or stricter is refused with one line.

use bytes::{Buf, BufMut, BytesMut};
use datasaver_common::wal::Lsn;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::DbConn;

/// A replication connection failed; the message says where.
#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    #[error("cannot connect to {addr} for replication: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("replication connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server refused: {message} (SQLSTATE {code})")]
    Server { code: String, message: String },
    #[error("replication protocol: {0}")]
    Protocol(String),
    #[error("{0}")]
    Unsupported(String),
}

impl ReplError {
    /// The SQLSTATE of a server error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ReplError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What `IDENTIFY_SYSTEM` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemInfo {
    /// the cluster's system identifier (decimal, as `pg_control_system()`)
    pub system_id: String,
    /// the server's current timeline
    pub timeline: u32,
    /// the server's current WAL flush position
    pub position: Lsn,
}

enum Incoming {
    Message(backend::Message),
    CopyBoth,
}

/// A connection in replication mode, before streaming.
pub struct ReplConn {
    io: Box<dyn Io>,
    buf: BytesMut,
}

/// Microseconds since 2000-01-01 (the protocol's clock) as Unix microseconds.
fn unix_micros(pg: i64) -> i64 {
    pg.saturating_add(946_684_800_000_000)
}

fn pg_epoch_micros() -> i64 {
    // Microseconds since 2000-01-01, the protocol's clock.
    const OFFSET_SECS: i64 = 946_684_800;
    let now = chrono::Utc::now();
    (now.timestamp() - OFFSET_SECS) * 1_000_000 + i64::from(now.timestamp_subsec_micros())
}

impl ReplConn {
    /// Connects and authenticates as `db.user` in physical replication mode.
    pub async fn connect(db: &DbConn) -> Result<ReplConn, ReplError> {
        if let Some(mode) = db.sslmode.as_deref() {
            if matches!(mode, "require" | "verify-ca" | "verify-full") {
                return Err(ReplError::Unsupported(format!(
                    "sslmode={mode}: WAL streaming does not connect with TLS yet; use a connection without TLS to the database for DATASAVER_WAL=stream"
                )));
            }
        }
        let io: Box<dyn Io> = if db.host.starts_with('/') {
            let path = format!("{}/.s.PGSQL.{}", db.host, db.port);
            let s = tokio::net::UnixStream::connect(&path)
                .await
                .map_err(|source| ReplError::Connect { addr: path, source })?;
            Box::new(s)
        } else {
            let addr = format!("{}:{}", db.host, db.port);
            let s = tokio::net::TcpStream::connect((db.host.as_str(), db.port))
                .await
                .map_err(|source| ReplError::Connect { addr, source })?;
            let _ = s.set_nodelay(true);
            Box::new(s)
        };
        let mut c = ReplConn {
            io,
            buf: BytesMut::with_capacity(64 * 1024),
        };
        let mut out = BytesMut::new();
        frontend::startup_message(
            [
                ("user", db.user.as_str()),
                ("replication", "true"),
                ("application_name", "datasaver"),
            ],
            &mut out,
        )?;
        c.send(&out).await?;
        c.authenticate(db).await?;
        Ok(c)
    }

    async fn send(&mut self, out: &[u8]) -> Result<(), ReplError> {
        self.io.write_all(out).await?;
        self.io.flush().await?;
        Ok(())
    }

    async fn recv(&mut self) -> Result<Incoming, ReplError> {
        loop {
            if let Some(h) = backend::Header::parse(&self.buf)? {
                // CopyBothResponse ('W'): not one of the crate's messages.
                if h.tag() == b'W' {
                    let total = 1 + h.len() as usize;
                    if self.buf.len() >= total {
                        self.buf.advance(total);
                        return Ok(Incoming::CopyBoth);
                    }
                } else if let Some(m) = backend::Message::parse(&mut self.buf)? {
                    return Ok(Incoming::Message(m));
                }
            }
            let n = self.io.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(ReplError::Protocol(
                    "the server closed the connection".into(),
                ));
            }
        }
    }

    /// The next message, with notices and parameter reports skipped and a
    /// server error turned into [`ReplError::Server`].
    async fn next(&mut self) -> Result<Incoming, ReplError> {
        loop {
            match self.recv().await? {
                Incoming::Message(backend::Message::ErrorResponse(body)) => {
                    return Err(server_error(&body))
                }
                Incoming::Message(
                    backend::Message::NoticeResponse(_)
                    | backend::Message::ParameterStatus(_)
                    | backend::Message::BackendKeyData(_),
                ) => continue,
                other => return Ok(other),
            }
        }
    }

    async fn authenticate(&mut self, db: &DbConn) -> Result<(), ReplError> {
        let password = || {
            db.password.as_deref().ok_or_else(|| {
                ReplError::Unsupported(
                    "the server asks for a password and none is set (DATASAVER_DB_PASSWORD)".into(),
                )
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let Incoming::Message(m) = self.next().await? else {
                return Err(ReplError::Protocol("unexpected CopyBoth at login".into()));
            };
            let mut out = BytesMut::new();
            match m {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?.as_bytes(), &mut out)?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        db.user.as_bytes(),
                        password()?.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut out)?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let mut offered = Vec::new();
                    let mut it = body.mechanisms();
                    while let Some(m) = fallible_iterator::FallibleIterator::next(&mut it)? {
                        offered.push(m.to_string());
                    }
                    if !offered.iter().any(|m| m == "SCRAM-SHA-256") {
                        return Err(ReplError::Unsupported(format!(
                            "the server offers only {offered:?} for SASL"
                        )));
                    }
                    let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)?;
                    scram = Some(s);
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| ReplError::Protocol("SASL out of order".into()))?;
                    s.update(body.data())?;
                    frontend::sasl_response(s.message(), &mut out)?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    scram
                        .as_mut()
                        .ok_or_else(|| ReplError::Protocol("SASL out of order".into()))?
                        .finish(body.data())?;
                }
                backend::Message::ReadyForQuery(_) => return Ok(()),
                _ => {
                    return Err(ReplError::Unsupported(
                        "the server asks for an authentication method datasaver does not speak (use scram-sha-256, md5, password or trust for replication in pg_hba.conf)".into(),
                    ))
                }
            }
            if !out.is_empty() {
                self.send(&out).await?;
            }
        }
    }

    /// Runs a replication command; returns its rows as text (NULL as None).
    pub async fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ReplError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out)?;
        self.send(&out).await?;
        let mut rows = Vec::new();
        let mut failed = None;
        loop {
            let m = match self.recv().await? {
                Incoming::CopyBoth => {
                    return Err(ReplError::Protocol(format!("{sql} started streaming")))
                }
                Incoming::Message(m) => m,
            };
            match m {
                backend::Message::DataRow(body) => {
                    let mut row = Vec::new();
                    let mut ranges = body.ranges();
                    while let Some(r) = fallible_iterator::FallibleIterator::next(&mut ranges)? {
                        row.push(
                            r.map(|r| String::from_utf8_lossy(&body.buffer()[r]).into_owned()),
                        );
                    }
                    rows.push(row);
                }
                backend::Message::ErrorResponse(body) => failed = Some(server_error(&body)),
                backend::Message::ReadyForQuery(_) => {
                    return match failed {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    }
                }
                _ => {}
            }
        }
    }

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemInfo, ReplError> {
        let rows = self.query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| ReplError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let field = |i: usize| {
            row.get(i)
                .cloned()
                .flatten()
                .ok_or_else(|| ReplError::Protocol(format!("IDENTIFY_SYSTEM field {i} missing")))
        };
        Ok(SystemInfo {
            system_id: field(0)?,
            timeline: field(1)?
                .parse()
                .map_err(|_| ReplError::Protocol("IDENTIFY_SYSTEM: bad timeline".into()))?,
            position: Lsn::parse(&field(2)?).map_err(ReplError::Protocol)?,
        })
    }

    /// Creates physical slot `name` reserving WAL now, unless it exists;
    /// whether it was created.
    pub async fn ensure_slot(&mut self, name: &str) -> Result<bool, ReplError> {
        if name.is_empty()
            || name.len() > 63
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(ReplError::Unsupported(format!(
                "DATASAVER_WAL_SLOT {name:?}: a slot name is 1-63 lower-case letters, digits and '_'"
            )));
        }
        match self
            .query(&format!(
                "CREATE_REPLICATION_SLOT {name} PHYSICAL RESERVE_WAL"
            ))
            .await
        {
            Ok(_) => Ok(true),
            // duplicate_object: it is there already
            Err(e) if e.code() == Some("42710") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The server's WAL segment size (`SHOW wal_segment_size`).
    pub async fn seg_size(&mut self) -> Result<u64, ReplError> {
        let rows = self.query("SHOW wal_segment_size").await?;
        let text = rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .ok_or_else(|| ReplError::Protocol("SHOW wal_segment_size returned nothing".into()))?;
        parse_size(&text)
            .filter(|s| datasaver_common::wal::valid_seg_size(*s))
            .ok_or_else(|| ReplError::Protocol(format!("wal_segment_size {text:?} is not a size")))
    }

    /// Where slot `name` keeps WAL from, and that position's timeline
    /// (`READ_REPLICATION_SLOT`, PostgreSQL 15 and later); `None` when the
    /// slot holds no position.
    pub async fn read_slot(&mut self, name: &str) -> Result<Option<(Lsn, u32)>, ReplError> {
        let rows = match self.query(&format!("READ_REPLICATION_SLOT {name}")).await {
            Ok(r) => r,
            Err(ReplError::Server { message, .. }) if message.contains("syntax error") => {
                return Err(ReplError::Unsupported(
                    "WAL streaming needs PostgreSQL 15 or later (READ_REPLICATION_SLOT)".into(),
                ))
            }
            Err(e) => return Err(e),
        };
        let row = rows.first();
        let field = |i: usize| row.and_then(|r| r.get(i).cloned().flatten());
        match (field(1), field(2)) {
            (Some(lsn), Some(tli)) => Ok(Some((
                Lsn::parse(&lsn).map_err(ReplError::Protocol)?,
                tli.parse()
                    .map_err(|_| ReplError::Protocol(format!("slot timeline {tli:?}")))?,
            ))),
            _ => Ok(None),
        }
    }

    /// `TIMELINE_HISTORY tli`: the history file's name and content.
    pub async fn timeline_history(&mut self, tli: u32) -> Result<(String, Vec<u8>), ReplError> {
        let rows = self.query(&format!("TIMELINE_HISTORY {tli}")).await?;
        match rows
            .first()
            .map(|r| (r.first().cloned().flatten(), r.get(1).cloned().flatten()))
        {
            Some((Some(name), Some(content))) => Ok((name, content.into_bytes())),
            _ => Err(ReplError::Protocol(format!(
                "TIMELINE_HISTORY {tli} returned no file"
            ))),
        }
    }

    /// Starts streaming timeline `tli` from `from` (rounded down to a
    /// segment start by the caller) through slot `slot`.
    pub async fn start(mut self, slot: &str, from: Lsn, tli: u32) -> Result<WalStream, ReplError> {
        let mut out = BytesMut::new();
        frontend::query(
            &format!("START_REPLICATION SLOT {slot} PHYSICAL {from} TIMELINE {tli}"),
            &mut out,
        )?;
        self.send(&out).await?;
        match self.next().await? {
            Incoming::CopyBoth => Ok(WalStream { conn: self }),
            Incoming::Message(_) => Err(ReplError::Protocol(
                "START_REPLICATION did not start streaming".into(),
            )),
        }
    }
}

/// A size as `SHOW` prints it: "16MB", "1GB", "64kB" or bytes.
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn server_error(body: &backend::ErrorResponseBody) -> ReplError {
    let (mut code, mut message) = (String::new(), String::new());
    let mut fields = body.fields();
    while let Ok(Some(f)) = fallible_iterator::FallibleIterator::next(&mut fields) {
        match f.type_() {
            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            _ => {}
        }
    }
    ReplError::Server {
        code,
        message: datasaver_common::text::sanitize(&message, 300),
    }
}

/// What the server sends while streaming.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// WAL bytes starting at `start`; the server's WAL ended at `end` when
    /// it sent them, at `time` (its clock, Unix microseconds)
    Data {
        start: Lsn,
        bytes: bytes::Bytes,
        end: Lsn,
        time: i64,
    },
    /// the server's position at `time`; answer with [`WalStream::report`]
    /// when asked
    Keepalive { end: Lsn, reply: bool, time: i64 },
    /// the timeline ended (a promotion on the server's side)
    TimelineEnd,
}

/// A running stream of WAL.
pub struct WalStream {
    conn: ReplConn,
}

impl WalStream {
    /// The next event.
    pub async fn next(&mut self) -> Result<Event, ReplError> {
        loop {
            let m = match self.conn.next().await? {
                Incoming::Message(m) => m,
                Incoming::CopyBoth => return Err(ReplError::Protocol("second CopyBoth".into())),
            };
            match m {
                backend::Message::CopyData(body) => {
                    let mut d = body.data();
                    if d.is_empty() {
                        continue;
                    }
                    let kind = d.get_u8();
                    match kind {
                        b'w' if d.len() >= 24 => {
                            let start = d.get_u64();
                            let end = d.get_u64();
                            let time = d.get_i64();
                            return Ok(Event::Data {
                                start: Lsn(start),
                                bytes: bytes::Bytes::copy_from_slice(d),
                                end: Lsn(end),
                                time: unix_micros(time),
                            });
                        }
                        b'k' if d.len() >= 17 => {
                            let end = d.get_u64();
                            let time = d.get_i64();
                            return Ok(Event::Keepalive {
                                end: Lsn(end),
                                reply: d.get_u8() == 1,
                                time: unix_micros(time),
                            });
                        }
                        other => {
                            return Err(ReplError::Protocol(format!(
                                "unexpected stream message {:?}",
                                other as char
                            )))
                        }
                    }
                }
                backend::Message::CopyDone => {
                    let mut out = BytesMut::new();
                    frontend::copy_done(&mut out);
                    self.conn.send(&out).await?;
                    return Ok(Event::TimelineEnd);
                }
                _ => continue,
            }
        }
    }

    /// Tells the server what is written and what is flushed — for
    /// datasaver, flushed means stored by the coordinator: the slot lets
    /// the server recycle WAL only up to there.
    pub async fn report(
        &mut self,
        written: Lsn,
        flushed: Lsn,
        reply: bool,
    ) -> Result<(), ReplError> {
        let mut msg = BytesMut::with_capacity(34);
        msg.put_u8(b'r');
        msg.put_u64(written.0);
        msg.put_u64(flushed.0);
        msg.put_u64(flushed.0);
        msg.put_i64(pg_epoch_micros());
        msg.put_u8(u8::from(reply));
        let mut out = BytesMut::new();
        frontend::CopyData::new(&msg[..])?.write(&mut out);
        self.conn.send(&out).await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_as_show_prints_them() {
        assert_eq!(super::parse_size("16MB"), Some(16 << 20));
        assert_eq!(super::parse_size("1GB"), Some(1 << 30));
        assert_eq!(super::parse_size("64kB"), Some(64 << 10));
        assert_eq!(super::parse_size("8192"), Some(8192));
        assert_eq!(super::parse_size("16 parsecs"), None);
    }
}
