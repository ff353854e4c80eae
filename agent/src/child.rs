//! The Postgres client processes the agent runs (pg_dump, pg_restore, …) as
//! pipeline ends. A child is kept behind a mutex so a job's cancellation can
//! kill it while a worker thread is blocked reading from it, writing to it or
//! waiting for it; whoever waits reaps it, so no zombie is left either way.

use std::io::Read;
use std::process::{Child, ChildStdin, ChildStdout, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How long a child stopped with SIGINT gets to send its cancel request to
/// the server and exit before it is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(3);

/// A child could not be started or waited for.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("cannot start {name}: {source}")]
    Spawn {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("{name} has no {pipe}")]
    NoPipe {
        name: &'static str,
        pipe: &'static str,
    },
    #[error("waiting for {name}: {source}")]
    Wait {
        name: &'static str,
        source: std::io::Error,
    },
}

/// A running child process. Cloning shares the process; any clone may kill
/// it, and exactly one caller should [`Proc::wait`] for it.
#[derive(Clone)]
pub struct Proc {
    name: &'static str,
    process: Arc<Mutex<Child>>,
    stderr: Arc<Mutex<Option<JoinHandle<String>>>>,
}

/// The pipes a started child hands to its pipeline stages.
pub struct Pipes {
    pub stdin: Option<ChildStdin>,
    pub stdout: ChildStdout,
}

/// How a child ended, and the start of what it said on stderr.
pub struct Exit {
    pub status: ExitStatus,
    pub stderr: String,
}

impl Exit {
    /// "exit status 1" or "killed by a signal", for messages.
    pub fn describe(&self) -> String {
        match self.status.code() {
            Some(c) => format!("exit status {c}"),
            None => "killed by a signal".to_string(),
        }
    }
}

