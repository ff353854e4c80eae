//! The jobs' lifecycle against a real catalog and storage, with the agent's
//! side of the control stream played by the test: one outcome per job, the
//! deadline, cancel and shutdown each sending `CancelJob` and freeing the
//! slot.

use std::time::Duration;

use datasaver_common::proto::{
    coordinator_message, job_event, CoordinatorMessage, JobErrorKind, JobResult,
};
use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::Status;

use super::*;
use crate::fleet::AgentConn;
use crate::policy::Policies;
use crate::repo::testing::{completed_backup, header, upload};
use crate::repo::Status as RowStatus;

use crate::testing::fixture;

type AgentRx = mpsc::Receiver<Result<CoordinatorMessage, Status>>;

/// Connects a pretend agent serving `target`: (its connection id, what the
/// coordinator sends it).
fn connect(core: &Core, target: &str) -> (u64, AgentRx) {
    let (tx, rx) = mpsc::channel(32);
    let conn_id = core.fleet.next_conn_id();
    let now = core.clock.now();
    core.fleet.add_agent(AgentConn {
        conn_id,
        name: "agent1".into(),
        version: "test".into(),
        peer_addr: "127.0.0.1:1".into(),
        targets: vec![datasaver_common::proto::TargetInfo {
            name: target.into(),
            ..Default::default()
        }],
        connected_since: now,
        last_seen: now,
        tx,
        leaving: None,
    });
    (conn_id, rx)
}

async fn next_msg(rx: &mut AgentRx) -> coordinator_message::Msg {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the agent got a message in time")
        .expect("the control stream is open")
        .expect("not an error")
        .msg
        .expect("a message")
}

/// The job id of the backup job the agent was sent.
async fn backup_job(rx: &mut AgentRx) -> String {
    match next_msg(rx).await {
        coordinator_message::Msg::Backup(j) => j.job_id,
        m => panic!("expected a backup job, got {m:?}"),
    }
}

/// The job id and reason of the CancelJob the agent was sent.
async fn cancel_job(rx: &mut AgentRx) -> (String, String) {
    match next_msg(rx).await {
        coordinator_message::Msg::Cancel(c) => (c.job_id, c.reason),
        m => panic!("expected CancelJob, got {m:?}"),
    }
}

/// The job's final event, after draining progress.
async fn final_event(started: &mut Started) -> JobDone {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), started.events.recv())
            .await
            .expect("the job ended in time")
            .expect("a Done event before the stream ends")
            .expect("not an error");
        if let Some(job_event::Event::Done(d)) = e.event {
            return d;
        }
    }
}

async fn outcome(started: &mut Started) -> Outcome {
    (&mut started.outcome).await.expect("an outcome")
}

fn result(job_id: &str, ok: bool, error: &str) -> Report {
    Report::Result(JobResult {
        job_id: job_id.into(),
        ok,
        error: error.into(),
        ..Default::default()
    })
}

/// The job's one upload, as the agent API claims it.
fn claim(core: &Core, job: &str) -> crate::fleet::UploadClaim {
    core.fleet
        .claim_upload(job)
        .expect("the job takes its upload")
}

#[tokio::test]
async fn a_stored_backup_completes_and_frees_its_slot() {
    let f = fixture(Policies::default());
    let (conn, mut agent) = connect(&f.core, "shop");
    let mut started = start_backup(
        &f.core,
        "shop",
        Trigger::Manual,
        None,
        crate::repo::Kind::Logical,
    )
    .await
    .expect("started");
    let job = backup_job(&mut agent).await;
    let stored = store_upload(
        &f.core,
        &job,
        claim(&f.core, &job),
        &started.id,
        header(),
        futures::stream::iter(upload(b"a whole dump")),
    )
    .await
    .expect("stored");
    assert_eq!(stored.status, RowStatus::Completed);
    f.core.fleet.report(conn, &job, result(&job, true, ""));
    let done = final_event(&mut started).await;
    assert!(done.ok, "{done:?}");
    assert_eq!(done.backup.map(|b| b.id), Some(started.id.clone()));
    assert_eq!(outcome(&mut started).await, Outcome::Succeeded);
    f.core.tasks.close();
    f.core.tasks.wait().await;
    assert!(
        f.core.fleet.jobs_of("shop").is_empty(),
        "job left in the fleet"
    );
    // The slot is free: the next backup starts.
    let next = start_backup(
        &f.core,
        "shop",
        Trigger::Manual,
        None,
        crate::repo::Kind::Logical,
    )
    .await;
    assert!(next.is_ok(), "slot still held");
}

