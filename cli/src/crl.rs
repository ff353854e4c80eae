//! `dsctl certs revoke`: the fleet CA's certificate revocation list,
//! `DIR/crl.pem`, signed with the CA key. Each revocation rewrites the whole
//! CRL (earlier entries kept, the CRL number one higher) and appends a line
//! to `DIR/revocations.log` for people: date, serial, subject, reason.
//! Coordinators read the file named by `DATASAVER_TLS_CRL`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use datasaver_common::crl;
use datasaver_common::tls::{identity_from_der, normalize_serial};
use rcgen::{
    CertificateRevocationListParams, Issuer, KeyIdMethod, KeyPair, RevocationReason,
    RevokedCertParams, SerialNumber,
};
use time::{Duration, OffsetDateTime};

pub const CRL_FILE: &str = "crl.pem";
pub const LOG_FILE: &str = "revocations.log";

/// What `revoke` did.
pub struct Outcome {
    pub serial: String,
    /// `operator:alice`, or what is known when revoked by serial
    pub subject: String,
    /// when it was revoked, if it already was before this call
    pub already: Option<i64>,
    pub reason: &'static str,
    pub crl: PathBuf,
    pub log: PathBuf,
    /// CRL number of the file now in place (hex)
    pub number: String,
    pub count: usize,
}