impl Proc {
    /// Starts `cmd` with stdout piped, stderr drained on a thread and stdin
    /// piped when the child is to be fed (else closed). `name` is what
    /// messages call it ("pg_dump").
    pub fn spawn(
        mut cmd: std::process::Command,
        name: &'static str,
        feed_stdin: bool,
    ) -> Result<(Self, Pipes), ChildError> {
        cmd.stdin(if feed_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|source| ChildError::Spawn { name, source })?;
        let stderr = child.stderr.take().map(drain_stderr);
        let proc = Self {
            name,
            process: Arc::new(Mutex::new(child)),
            stderr: Arc::new(Mutex::new(stderr)),
        };
        let pipes = {
            let mut c = proc.lock();
            let stdout = c.stdout.take();
            let stdin = c.stdin.take();
            (stdout, stdin)
        };
        let stdout = match pipes.0 {
            Some(s) => s,
            None => {
                proc.kill_and_reap();
                return Err(ChildError::NoPipe {
                    name,
                    pipe: "stdout",
                });
            }
        };
        if feed_stdin && pipes.1.is_none() {
            proc.kill_and_reap();
            return Err(ChildError::NoPipe {
                name,
                pipe: "stdin",
            });
        }
        Ok((
            proc,
            Pipes {
                stdin: pipes.1,
                stdout,
            },
        ))
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Child> {
        self.process.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Kills the child if it still runs; whoever waits for it reaps it.
    pub fn kill(&self) {
        let _ = self.lock().kill();
    }

    /// Kills the child and reaps it, for paths that will not wait for it.
    pub fn kill_and_reap(&self) {
        let mut c = self.lock();
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Stops the child the way Ctrl-C would, then kills it if it is still
    /// there after `INTERRUPT_GRACE`, and reaps it. SIGINT makes pg_dump,
    /// pg_restore and psql send Postgres a cancel request before they exit:
    /// a client killed outright leaves its server session running — a
    /// pg_dump waiting for a lock keeps waiting (and holding its connection)
    /// until the lock is released.
    pub fn stop_and_reap(&self) {
        self.interrupt();
        let deadline = std::time::Instant::now() + INTERRUPT_GRACE;
        while std::time::Instant::now() < deadline {
            if self.has_exited() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill_and_reap();
    }

    /// Sends SIGINT if the child still runs.
    fn interrupt(&self) {
        let mut c = self.lock();
        // Under the lock nobody can reap it meanwhile, so the pid is still
        // our child's (a zombie at worst), never a reused one.
        if matches!(c.try_wait(), Ok(None)) {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGINT,
                );
            }
        }
    }

    /// Whether the child has exited (without reaping anything else).
    pub fn has_exited(&self) -> bool {
        matches!(self.lock().try_wait(), Ok(Some(_)))
    }

    /// Stops the child as soon as `cancel` fires (SIGINT, then SIGKILL after
    /// `INTERRUPT_GRACE`), until the guard is dropped. This is how a job's cancellation reaches its processes: a
    /// worker blocked on the child's pipes then sees them close.
    pub fn kill_on(&self, cancel: &CancellationToken) -> KillOnCancel {
        let me = self.clone();
        let cancel = cancel.clone();
        KillOnCancel(tokio::spawn(async move {
            cancel.cancelled().await;
            // Ctrl-C first, so the server cancels the child's query too;
            // whoever waits for the child reaps it.
            me.interrupt();
            tokio::time::sleep(INTERRUPT_GRACE).await;
            me.kill();
        }))
    }

    /// Waits for the child (blocking; polls so the lock is never held
    /// across the wait and a kill can get in) and collects its stderr.
    pub fn wait(&self) -> Result<Exit, ChildError> {
        let status = loop {
            {
                let mut c = self.lock();
                match c.try_wait() {
                    Ok(Some(st)) => break st,
                    Ok(None) => {}
                    Err(source) => {
                        return Err(ChildError::Wait {
                            name: self.name,
                            source,
                        })
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = self
            .stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        Ok(Exit { status, stderr })
    }
}

/// Ends the kill-on-cancel watch when dropped.
pub struct KillOnCancel(tokio::task::JoinHandle<()>);

impl Drop for KillOnCancel {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads a child's stderr on a thread, keeping the first 64 KiB of what it
/// said and discarding the rest, so the child never blocks on a full pipe.
fn drain_stderr(stderr: std::process::ChildStderr) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let mut r = std::io::BufReader::new(stderr).take(64 * 1024);
        let _ = r.read_to_string(&mut s);
        let _ = std::io::copy(r.get_mut().get_mut(), &mut std::io::sink());
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn sleeper() -> std::process::Command {
        let mut c = std::process::Command::new("sleep");
        c.arg("30");
        c
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_token_kills_only_its_child() {
        let (a, _pa) = Proc::spawn(sleeper(), "sleep", false).unwrap();
        let (b, _pb) = Proc::spawn(sleeper(), "sleep", false).unwrap();
        let parent = CancellationToken::new();
        let (ta, tb) = (parent.child_token(), parent.child_token());
        let _ga = a.kill_on(&ta);
        let _gb = b.kill_on(&tb);
        let started = Instant::now();
        ta.cancel();
        let a2 = a.clone();
        let exit = tokio::task::spawn_blocking(move || a2.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert!(!exit.status.success());
        assert_eq!(exit.describe(), "killed by a signal");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!b.has_exited(), "the other child must keep running");
        parent.cancel();
        let exit = tokio::task::spawn_blocking(move || b.wait())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(exit.describe(), "killed by a signal");
    }

    #[tokio::test]
    async fn a_dropped_guard_no_longer_kills() {
        let (a, _p) = Proc::spawn(sleeper(), "sleep", false).unwrap();
        let t = CancellationToken::new();
        drop(a.kill_on(&t));
        t.cancel();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!a.has_exited());
        a.kill_and_reap();
        assert!(a.has_exited());
    }

    #[test]
    fn spawn_errors_name_the_program() {
        let e = Proc::spawn(
            std::process::Command::new("/nonexistent/pg_dump"),
            "pg_dump",
            false,
        )
        .err()
        .unwrap();
        assert!(e.to_string().starts_with("cannot start pg_dump: "), "{e}");
    }
}