#[tokio::test]
async fn success_without_a_stored_object_is_a_failure() {
    let f = fixture(Policies::default());
    let (conn, mut agent) = connect(&f.core, "shop");
    let mut started = start_backup(
        &f.core,
        "shop",
        Trigger::Scheduled,
        None,
        crate::repo::Kind::Logical,
    )
    .await
    .expect("started");
    let job = backup_job(&mut agent).await;
    f.core.fleet.report(conn, &job, result(&job, true, ""));
    let done = final_event(&mut started).await;
    assert!(!done.ok);
    assert!(
        done.error.contains("the backup was not stored"),
        "{}",
        done.error
    );
    assert_eq!(outcome(&mut started).await, Outcome::Failed);
    let row = f.core.repo.find(&started.id).await.expect("row");
    assert_eq!(row.status, RowStatus::Failed);
}

#[tokio::test]
async fn the_agents_error_is_the_backups_error() {
    let f = fixture(Policies::default());
    let (conn, mut agent) = connect(&f.core, "shop");
    let mut started = start_backup(
        &f.core,
        "shop",
        Trigger::Scheduled,
        None,
        crate::repo::Kind::Logical,
    )
    .await
    .expect("started");
    let job = backup_job(&mut agent).await;
    f.core.fleet.report(
        conn,
        &job,
        result(&job, false, "pg_dump: permission denied for table t"),
    );
    let done = final_event(&mut started).await;
    assert!(
        done.error.contains("permission denied for table t"),
        "{}",
        done.error
    );
    assert_eq!(outcome(&mut started).await, Outcome::Failed);
    let row = f.core.repo.find(&started.id).await.expect("row");
    assert_eq!(row.status, RowStatus::Failed);
    assert_eq!(
        row.error.as_deref(),
        Some("pg_dump: permission denied for table t")
    );
}

#[tokio::test]
async fn a_planned_agent_stop_interrupts_the_backup() {
    let f = fixture(Policies::default());
    let (conn, mut agent) = connect(&f.core, "shop");
    let mut started = start_backup(
        &f.core,
        "shop",
        Trigger::Scheduled,
        None,
        crate::repo::Kind::Logical,
    )
    .await
    .expect("started");
    backup_job(&mut agent).await;
    f.core.fleet.mark_leaving(conn, "SIGTERM");
    f.core.fleet.remove_agent(conn, "agent agent1 disconnected");
    let done = final_event(&mut started).await;
    assert!(done.error.contains("interrupted"), "{}", done.error);
    assert_eq!(outcome(&mut started).await, Outcome::Interrupted);
    let row = f.core.repo.find(&started.id).await.expect("row");
    assert_eq!(row.status, RowStatus::Interrupted);
}

