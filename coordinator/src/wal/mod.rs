//! Continuous WAL for point-in-time restores (issue 14; being built): the
//! pure pieces first — WAL names and positions (`common::wal`, re-exported
//! as `name`), timeline histories (`history`), and the restore plan and
//! gap finding (`plan`).
//! Storage of segments, the agent's stream and the restore itself plug in
//! on these.

pub mod history;
pub mod index;
pub mod live;
pub use datasaver_common::wal as name;
pub mod plan;
pub mod receive;
pub mod restore;
pub mod view;
