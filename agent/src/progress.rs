//! Progress reports sent to the coordinator on the control stream while a
//! job runs. Advisory only: a full channel drops a report, never the job.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use datasaver_common::proto::{agent_message, AgentMessage, JobProgress};
use tokio::sync::mpsc;

#[derive(Default)]
pub struct Counters {
    pub raw: AtomicU64,
    pub stored: AtomicU64,
}

#[derive(Clone)]
pub struct Reporter {
    pub job_id: String,
    pub tx: mpsc::Sender<AgentMessage>,
}

impl Reporter {
    pub fn phase(&self, phase: &str, message: &str) {
        let _ = self.tx.try_send(AgentMessage {
            msg: Some(agent_message::Msg::Progress(JobProgress {
                job_id: self.job_id.clone(),
                phase: phase.into(),
                message: message.into(),
                ..Default::default()
            })),
        });
    }

    /// Sends byte counts every second until the handle is aborted.
    pub fn start_ticker(
        &self,
        phase: &'static str,
        counters: Arc<Counters>,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let _ = me.tx.try_send(AgentMessage {
                    msg: Some(agent_message::Msg::Progress(JobProgress {
                        job_id: me.job_id.clone(),
                        phase: phase.into(),
                        raw_bytes: counters.raw.load(Ordering::Relaxed),
                        stored_bytes: counters.stored.load(Ordering::Relaxed),
                        ..Default::default()
                    })),
                });
            }
        })
    }
}