#[tokio::test]
async fn the_deadline_cancels_on_the_agent_and_fails_the_backup() {
    let f = fixture(Policies {
        job_timeout: Duration::from_millis(300),
        ..Policies::default()
    });
    let (_conn, mut agent) = connect(&f.core, "shop");
    let mut started = start_backup(
        &f.core,
        "shop",
        Trigger::Scheduled,
        None,
        crate::repo::Kind::Logical,
    )
    .await
    .expect("started");
    let job = backup_job(&mut agent).await;
    // The agent never answers, like a pg_dump stuck behind a lock.
    let (cancelled, reason) = cancel_job(&mut agent).await;
    assert_eq!(cancelled, job);
    assert!(reason.contains("DATASAVER_JOB_TIMEOUT"), "{reason}");
    let done = final_event(&mut started).await;
    assert!(done.error.contains("timed out after"), "{}", done.error);
    assert_eq!(outcome(&mut started).await, Outcome::Failed);
    let row = f.core.repo.find(&started.id).await.expect("row");
    assert_eq!(row.status, RowStatus::Failed);
    assert!(
        row.error
            .as_deref()
            .is_some_and(|e| e.contains("DATASAVER_JOB_TIMEOUT")),
        "{:?}",
        row.error
    );
    f.core.tasks.close();
    f.core.tasks.wait().await;
    assert!(f.core.fleet.jobs_of("shop").is_empty());
    assert!(
        start_backup(
            &f.core,
            "shop",
            Trigger::Scheduled,
            None,
            crate::repo::Kind::Logical
        )
        .await
        .is_ok(),
        "the slot is free for the next job"
    );
}

#[tokio::test]
async fn cancel_stops_the_job_on_its_agent() {
    let f = fixture(Policies::default());
    let (_conn, mut agent) = connect(&f.core, "shop");
    let mut started = start_backup(
        &f.core,
        "shop",
        Trigger::Manual,
        None,
        crate::repo::Kind::Logical,
    )
    .await
    .expect("started");
    let job = backup_job(&mut agent).await;
    assert!(!cancel(&f.core, "job-0", "no such job"));
    assert!(cancel(&f.core, &job, "by operator alice"));
    let (cancelled, reason) = cancel_job(&mut agent).await;
    assert_eq!(cancelled, job);
    assert!(reason.contains("by operator alice"), "{reason}");
    let done = final_event(&mut started).await;
    assert!(
        done.error.contains("cancelled: by operator alice"),
        "{}",
        done.error
    );
    assert_eq!(outcome(&mut started).await, Outcome::Failed);
}

#[tokio::test]
async fn shutdown_interrupts_jobs_and_waits_for_their_outcome() {
    let f = fixture(Policies::default());
    let (_conn, mut agent) = connect(&f.core, "shop");
    let mut started = start_backup(
        &f.core,
        "shop",
        Trigger::Scheduled,
        None,
        crate::repo::Kind::Logical,
    )
    .await
    .expect("started");
    let job = backup_job(&mut agent).await;
    f.core.cancel.cancel();
    f.core.tasks.close();
    tokio::time::timeout(Duration::from_secs(10), f.core.tasks.wait())
        .await
        .expect("jobs ended within the grace");
    let (cancelled, _) = cancel_job(&mut agent).await;
    assert_eq!(cancelled, job);
    assert_eq!(outcome(&mut started).await, Outcome::Interrupted);
    // Recorded before the tracker let shutdown go on.
    let row = f.core.repo.find(&started.id).await.expect("row");
    assert_eq!(row.status, RowStatus::Interrupted);
}

#[tokio::test]
async fn no_agent_no_job() {
    let f = fixture(Policies::default());
    let e = start_backup(
        &f.core,
        "shop",
        Trigger::Manual,
        None,
        crate::repo::Kind::Logical,
    )
    .await;
    assert!(matches!(e, Err(StartError::NoAgent(t)) if t == "shop"));
    assert!(f
        .core
        .repo
        .list(Some("shop"))
        .await
        .expect("list")
        .is_empty());
}

/// A restore job's id and mode as the agent received it.
async fn restore_job(rx: &mut AgentRx) -> datasaver_common::proto::RestoreJob {
    match next_msg(rx).await {
        coordinator_message::Msg::Restore(j) => j,
        m => panic!("expected a restore job, got {m:?}"),
    }
}

