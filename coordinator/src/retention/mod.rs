//! Retention: which of a target's backups to keep and which to delete, and why.
//!
//! [`gfs`] owns the *decision* (SPEC §7): GFS tagging, the keep rules, max
//! age, manual and failed backups, and the safety rules that beat every
//! policy. It is pure — the caller passes the backups, the policy, `now` and
//! the time zone — so `dsctl cleanup --dry-run` and the real cleanup run the
//! very same code, and every rule can be tested over simulated years without a
//! clock, a catalog or storage. Carrying a decision out (mark → delete objects
//! → delete row) is I/O and stays out of `gfs`.

pub mod cleanup;
pub mod gfs;
pub mod pitr;

#[cfg(test)]
mod gfs_props;
