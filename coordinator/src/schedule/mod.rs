//! Schedules: cron expressions per target (the agent asks, the coordinator's
//! configuration may override), a pure planner that decides what runs when,
//! and the driver that runs it against the real fleet.

pub mod bases;
pub mod cron;
pub mod drills;
pub mod driver;
pub mod planner;