#[tokio::test]
async fn a_corrupt_backup_is_recorded_and_the_error_names_the_next_good_one() {
    let f = fixture(Policies::default());
    let older = completed_backup(&f.core.repo, "shop", b"older dump").await;
    let newer = completed_backup(&f.core.repo, "shop", b"newer dump").await;
    let (conn, mut agent) = connect(&f.core, "shop");
    let mut started = start_read(
        &f.core,
        newer.clone(),
        Read::Restore {
            target_db: "shop".into(),
            force: false,
            part: Default::default(),
        },
    )
    .expect("started");
    let job = restore_job(&mut agent).await;
    assert_eq!(job.backup_id, newer.id);
    assert_eq!(job.checksum, newer.checksum);
    assert!(
        f.core.fleet.backups_in_use().contains(&newer.id),
        "a backup being read is in use"
    );
    f.core.fleet.report(
        conn,
        &job.job_id,
        Report::Result(JobResult {
            job_id: job.job_id.clone(),
            ok: false,
            error: "checksum mismatch".into(),
            error_kind: JobErrorKind::ChecksumMismatch as i32,
            ..Default::default()
        }),
    );
    let done = final_event(&mut started).await;
    assert!(!done.ok);
    assert!(
        done.error
            .contains(&format!("next-oldest good backup is {}", older.id)),
        "{}",
        done.error
    );
    assert_eq!(outcome(&mut started).await, Outcome::Failed);
    let row = f.core.repo.find(&newer.id).await.expect("row");
    let v = row
        .verification
        .expect("the failure is kept as a verification");
    assert!(!v.ok);
    assert!(!f.core.fleet.backups_in_use().contains(&newer.id));
}

#[tokio::test]
async fn a_verify_records_its_result() {
    let f = fixture(Policies::default());
    let b = completed_backup(&f.core.repo, "shop", b"a dump").await;
    let (conn, mut agent) = connect(&f.core, "shop");
    let mut started = start_read(&f.core, b.clone(), Read::Verify).expect("started");
    let job = restore_job(&mut agent).await;
    assert_eq!(
        job.mode,
        datasaver_common::proto::RestoreMode::List as i32,
        "a verify changes nothing"
    );
    f.core.fleet.report(
        conn,
        &job.job_id,
        Report::Result(JobResult {
            job_id: job.job_id.clone(),
            ok: true,
            toc_entries: 7,
            ..Default::default()
        }),
    );
    let done = final_event(&mut started).await;
    assert!(done.ok, "{done:?}");
    assert_eq!(outcome(&mut started).await, Outcome::Succeeded);
    let v = f
        .core
        .repo
        .find(&b.id)
        .await
        .expect("row")
        .verification
        .expect("verified");
    assert!(v.ok);
    assert!(v.detail.contains("7 archive entries"), "{}", v.detail);
}

#[tokio::test]
async fn a_restore_past_its_deadline_is_cancelled_on_the_agent() {
    let f = fixture(Policies {
        job_timeout: Duration::from_millis(300),
        ..Policies::default()
    });
    let b = completed_backup(&f.core.repo, "shop", b"a dump").await;
    let (_conn, mut agent) = connect(&f.core, "shop");
    let mut started = start_read(
        &f.core,
        b,
        Read::DryRun {
            part: Default::default(),
        },
    )
    .expect("started");
    let job = restore_job(&mut agent).await;
    let (cancelled, _) = cancel_job(&mut agent).await;
    assert_eq!(cancelled, job.job_id);
    let done = final_event(&mut started).await;
    assert!(done.error.contains("timed out after"), "{}", done.error);
    assert_eq!(outcome(&mut started).await, Outcome::Failed);
}

