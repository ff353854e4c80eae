//! `dsctl certs`: a fleet CA and the certificates issued from it. The subject
//! OU carries the role (coordinator / agent / operator) and the CN the name;
//! the coordinator authorizes by those. Private keys are written 0600.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

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

fn name_ok(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok {
        bail!("{kind} name {name:?} is not valid: use 1-64 letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

fn leaf_params(
    role: &str,
    name: &str,
    days: i64,
    sans: &[String],
    server: bool,
) -> Result<CertificateParams> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "datasaver");
    dn.push(DnType::OrganizationalUnitName, role);
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(days);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = if server {
        vec![ExtendedKeyUsagePurpose::ServerAuth]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    let mut alt = Vec::new();
    for s in sans {
        alt.push(match s.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                s.clone()
                    .try_into()
                    .with_context(|| format!("--san {s:?} is not a DNS name or IP"))?,
            ),
        });
    }
    p.subject_alt_names = alt;
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

pub fn init(out: &Path, sans: &[String], operator: &str, days: i64, overwrite: bool) -> Result<()> {
    name_ok("operator", operator)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "datasaver");
    dn.push(DnType::CommonName, "datasaver fleet CA");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    ca.not_before = now - Duration::hours(1);
    ca.not_after = now + Duration::days(days.max(3650));
    let ca_cert = ca.self_signed(&ca_key).context("signing the CA")?;
    let ca_pem = ca_cert.pem();
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca, ca_key);

    let sans: Vec<String> = if sans.is_empty() {
        vec!["localhost".into(), "127.0.0.1".into()]
    } else {
        sans.to_vec()
    };
    let coord_key = KeyPair::generate()?;
    let coord = leaf_params("coordinator", "coordinator", days, &sans, true)?
        .signed_by(&coord_key, &issuer)
        .context("signing the coordinator certificate")?;
    let op_key = KeyPair::generate()?;
    let op = leaf_params("operator", operator, days, &[], false)?
        .signed_by(&op_key, &issuer)
        .context("signing the operator certificate")?;

    write_file(&out.join("ca.key"), &ca_key_pem, 0o600, overwrite)?;
    write_file(&out.join("ca.crt"), &ca_pem, 0o644, overwrite)?;
    write_file(
        &out.join("coordinator.key"),
        &coord_key.serialize_pem(),
        0o600,
        overwrite,
    )?;
    write_file(&out.join("coordinator.crt"), &coord.pem(), 0o644, overwrite)?;
    write_file(
        &out.join("operator.key"),
        &op_key.serialize_pem(),
        0o600,
        overwrite,
    )?;
    write_file(&out.join("operator.crt"), &op.pem(), 0o644, overwrite)?;
    Ok(())
}

pub fn issue(
    ca_dir: &Path,
    role: &str,
    name: &str,
    out: &Path,
    days: i64,
    overwrite: bool,
) -> Result<()> {
    name_ok(role, name)?;
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.crt"))
        .with_context(|| format!("cannot read {}", ca_dir.join("ca.crt").display()))?;
    let key_pem = std::fs::read_to_string(ca_dir.join("ca.key"))
        .with_context(|| format!("cannot read {}", ca_dir.join("ca.key").display()))?;
    let ca_key = KeyPair::from_pem(&key_pem).context("ca.key is not a usable private key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .context("ca.crt is not a usable CA certificate")?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let key = KeyPair::generate()?;
    let cert = leaf_params(role, name, days, &[], false)?
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
    Ok(())
}
