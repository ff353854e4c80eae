//! `dsctl certs`: a fleet CA and the certificates issued from it. The subject
//! OU carries the role (coordinator / agent / operator) and the CN the name;
//! URI subject alternative names carry the grants (an agent's targets, an
//! operator's access level and scope); the coordinator authorizes by those
//! alone. Private keys are written 0600.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use datasaver_common::names::validate_pattern;
use datasaver_common::tls::{san, Access};
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

/// What a certificate grants beyond its role and name.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    /// agent: target patterns it may serve
    pub targets: Vec<String>,
    /// operator: access level
    pub access: Option<Access>,
    /// operator: target patterns it may see and act on
    pub scopes: Vec<String>,
}

impl Grants {
    fn uris(&self) -> Result<Vec<SanType>> {
        let mut out = Vec::new();
        let mut push = |prefix: &str, v: &str| -> Result<()> {
            let uri = format!("{prefix}{v}");
            out.push(SanType::URI(uri.clone().try_into().with_context(|| {
                format!("{uri:?} cannot be written into a certificate")
            })?));
            Ok(())
        };
        for t in &self.targets {
            validate_pattern(t).map_err(|e| anyhow::anyhow!("--target: {e}"))?;
            push(san::TARGET, t)?;
        }
        if let Some(a) = self.access {
            push(san::ACCESS, a.as_str())?;
        }
        for s in &self.scopes {
            validate_pattern(s).map_err(|e| anyhow::anyhow!("--scope: {e}"))?;
            push(san::SCOPE, s)?;
        }
        Ok(out)
    }
}

fn leaf_params(
    role: &str,
    name: &str,
    days: i64,
    sans: &[String],
    server: bool,
) -> Result<CertificateParams> {
    if days < 1 {
        bail!("--days {days}: a certificate must be valid for at least 1 day");
    }
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
    let mut op = leaf_params("operator", operator, days, &[], false)?;
    // Whoever set up the fleet may do everything; narrower certificates are
    // issued from here with `dsctl certs issue --operator --role/--scope`.
    op.subject_alt_names.extend(
        Grants {
            access: Some(Access::Admin),
            ..Grants::default()
        }
        .uris()?,
    );
    let op = op
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
    // An empty CRL from the start, so DATASAVER_TLS_CRL can point at it.
    crate::crl::init(out, overwrite)?;
    Ok(())
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
    name_ok(role, name)?;
    let uris = grants.uris()?;
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.crt"))
        .with_context(|| format!("cannot read {}", ca_dir.join("ca.crt").display()))?;
    let key_pem = std::fs::read_to_string(ca_dir.join("ca.key"))
        .with_context(|| format!("cannot read {}", ca_dir.join("ca.key").display()))?;
    let ca_key = KeyPair::from_pem(&key_pem).context("ca.key is not a usable private key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .context("ca.crt is not a usable CA certificate")?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let key = KeyPair::generate()?;
    let mut params = leaf_params(role, name, days, &[], false)?;
    params.subject_alt_names.extend(uris);
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