#[tokio::test]
async fn a_stalled_upload_fails_the_backup_and_stops_the_agent() {
    let f = fixture(Policies {
        transfer_idle: Duration::from_secs(1),
        ..Policies::default()
    });
    let (_conn, mut agent) = connect(&f.core, "shop");
    let mut started = start_backup(
        &f.core,
        "shop",
        Trigger::Scheduled,
        None,
        crate::repo::Kind::Logical,
    )
    .await
    .expect("started");
    let job = backup_job(&mut agent).await;
    // Half a dump, then silence: the agent froze mid-upload.
    let first = upload(b"a dump that never ends").into_iter().take(1);
    let stalled = futures::stream::iter(first).chain(futures::stream::pending());
    let stored = store_upload(
        &f.core,
        &job,
        claim(&f.core, &job),
        &started.id,
        header(),
        stalled,
    )
    .await;
    let e = stored.expect_err("a stalled upload is not stored");
    assert!(
        e.to_string()
            .contains("no data for 1s (DATASAVER_TRANSFER_IDLE_TIMEOUT)"),
        "{e}"
    );
    let (cancelled, reason) = cancel_job(&mut agent).await;
    assert_eq!(cancelled, job);
    assert!(
        reason.contains("DATASAVER_TRANSFER_IDLE_TIMEOUT"),
        "{reason}"
    );
    let done = final_event(&mut started).await;
    assert!(
        done.error.contains("DATASAVER_TRANSFER_IDLE_TIMEOUT"),
        "{}",
        done.error
    );
    assert_eq!(outcome(&mut started).await, Outcome::Failed);
    let row = f.core.repo.find(&started.id).await.expect("row");
    assert_eq!(row.status, RowStatus::Failed);
    assert!(
        row.error
            .as_deref()
            .is_some_and(|e| e.contains("DATASAVER_TRANSFER_IDLE_TIMEOUT")),
        "{:?}",
        row.error
    );
    f.core.tasks.close();
    f.core.tasks.wait().await;
    assert!(
        start_backup(
            &f.core,
            "shop",
            Trigger::Scheduled,
            None,
            crate::repo::Kind::Logical
        )
        .await
        .is_ok(),
        "the slot is free for the next job"
    );
}

