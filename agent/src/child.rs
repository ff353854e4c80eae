//! Helpers for the Postgres client processes the agent runs. A child is kept
//! behind a mutex so a cancellation can kill it while a worker thread waits
//! for it.

use std::io::Read;
use std::process::{Child, ChildStderr, ExitStatus};
use std::sync::Mutex;
use std::time::Duration;

/// Reads a child's stderr on a thread, keeping the first 64 KiB of what it
/// said and discarding the rest, so the child never blocks on a full pipe.
pub fn drain_stderr(stderr: ChildStderr) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let mut r = std::io::BufReader::new(stderr).take(64 * 1024);
        let _ = r.read_to_string(&mut s);
        let _ = std::io::copy(r.get_mut().get_mut(), &mut std::io::sink());
        s
    })
}

/// Waits for a child that others may want to kill; polls so the lock is
/// never held across a blocking wait.
pub fn wait(child: &Mutex<Child>) -> std::io::Result<ExitStatus> {
    loop {
        {
            let mut c = child.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(st) = c.try_wait()? {
                return Ok(st);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills a child (if it still runs); whoever waits for it reaps it.
pub fn kill(child: &Mutex<Child>) {
    let _ = child.lock().unwrap_or_else(|p| p.into_inner()).kill();
}

/// Kills a child and reaps it, for paths that will not wait for it.
pub fn kill_and_reap(child: &Mutex<Child>) {
    let mut c = child.lock().unwrap_or_else(|p| p.into_inner());
    let _ = c.kill();
    let _ = c.wait();
}
