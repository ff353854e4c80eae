//! `dsctl certs`: a fleet CA and the certificates issued from it. The subject
//! OU carries the role (coordinator / agent / operator) and the CN the name;
//! URI subject alternative names carry the grants (an agent's targets, an
//! operator's access level and scope); the coordinator authorizes by those
//! alone. Private keys are written 0600.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result};
pub use datasaver_common::pki::Grants;
use datasaver_common::pki::{check_name, enrollment_ca, leaf_params, new_fleet};
use rcgen::{Issuer, KeyPair};
use time::OffsetDateTime;

/// The enrollment CA's files, beside the fleet CA's.
pub const ENROLLMENT_CERT: &str = "enrollment-ca.crt";
pub const ENROLLMENT_KEY: &str = "enrollment-ca.key";

fn write_file(path: &Path, data: &str, mode: u32, overwrite: bool) -> Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(mode);
    if overwrite {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts.open(path).with_context(|| {
        if path.exists() && !overwrite {
            format!(
                "{} already exists; refusing to overwrite it (remove it first)",
                path.display()
            )
        } else {
            format!("cannot write {}", path.display())
        }
    })?;
    f.write_all(data.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

pub fn init(out: &Path, sans: &[String], operator: &str, days: i64, overwrite: bool) -> Result<()> {
    let (f, _) = new_fleet(sans, operator, days)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for (name, pem, mode) in [
        ("ca.key", &f.ca_key, 0o600),
        ("ca.crt", &f.ca_cert, 0o644),
        ("coordinator.key", &f.coordinator_key, 0o600),
        ("coordinator.crt", &f.coordinator_cert, 0o644),
        ("operator.key", &f.operator_key, 0o600),
        ("operator.crt", &f.operator_cert, 0o644),
    ] {
        write_file(&out.join(name), pem, mode, overwrite)?;
    }
    // An empty CRL from the start, so DATASAVER_TLS_CRL can point at it.
    crate::crl::init(out, overwrite)?;
    Ok(())
}

/// Writes the enrollment CA (an intermediate signed by the fleet CA in
/// `dir`) for the coordinator to sign joining agents' certificates with, so
/// the fleet's root key can stay offline.
pub fn init_enrollment(dir: &Path, overwrite: bool) -> Result<()> {
    let (cert, key) = enrollment_ca(&fleet_issuer(dir)?)?;
    write_file(&dir.join(ENROLLMENT_KEY), &key, 0o600, overwrite)?;
    write_file(&dir.join(ENROLLMENT_CERT), &cert, 0o644, overwrite)?;
    Ok(())
}

fn fleet_issuer(ca_dir: &Path) -> Result<Issuer<'static, KeyPair>> {
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.crt"))
        .with_context(|| format!("cannot read {}", ca_dir.join("ca.crt").display()))?;
    let key_pem = std::fs::read_to_string(ca_dir.join("ca.key"))
        .with_context(|| format!("cannot read {}", ca_dir.join("ca.key").display()))?;
    let ca_key = KeyPair::from_pem(&key_pem).context("ca.key is not a usable private key")?;
    Issuer::from_ca_cert_pem(&ca_pem, ca_key).context("ca.crt is not a usable CA certificate")
}

/// Issues a leaf certificate; returns its expiry.
pub fn issue(
    ca_dir: &Path,
    role: &str,
    name: &str,
    grants: &Grants,
    out: &Path,
    days: i64,
    overwrite: bool,
) -> Result<OffsetDateTime> {
    check_name(role, name)?;
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.crt"))
        .with_context(|| format!("cannot read {}", ca_dir.join("ca.crt").display()))?;
    let issuer = fleet_issuer(ca_dir)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let key = KeyPair::generate()?;
    let params = leaf_params(role, name, days, &[], false, grants)?;
    let not_after = params.not_after;
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing the certificate")?;
    write_file(
        &out.join(format!("{name}.key")),
        &key.serialize_pem(),
        0o600,
        overwrite,
    )?;
    write_file(
        &out.join(format!("{name}.crt")),
        &cert.pem(),
        0o644,
        overwrite,
    )?;
    let ca_out = out.join("ca.crt");
    if ca_out != ca_dir.join("ca.crt") {
        write_file(&ca_out, &ca_pem, 0o644, true)?;
    }
    Ok(not_after)
}

/// An expiry as `2027-12-02 07:38 UTC (in 365 days)`.
pub fn format_expiry(at: OffsetDateTime) -> String {
    let days = (at - OffsetDateTime::now_utc()).whole_days();
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02} UTC (in {days} days)",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute()
    )
}
