//! A real HTTP webhook receiver on a loopback port: records every request (headers and body)
//! and answers with the status codes it is told to (e.g. 500, 500, then 200), so tests can
//! check delivery, retries and signatures end to end.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as received.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// The status it was answered with.
    pub answered: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("webhook body is not JSON ({e}): {}", self.body))
    }
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    /// Status codes for the next requests; 200 when empty.
    script: VecDeque<u16>,
}

pub struct WebhookReceiver {
    port: u16,
    state: Arc<Mutex<State>>,
}

impl WebhookReceiver {
    pub fn start() -> WebhookReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind webhook receiver");
        let port = listener.local_addr().expect("receiver addr").port();
        let state: Arc<Mutex<State>> = Arc::default();
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &st);
                });
            }
        });
        WebhookReceiver { port, state }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Answer the next requests with these codes (then 200 again).
    pub fn respond_with(&self, codes: &[u16]) {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        g.script = codes.iter().copied().collect();
    }

    pub fn received(&self) -> Vec<Received> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .received
            .clone()
    }

    /// Requests that were answered 2xx, as JSON bodies.
    pub fn delivered(&self) -> Vec<serde_json::Value> {
        self.received()
            .into_iter()
            .filter(|r| (200..300).contains(&r.answered))
            .map(|r| r.json())
            .collect()
    }

    /// Delivered events named `event` (e.g. "backup.failed"; "resolved" events are matched on
    /// their `alert` field with `resolved_of`).
    pub fn events(&self, event: &str) -> Vec<serde_json::Value> {
        self.delivered()
            .into_iter()
            .filter(|v| v["event"] == event)
            .collect()
    }

    pub fn resolved_of(&self, alert: &str) -> Vec<serde_json::Value> {
        self.delivered()
            .into_iter()
            .filter(|v| v["event"] == "resolved" && v["alert"] == alert)
            .collect()
    }
}

fn serve(conn: TcpStream, st: &Mutex<State>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let len = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body)?;
        let code = {
            let mut g = st.lock().unwrap_or_else(|e| e.into_inner());
            let code = g.script.pop_front().unwrap_or(200);
            g.received.push(Received {
                method,
                path,
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
                answered: code,
            });
            code
        };
        let reason = if code < 300 { "OK" } else { "Error" };
        write!(
            out,
            "HTTP/1.1 {code} {reason}\r\ncontent-length: 0\r\nconnection: keep-alive\r\n\r\n"
        )?;
        out.flush()?;
    }
}