struct Ca {
    cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

fn load_ca(dir: &Path) -> Result<Ca> {
    let ca_path = dir.join("ca.crt");
    let key_path = dir.join("ca.key");
    let ca_pem = std::fs::read_to_string(&ca_path)
        .with_context(|| format!("cannot read {}", ca_path.display()))?;
    let key_pem = std::fs::read_to_string(&key_path).with_context(|| {
        format!(
            "cannot read {} (the CA key signs the CRL)",
            key_path.display()
        )
    })?;
    let key = KeyPair::from_pem(&key_pem)
        .with_context(|| format!("{} is not a usable private key", key_path.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)
        .with_context(|| format!("{} is not a usable CA certificate", ca_path.display()))?;
    let cert_der = crl::cert_der_from_pem(ca_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("{}: {e}", ca_path.display()))?;
    Ok(Ca { cert_der, issuer })
}

fn time_of(unix: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(unix).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn rcgen_reason(code: u8) -> Option<RevocationReason> {
    Some(match code {
        1 => RevocationReason::KeyCompromise,
        2 => RevocationReason::CaCompromise,
        3 => RevocationReason::AffiliationChanged,
        4 => RevocationReason::Superseded,
        5 => RevocationReason::CessationOfOperation,
        6 => RevocationReason::CertificateHold,
        8 => RevocationReason::RemoveFromCrl,
        9 => RevocationReason::PrivilegeWithdrawn,
        10 => RevocationReason::AaCompromise,
        // unspecified: RFC 5280 says to leave the reason out
        _ => return None,
    })
}

/// One more than the big-endian number `n`.
fn increment(n: &[u8]) -> Vec<u8> {
    let mut out = n.to_vec();
    for b in out.iter_mut().rev() {
        if *b == 0xff {
            *b = 0;
        } else {
            *b += 1;
            return out;
        }
    }
    out.insert(0, 1);
    out
}

/// Hex (any case, colons allowed) to the serial's big-endian bytes.
fn serial_bytes(hex: &str) -> Vec<u8> {
    let mut h = normalize_serial(hex);
    if h.len() % 2 == 1 {
        h.insert(0, '0');
    }
    (0..h.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(&h[i..i + 2], 16).ok())
        .collect()
}

/// Signs `revoked` as the CRL numbered `number` and puts it in place
/// atomically (a coordinator polling the file never reads half of one).
fn write_crl(dir: &Path, ca: &Ca, number: &[u8], revoked: Vec<RevokedCertParams>) -> Result<()> {
    let now = OffsetDateTime::now_utc();
    let params = CertificateRevocationListParams {
        this_update: now,
        // Coordinators do not enforce nextUpdate (a CRL is rewritten only
        // when something is revoked); it is set far out for other readers.
        next_update: now + Duration::days(3650),
        crl_number: SerialNumber::from_slice(number),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let pem = params
        .signed_by(&ca.issuer)
        .and_then(|c| c.pem())
        .context("signing the CRL with the CA key")?;
    let path = dir.join(CRL_FILE);
    let tmp = dir.join(format!(".{CRL_FILE}.tmp-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(pem.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

/// `dsctl certs init`: an empty CRL, so `DATASAVER_TLS_CRL` can point at it
/// from the first day.
pub fn init(dir: &Path, overwrite: bool) -> Result<()> {
    let path = dir.join(CRL_FILE);
    if path.exists() && !overwrite {
        bail!(
            "{} already exists; refusing to overwrite it (remove it first)",
            path.display()
        );
    }
    let ca = load_ca(dir)?;
    write_crl(dir, &ca, &[1], Vec::new())
}

/// The certificate in `dir` (its `*.crt` files) with serial `serial`, as
/// `role:name`.
fn subject_in(dir: &Path, serial: &str) -> Option<String> {
    let entries = std::fs::read_dir(dir).ok()?;
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("crt") {
            continue;
        }
        let Ok(pem) = std::fs::read(&p) else { continue };
        let Ok(der) = crl::cert_der_from_pem(&pem) else {
            continue;
        };
        if let Ok(id) = identity_from_der(&der) {
            if id.serial == serial {
                return Some(id.to_string());
            }
        }
    }
    None
}

/// The subject `revocations.log` recorded for `serial` (an earlier revocation).
fn subject_in_log(dir: &Path, serial: &str) -> Option<String> {
    let log = std::fs::read_to_string(dir.join(LOG_FILE)).ok()?;
    log.lines()
        .rev()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let mut f = l.split('\t');
            let (_, s, subject) = (f.next()?, f.next()?, f.next()?);
            (s == serial).then(|| subject.to_string())
        })
}

/// Revokes a certificate (by file or serial) in `dir/crl.pem`.
pub fn revoke(
    dir: &Path,
    cert: Option<&Path>,
    serial: Option<&str>,
    reason: Option<&str>,
) -> Result<Outcome> {
    let ca = load_ca(dir)?;
    let (serial, subject) = match (cert, serial) {
        (Some(path), _) => {
            let pem =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            let der = crl::cert_der_from_pem(&pem)
                .map_err(|e| anyhow::anyhow!("--cert {}: {e}", path.display()))?;
            crl::issued_by(&der, &ca.cert_der).map_err(|e| {
                anyhow::anyhow!(
                    "--cert {}: {e} (the CA in {}); revoke it with the CA that issued it",
                    path.display(),
                    dir.display()
                )
            })?;
            let id = identity_from_der(&der)
                .map_err(|e| anyhow::anyhow!("--cert {}: {e}", path.display()))?;
            (id.serial.clone(), id.to_string())
        }
        (None, Some(s)) => {
            let ok = s.chars().all(|c| c.is_ascii_hexdigit() || c == ':')
                && s.chars().any(|c| c.is_ascii_hexdigit());
            if !ok {
                bail!("--serial {s:?} is not a hex serial number (like 3f:2a:9c or 3F2A9C; `openssl x509 -noout -serial -in FILE` shows it)");
            }
            let serial = normalize_serial(s);
            let subject = subject_in(dir, &serial)
                .or_else(|| subject_in_log(dir, &serial))
                .unwrap_or_else(|| "unknown certificate (revoked by serial)".to_string());
            (serial, subject)
        }
        (None, None) => bail!("give --cert FILE or --serial HEX"),
    };
    let code = reason.and_then(crl::reason_code).unwrap_or(0);
    let crl_path = dir.join(CRL_FILE);
    let log_path = dir.join(LOG_FILE);
    // The CRL in place, checked to be this CA's: its entries are kept.
    let existing = match std::fs::read(&crl_path) {
        Ok(pem) => {
            let der =
                crl::from_pem(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", crl_path.display()))?;
            crl::verify(der.as_ref(), &ca.cert_der).map_err(|e| {
                anyhow::anyhow!(
                    "{}: {e}; move it away to start a new CRL",
                    crl_path.display()
                )
            })?;
            Some(
                crl::inspect(der.as_ref())
                    .map_err(|e| anyhow::anyhow!("{}: {e}", crl_path.display()))?,
            )
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => bail!("cannot read {}: {e}", crl_path.display()),
    };
    let number_now = existing
        .as_ref()
        .map(|c| c.number.clone())
        .unwrap_or_default();
    if let Some(prev) = existing.as_ref().and_then(|c| c.find(&serial)) {
        return Ok(Outcome {
            serial,
            subject,
            already: Some(prev.revoked_at),
            reason: crl::reason_name(prev.reason.unwrap_or(0)),
            crl: crl_path,
            log: log_path,
            number: crl::hex(&number_now),
            count: existing.as_ref().map_or(0, |c| c.revoked.len()),
        });
    }
    let now = OffsetDateTime::now_utc();
    let mut entries: Vec<RevokedCertParams> = existing
        .iter()
        .flat_map(|c| c.revoked.iter())
        .map(|r| RevokedCertParams {
            serial_number: SerialNumber::from_slice(&r.serial_bytes),
            revocation_time: time_of(r.revoked_at),
            reason_code: r.reason.and_then(rcgen_reason),
            invalidity_date: None,
        })
        .collect();
    entries.push(RevokedCertParams {
        serial_number: SerialNumber::from_slice(&serial_bytes(&serial)),
        revocation_time: now,
        reason_code: rcgen_reason(code),
        invalidity_date: None,
    });
    let count = entries.len();
    let number = if number_now.is_empty() {
        vec![1]
    } else {
        increment(&number_now)
    };
    write_crl(dir, &ca, &number, entries)?;
    let date = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let text: String = reason
        .unwrap_or("")
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let new_log = !log_path.exists();
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(&log_path)
        .with_context(|| format!("cannot write {}", log_path.display()))?;
    let mut line = String::new();
    if new_log {
        line.push_str("# date\tserial\tsubject\treason code\treason given\n");
    }
    line.push_str(&format!(
        "{date}\t{serial}\t{subject}\t{}\t{text}\n",
        crl::reason_name(code)
    ));
    log.write_all(line.as_bytes())
        .with_context(|| format!("cannot write {}", log_path.display()))?;
    Ok(Outcome {
        serial,
        subject,
        already: None,
        reason: crl::reason_name(code),
        crl: crl_path,
        log: log_path,
        number: crl::hex(&number),
        count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crl_numbers_count_up() {
        assert_eq!(increment(&[1]), vec![2]);
        assert_eq!(increment(&[0x01, 0xff]), vec![2, 0]);
        assert_eq!(increment(&[0xff]), vec![1, 0]);
        assert_eq!(increment(&[]), vec![1]);
    }

    #[test]
    fn serials_in_any_spelling() {
        assert_eq!(serial_bytes("0A:bc:DE"), vec![0x0a, 0xbc, 0xde]);
        assert_eq!(serial_bytes("abcde"), vec![0x0a, 0xbc, 0xde]);
        assert_eq!(serial_bytes("00:7f"), vec![0x7f]);
    }

    #[test]
    fn revoke_keeps_entries_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        crate::certs::init(d, &[], "admin", 30, false).unwrap();
        let first = crl::inspect(
            crl::from_pem(&std::fs::read(d.join(CRL_FILE)).unwrap())
                .unwrap()
                .as_ref(),
        )
        .unwrap();
        assert!(first.revoked.is_empty());
        assert_eq!(first.number, vec![1]);

        let o = revoke(
            d,
            Some(&d.join("operator.crt")),
            None,
            Some("keyCompromise: laptop lost"),
        )
        .unwrap();
        assert_eq!(o.subject, "operator:admin");
        assert_eq!(o.reason, "keyCompromise");
        assert!(o.already.is_none());
        let again = revoke(d, None, Some(&o.serial.to_uppercase()), None).unwrap();
        assert!(again.already.is_some());
        assert_eq!(again.subject, "operator:admin", "found by serial in DIR");

        let o2 = revoke(d, None, Some("12:34"), Some("stolen")).unwrap();
        assert_eq!(o2.reason, "unspecified");
        let now = crl::inspect(
            crl::from_pem(&std::fs::read(d.join(CRL_FILE)).unwrap())
                .unwrap()
                .as_ref(),
        )
        .unwrap();
        assert_eq!(now.number, vec![3]);
        assert_eq!(
            now.revoked
                .iter()
                .map(|r| r.serial.as_str())
                .collect::<Vec<_>>(),
            [o.serial.as_str(), "1234"]
        );
        assert_eq!(now.revoked[0].reason, Some(1));
        let ca = crl::cert_der_from_pem(&std::fs::read(d.join("ca.crt")).unwrap()).unwrap();
        crl::verify(
            crl::from_pem(&std::fs::read(d.join(CRL_FILE)).unwrap())
                .unwrap()
                .as_ref(),
            &ca,
        )
        .unwrap();
        let log = std::fs::read_to_string(d.join(LOG_FILE)).unwrap();
        assert_eq!(log.lines().count(), 3, "{log}");
        assert!(
            log.contains("operator:admin\tkeyCompromise\tkeyCompromise: laptop lost"),
            "{log}"
        );
        assert!(revoke(d, None, Some("xyz"), None).is_err());
    }
}
