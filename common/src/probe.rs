//! The binaries' `healthcheck` subcommand: asks the process's own HTTP
//! endpoint whether it is live, for an image's `HEALTHCHECK` (slim images
//! carry no curl). Plain HTTP/1.0 over loopback, std only.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Where to reach a server listening on `listen`: the address itself, or
/// loopback when it listens on every address (`0.0.0.0`, `[::]`).
pub fn local_address(listen: SocketAddr) -> SocketAddr {
    match listen {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        a => a,
    }
}

/// `GET path` on `addr`: `Ok(())` when it answers 200, else one line saying
/// what it answered or why it could not be asked.
pub fn get_ok(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let what = format!("GET http://{addr}{path}");
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{what}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("{what}: {e}"))?;
    // One write: a server that answers after the first bytes it reads and
    // closes must not turn the rest of the request into a broken pipe.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    s.write_all(request.as_bytes())
        .map_err(|e| format!("{what}: {e}"))?;
    let mut reply = Vec::new();
    s.take(64 * 1024)
        .read_to_end(&mut reply)
        .map_err(|e| format!("{what}: {e}"))?;
    let reply = String::from_utf8_lossy(&reply);
    let status = reply.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") {
        return Ok(());
    }
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| crate::text::sanitize(b.trim(), 200))
        .unwrap_or_default();
    Err(format!("{what}: {status} {body}").trim().to_string())
}

/// The `healthcheck` subcommand of `program`: asks `/live` on the address
/// it listens on (`listen`, DATASAVER_HTTP_LISTEN's value) and returns the
/// process's exit code: 0 live, 1 not live (one line on stderr), 2 a bad
/// address.
pub fn healthcheck(program: &str, listen: &str) -> std::process::ExitCode {
    let Ok(addr) = listen.trim().parse::<SocketAddr>() else {
        eprintln!(
            "{program} healthcheck: DATASAVER_HTTP_LISTEN: {listen:?} is not an address like 127.0.0.1:9091"
        );
        return std::process::ExitCode::from(2);
    };
    match get_ok(local_address(addr), "/live", Duration::from_secs(10)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program} healthcheck: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_once(reply: &'static str) -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                // The whole request, as a real server reads it, then the reply.
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(reply.as_bytes());
            }
        });
        addr
    }

    #[test]
    fn only_a_200_is_live() {
        let t = Duration::from_secs(5);
        assert_eq!(
            get_ok(serve_once("HTTP/1.1 200 OK\r\n\r\nok\n"), "/live", t),
            Ok(())
        );
        let e = get_ok(
            serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\nnot live: storage\n"),
            "/live",
            t,
        )
        .unwrap_err();
        assert!(e.contains("503") && e.contains("not live: storage"), "{e}");
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(get_ok(closed, "/live", t).is_err());
        assert_eq!(
            local_address("0.0.0.0:9090".parse().unwrap()),
            "127.0.0.1:9090".parse().unwrap()
        );
        assert_eq!(
            local_address("10.0.0.5:9090".parse().unwrap()),
            "10.0.0.5:9090".parse().unwrap()
        );
    }
}
