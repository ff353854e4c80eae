//! Configuration helpers shared by the binaries: settings come from an
//! environment map (passed in, so tests never touch the process environment),
//! and every secret may be given as `NAME_FILE` pointing at a file instead.

use std::collections::HashMap;
use std::path::Path;

/// A setting that could not be used. The message names the setting.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{setting}: {message}")]
pub struct SettingError {
    /// The variable or flag name, e.g. `DATASAVER_COMPRESSION`.
    pub setting: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl SettingError {
    /// A new error about `setting`.
    pub fn new(setting: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            setting: setting.into(),
            message: message.into(),
        }
    }
}

/// A snapshot of environment variables.
#[derive(Debug, Clone, Default)]
pub struct Env(pub HashMap<String, String>);

impl Env {
    /// The current process environment.
    pub fn from_process() -> Self {
        Self(std::env::vars().collect())
    }

    /// An environment with exactly these variables (tests, tools).
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        Self(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// A non-empty value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(|s| s.as_str())
            .filter(|s| !s.trim().is_empty())
    }

    /// A secret from `name`, or read from the file named by `name_FILE`.
    /// Giving both is refused, so it is never ambiguous which one is used.
    pub fn secret(&self, name: &str) -> Result<Option<String>, SettingError> {
        let file_var = format!("{name}_FILE");
        match (self.get(name), self.get(&file_var)) {
            (Some(_), Some(_)) => Err(SettingError::new(
                name,
                format!("both {name} and {file_var} are set; set only one"),
            )),
            (Some(v), None) => Ok(Some(v.to_string())),
            (None, Some(path)) => read_secret_file(path)
                .map(Some)
                .map_err(|m| SettingError::new(file_var, m)),
            (None, None) => Ok(None),
        }
    }

    /// A parsed value of `name`, or `default` when unset.
    pub fn parse_or<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, SettingError>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|e| SettingError::new(name, format!("{v:?} is not valid: {e}"))),
        }
    }

    /// A parsed optional value of `name`.
    pub fn parse_opt<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, SettingError>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse()
                .map(Some)
                .map_err(|e| SettingError::new(name, format!("{v:?} is not valid: {e}"))),
        }
    }
}

/// Reads a secret file, dropping one trailing newline (as `echo` leaves one).
pub fn read_secret_file(path: &str) -> Result<String, String> {
    let mut s = std::fs::read_to_string(Path::new(path))
        .map_err(|e| format!("cannot read secret file {path}: {e}"))?;
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    Ok(s)
}

/// Parses a boolean the way people write them in env files.
pub fn parse_bool(setting: &str, v: &str) -> Result<bool, SettingError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(SettingError::new(
            setting,
            format!("{v:?} is not a boolean (use true or false)"),
        )),
    }
}

/// Parses a duration such as `90s`, `15m`, `26h`, `1.5h` or `7d` (a unit is
/// required: a bare number would be ambiguous).
pub fn parse_duration(setting: &str, v: &str) -> Result<std::time::Duration, SettingError> {
    let v = v.trim();
    let bad = || {
        SettingError::new(
            setting,
            format!(
                "{v:?} is not a duration (use a number with s, m, h or d, e.g. 90s, 26h, 1.5h)"
            ),
        )
    };
    let split = v.find(|c: char| c.is_ascii_alphabetic()).ok_or_else(bad)?;
    let (num, unit) = v.split_at(split);
    let n: f64 = num.trim().parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "s" | "sec" | "secs" => 1.0,
        "m" | "min" | "mins" => 60.0,
        "h" | "hour" | "hours" => 3600.0,
        "d" | "day" | "days" => 86400.0,
        _ => return Err(bad()),
    };
    let total = n * secs;
    if !total.is_finite() || !(0.0..=100.0 * 365.0 * 86400.0).contains(&total) {
        return Err(bad());
    }
    Ok(std::time::Duration::from_secs_f64(total))
}

/// A duration the way `parse_duration` reads it, in the largest unit that
/// states it exactly (`12h`, `90s`, `7d`); sub-second parts are dropped.
pub fn format_duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    for (unit, n) in [("d", 86400), ("h", 3600), ("m", 60)] {
        if s >= n && s.is_multiple_of(n) {
            return format!("{}{unit}", s / n);
        }
    }
    format!("{s}s")
}