#[tokio::test]
async fn a_cancelled_backup_ends_its_upload_before_the_outcome_is_recorded() {
    let f = fixture(Policies::default());
    let (_conn, mut agent) = connect(&f.core, "shop");
    let mut started = start_backup(
        &f.core,
        "shop",
        Trigger::Manual,
        None,
        crate::repo::Kind::Logical,
    )
    .await
    .expect("started");
    let job = backup_job(&mut agent).await;
    // Part of a dump, then an agent that keeps the stream open (pg_dump
    // still running): only the cancel can end this upload.
    let first = upload(b"a dump that is still being written")
        .into_iter()
        .take(1);
    let open = futures::stream::iter(first).chain(futures::stream::pending());
    let claim = claim(&f.core, &job);
    let core = f.core.clone();
    let (job2, id2) = (job.clone(), started.id.clone());
    let uploading =
        tokio::spawn(async move { store_upload(&core, &job2, claim, &id2, header(), open).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!uploading.is_finished());
    assert!(f.core.fleet.cancel_job(&job, "cancelled by operator alice"));
    let (cancelled, _) = cancel_job(&mut agent).await;
    assert_eq!(cancelled, job);
    let done = final_event(&mut started).await;
    // The outcome came after the upload had ended and cleaned up.
    assert!(
        uploading.is_finished(),
        "outcome recorded while the upload ran"
    );
    let stored = uploading.await.expect("upload task");
    let e = stored.expect_err("a cancelled upload is not stored");
    assert!(e.to_string().contains("cancelled by operator alice"), "{e}");
    assert!(
        done.error.contains("cancelled by operator alice"),
        "{}",
        done.error
    );
    assert_eq!(outcome(&mut started).await, Outcome::Failed);
    let row = f.core.repo.find(&started.id).await.expect("row");
    assert_eq!(row.status, RowStatus::Failed);
    assert!(
        row.error
            .as_deref()
            .is_some_and(|e| e.contains("cancelled by operator alice")),
        "{:?}",
        row.error
    );
    // A job that was stopped takes no (late) upload.
    assert!(f.core.fleet.claim_upload(&job).is_none());
}

#[tokio::test]
async fn an_upload_that_keeps_moving_is_not_idle() {
    let f = fixture(Policies {
        transfer_idle: Duration::from_secs(1),
        ..Policies::default()
    });
    let (_conn, mut agent) = connect(&f.core, "shop");
    let started = start_backup(
        &f.core,
        "shop",
        Trigger::Manual,
        None,
        crate::repo::Kind::Logical,
    )
    .await
    .expect("started");
    let job = backup_job(&mut agent).await;
    // Slower than the idle limit in total, never idle that long at once;
    // and the wait before the first byte (pg_dump taking its locks) is not
    // counted.
    let slow = futures::stream::iter(upload(b"a slow but steady dump")).then(|p| async move {
        tokio::time::sleep(Duration::from_millis(600)).await;
        p
    });
    let stored = store_upload(
        &f.core,
        &job,
        claim(&f.core, &job),
        &started.id,
        header(),
        slow,
    )
    .await;
    assert_eq!(stored.expect("stored").status, RowStatus::Completed);
}

#[tokio::test]
async fn an_operator_cancels_by_backup_id_or_target() {
    let f = fixture(Policies::default());
    let (_conn, mut agent) = connect(&f.core, "shop");
    let wait = Duration::from_secs(10);
    let none = cancel_running(&f.core, &Which::Target("shop".into()), &|_| true, "x", wait).await;
    assert!(
        matches!(&none, Err(CancelError::NothingRunning(m)) if m == "nothing is running for target shop"),
        "{none:?}"
    );

    let mut started = start_backup(
        &f.core,
        "shop",
        Trigger::Manual,
        None,
        crate::repo::Kind::Logical,
    )
    .await
    .expect("started");
    let job = backup_job(&mut agent).await;
    let reason = "cancelled by operator alice";
    let none = cancel_running(&f.core, &Which::Id("nope".into()), &|_| true, reason, wait).await;
    assert!(none.is_err(), "{none:?}");
    // The agent takes the CancelJob; the job records its outcome meanwhile.
    let cancel = tokio::spawn({
        let core = f.core.clone();
        let id = started.id.clone();
        async move { cancel_running(&core, &Which::Id(id), &|_| true, reason, wait).await }
    });
    let (cancelled, why) = cancel_job(&mut agent).await;
    assert_eq!(cancelled, job);
    assert!(why.ends_with(reason), "{why}");
    let jobs = cancel.await.expect("task").expect("cancelled");
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].0, job);
    assert_eq!(jobs[0].1.backup_id, started.id);
    // Answered after the outcome was recorded.
    let row = f.core.repo.find(&started.id).await.expect("row");
    assert_eq!(row.status, RowStatus::Failed);
    assert!(
        row.error.as_deref().is_some_and(|e| e.contains(reason)),
        "{:?}",
        row.error
    );
    let done = final_event(&mut started).await;
    assert!(done.error.contains(reason), "{}", done.error);

    // By target: every job of it (here a verify).
    let b = completed_backup(&f.core.repo, "shop", b"a dump").await;
    let mut verify = start_read(&f.core, b, Read::Verify).expect("started");
    let vjob = restore_job(&mut agent).await.job_id;
    let cancel = tokio::spawn({
        let core = f.core.clone();
        async move {
            cancel_running(
                &core,
                &Which::Target("shop".into()),
                &|_| true,
                reason,
                wait,
            )
            .await
        }
    });
    let (cancelled, _) = cancel_job(&mut agent).await;
    assert_eq!(cancelled, vjob);
    let jobs = cancel.await.expect("task").expect("cancelled");
    assert_eq!(
        jobs.into_iter().map(|(id, _)| id).collect::<Vec<_>>(),
        vec![vjob]
    );
    let done = final_event(&mut verify).await;
    assert!(done.error.contains(reason), "{}", done.error);
}