/// Parses a byte size such as `1GiB`, `500MiB`, `10MB` or plain bytes
/// (`1048576`). Binary (`KiB`, `MiB`, `GiB`, `TiB`) and decimal (`kB`, `MB`,
/// `GB`, `TB`) units are both accepted, case-insensitively.
pub fn parse_size(setting: &str, v: &str) -> Result<u64, SettingError> {
    let v = v.trim();
    let bad = || {
        SettingError::new(
            setting,
            format!("{v:?} is not a size (use bytes or a number with KiB, MiB, GiB, TiB, e.g. 1GiB, 500MiB)"),
        )
    };
    let split = v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1000 * 1000,
        "mib" => 1 << 20,
        "g" | "gb" => 1000 * 1000 * 1000,
        "gib" => 1 << 30,
        "t" | "tb" => 1000 * 1000 * 1000 * 1000,
        "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    let num = num.trim();
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(factor).ok_or_else(bad);
    }
    // Fractions only with a unit ("1.5GiB"); a byte count is whole.
    let n: f64 = num.parse().map_err(|_| bad())?;
    let total = n * factor as f64;
    if factor == 1 || !total.is_finite() || total < 0.0 || total >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(total as u64)
}

/// A byte size the way `parse_size` reads it, in the largest binary unit
/// that keeps one decimal (`1.0 GiB`, `812.3 MiB`, `512 B`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, n) in UNITS {
        if bytes >= n {
            return format!("{:.1} {unit}", bytes as f64 / n as f64);
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatted_durations_read_back() {
        for (secs, text) in [
            (43200, "12h"),
            (90, "90s"),
            (604800, "7d"),
            (900, "15m"),
            (0, "0s"),
        ] {
            let d = std::time::Duration::from_secs(secs);
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration("X", text).unwrap(), d);
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::from_pairs(pairs)
    }

    #[test]
    fn secrets_from_value_or_file() {
        let dir = std::env::temp_dir().join(format!("ds-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("pw");
        std::fs::write(&f, "s3cret\n").unwrap();
        let e = env(&[("P_FILE", f.to_str().unwrap())]);
        assert_eq!(e.secret("P").unwrap().as_deref(), Some("s3cret"));
        let e = env(&[("P", "x")]);
        assert_eq!(e.secret("P").unwrap().as_deref(), Some("x"));
        let e = env(&[("P", "x"), ("P_FILE", "/nonexistent")]);
        assert!(e.secret("P").unwrap_err().to_string().contains("only one"));
        let e = env(&[("P_FILE", "/nonexistent/pw")]);
        let err = e.secret("P").unwrap_err();
        assert_eq!(err.setting, "P_FILE");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn parse_errors_name_the_setting() {
        let e = env(&[("N", "abc")]);
        let err = e.parse_or::<u32>("N", 1).unwrap_err();
        assert!(err.to_string().starts_with("N: "), "{err}");
        assert_eq!(env(&[]).parse_or::<u32>("N", 7).unwrap(), 7);
        assert!(parse_bool("B", "maybe").is_err());
    }

    #[test]
    fn durations() {
        let d = |v| parse_duration("D", v).map(|d| d.as_secs_f64());
        assert_eq!(d("90s").unwrap(), 90.0);
        assert_eq!(d("15m").unwrap(), 900.0);
        assert_eq!(d("26h").unwrap(), 93600.0);
        assert_eq!(d("1.5h").unwrap(), 5400.0);
        assert_eq!(d("7d").unwrap(), 604800.0);
        for bad in ["90", "h", "-1h", "1w", "abc", ""] {
            let e = parse_duration("D", bad).unwrap_err();
            assert_eq!(e.setting, "D", "{bad}");
        }
    }

    #[test]
    fn sizes() {
        let s = |v| parse_size("S", v);
        assert_eq!(s("1GiB").unwrap(), 1 << 30);
        assert_eq!(s("500MiB").unwrap(), 500 << 20);
        assert_eq!(s("500 mib").unwrap(), 500 << 20);
        assert_eq!(s("1048576").unwrap(), 1 << 20);
        assert_eq!(s("0").unwrap(), 0);
        assert_eq!(s("2GB").unwrap(), 2_000_000_000);
        assert_eq!(s("1.5GiB").unwrap(), 3 << 29);
        for bad in ["", "GiB", "-1", "1.5", "1 PiB", "abc", "99999999999TiB"] {
            assert_eq!(s(bad).unwrap_err().setting, "S", "{bad}");
        }
        assert_eq!(format_size(1 << 30), "1.0 GiB");
        assert_eq!(format_size(512), "512 B");
    }
}
