//! The storage layout (SPEC §4), in one place: where each kind of artifact
//! lives under a target. The backends know nothing of it.

use super::record::Kind;

/// Meta files end in this.
pub const META_SUFFIX: &str = ".meta.json";

/// Key of a backup's object; `extension` is the codec's (`.zst`, `.gz`, "")
/// plus `.age` when encrypted.
pub fn object_key(kind: Kind, target: &str, id: &str, extension: &str) -> String {
    match kind {
        Kind::Logical => format!("{target}/logical/{id}.dump{extension}"),
        Kind::Base => format!("{target}/base/{id}.tar{extension}"),
    }
}

/// Key of a further object of a backup, beside its dump: the `globals` SQL
/// at `<target>/logical/<id>.globals.sql`, a whole-server backup's database
/// `d` at `<target>/logical/<id>.db-<d>.dump` (`d` escaped, see
/// [`escape_database`]), plus the extension.
pub fn part_key(kind: Kind, target: &str, id: &str, name: &str, extension: &str) -> String {
    match (kind, datasaver_common::names::part_database(name)) {
        (Kind::Logical, Some(db)) => {
            format!(
                "{target}/logical/{id}.db-{}.dump{extension}",
                escape_database(db)
            )
        }
        (Kind::Logical, None) => format!("{target}/logical/{id}.{name}.sql{extension}"),
        // A base backup has no parts; an upload naming one is refused
        // before this (`repo::ingest`).
        (Kind::Base, _) => format!("{target}/base/{id}.{name}{extension}"),
    }
}

/// A database name as a key holds it: ASCII letters, digits, `_` and `-`
/// as they are, every other byte as `%XX`, so no name can add a dot, a
/// slash or anything a backend treats specially.
pub fn escape_database(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether a key segment is an escaped database name.
fn is_escaped_database(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if i + 2 >= b.len() || !(b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit()) {
                return false;
            }
            i += 3;
        } else if b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'-' {
            i += 1;
        } else {
            return false;
        }
    }
    !b.is_empty()
}

/// Whether a backup may have a part called `name`: the globals, or one of a
/// whole-server backup's databases. Anything else in an upload is refused.
pub fn is_part_name(name: &str) -> bool {
    name == super::record::GLOBALS || datasaver_common::names::part_database(name).is_some()
}

/// The parts an upload may hold, as an error message names them.
pub const PART_NAMES_TEXT: &str = "globals, database:<name>";

/// Key of a backup's meta file.
pub fn meta_key(kind: Kind, target: &str, id: &str) -> String {
    match kind {
        Kind::Logical => format!("{target}/logical/{id}{META_SUFFIX}"),
        Kind::Base => format!("{target}/base/{id}{META_SUFFIX}"),
    }
}

/// The backup id an object or meta key names, if it is one of ours.
pub fn id_of(key: &str) -> Option<&str> {
    let (dir, file) = key.rsplit_once('/')?;
    if !dir.ends_with("/logical") && !dir.ends_with("/base") {
        return None;
    }
    // Ids hold no dots: whatever follows the first one is the kind of file.
    let id = file.split_once('.').map(|(id, _)| id)?;
    datasaver_common::names::validate_backup_id(id).ok()?;
    Some(id)
}

/// The directory of each kind under its target.
fn kind_of_dir(dir: &str) -> Option<Kind> {
    match dir {
        "logical" => Some(Kind::Logical),
        "base" => Some(Kind::Base),
        _ => None,
    }
}

/// `<target>/<kind dir>/<file>` with a valid target and a known kind, and
/// nothing else.
fn split_layout(key: &str) -> Option<(Kind, &str, &str)> {
    let mut parts = key.split('/');
    let (target, dir, file) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    datasaver_common::names::validate_target(target).ok()?;
    Some((kind_of_dir(dir)?, target, file))
}

/// A backup id of `target`'s (`<target>_<time>[_n]`).
fn is_id_of(id: &str, target: &str) -> bool {
    datasaver_common::names::validate_backup_id(id).is_ok()
        && id
            .strip_prefix(target)
            .is_some_and(|rest| rest.starts_with('_'))
}

/// The kind, target and backup id a meta key names, when the key has the
/// layout's exact shape (`<target>/logical/<target>_<time>.meta.json`).
pub fn parse_meta_key(key: &str) -> Option<(Kind, &str, &str)> {
    let (kind, target, file) = split_layout(key)?;
    let id = file.strip_suffix(META_SUFFIX)?;
    is_id_of(id, target).then_some((kind, target, id))
}

/// Every segment size PostgreSQL allows: a WAL key is ours under any.
const WAL_SEG_SIZES: [u64; 11] = [
    1 << 20,
    1 << 21,
    1 << 22,
    1 << 23,
    1 << 24,
    1 << 25,
    1 << 26,
    1 << 27,
    1 << 28,
    1 << 29,
    1 << 30,
];

/// Codec extensions a stored object may end in: the codec's (`.zst`, `.gz`,
/// none), then `.age` when encrypted.
fn is_object_extension(ext: &str) -> bool {
    let ext = ext.strip_suffix(".age").unwrap_or(ext);
    ["", ".zst", ".gz"].contains(&ext)
}

/// A WAL series (issue 14): the WAL of one cluster (one
/// `system_identifier`) streamed for a target. A rebind starts a new one,
/// so two clusters' segments never share a name.
pub fn wal_series_prefix(target: &str, system_identifier: &str) -> String {
    format!("{target}/wal/{system_identifier}/")
}

/// Key of a series' description (`series.json`: system identifier, segment
/// size, when it was bound), written when it is bound: a rebuild reads the
/// segment size from it.
pub fn wal_series_key(target: &str, system_identifier: &str) -> String {
    format!(
        "{}series.json",
        wal_series_prefix(target, system_identifier)
    )
}

/// The target and system identifier a `series.json` key names.
pub fn parse_wal_series_key(key: &str) -> Option<(&str, &str)> {
    let mut parts = key.split('/');
    let (target, wal, sysid, file, None) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next(),
    ) else {
        return None;
    };
    (wal == "wal"
        && file == "series.json"
        && datasaver_common::names::validate_target(target).is_ok()
        && is_system_identifier(sysid))
    .then_some((target, sysid))
}

/// A system identifier as Postgres prints it: a decimal u64.
pub fn is_system_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 20
        && s.bytes().all(|b| b.is_ascii_digit())
        && s.parse::<u64>().is_ok()
}

/// What a WAL key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalKey<'a> {
    pub target: &'a str,
    pub system_identifier: &'a str,
    pub file: datasaver_common::wal::WalFile,
    /// BLAKE3 of the raw bytes, hex
    pub raw_blake3: &'a str,
    pub extension: &'a str,
}

/// Key of a stored WAL file (issue 14):
/// `<target>/wal/<system id>/<timeline>/<name>-<BLAKE3 of its raw bytes><extension>`,
/// `name` a segment's, `<segment>.partial` or `<timeline>.history`. The
/// content's hash in the name (as pgBackRest puts a SHA-1 in its) makes a
/// listing tell an identical retry from a different file under the same
/// name, and gives a rebuilt index every checksum without reading a byte.
pub fn wal_key(
    target: &str,
    system_identifier: &str,
    file: &datasaver_common::wal::WalFile,
    seg_size: u64,
    raw_blake3: &str,
    extension: &str,
) -> String {
    use datasaver_common::wal::{history_name, WalFile};
    let (tli, name) = match file {
        WalFile::Segment(s) => (s.timeline, s.name(seg_size)),
        WalFile::Partial(s) => (s.timeline, format!("{}.partial", s.name(seg_size))),
        WalFile::History(t) => (*t, history_name(*t)),
    };
    format!(
        "{}{tli:08X}/{name}-{raw_blake3}{extension}",
        wal_series_prefix(target, system_identifier)
    )
}

/// What a WAL key names, when the key has [`wal_key`]'s exact shape.
pub fn parse_wal_key(key: &str, seg_size: u64) -> Option<WalKey<'_>> {
    use datasaver_common::wal::WalFile;
    let mut parts = key.split('/');
    let (target, wal, sysid, dir, file, None) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next(),
    ) else {
        return None;
    };
    if wal != "wal"
        || datasaver_common::names::validate_target(target).is_err()
        || !is_system_identifier(sysid)
    {
        return None;
    }
    let (name, rest) = file.split_once('-')?;
    if rest.len() < 64 {
        return None;
    }
    let (hash, ext) = rest.split_at(64);
    if !hash
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        || !is_object_extension(ext)
    {
        return None;
    }
    let parsed = WalFile::parse(name, seg_size)?;
    let tli = match parsed {
        WalFile::Segment(s) | WalFile::Partial(s) => s.timeline,
        WalFile::History(t) => t,
    };
    (dir == format!("{tli:08X}")).then_some(WalKey {
        target,
        system_identifier: sysid,
        file: parsed,
        raw_blake3: hash,
        extension: ext,
    })
}

/// Whether `key` is one of the layout's own keys: a backup object
/// (`<target>/logical/<id>.dump` plus a codec's extension and `.age`) or a
/// meta file. Start-up cleanup of a shared S3 bucket touches only these.
pub fn is_own_key(key: &str) -> bool {
    if parse_meta_key(key).is_some() {
        return true;
    }
    if key.split('/').nth(1) == Some("wal") {
        return parse_wal_series_key(key).is_some()
            || WAL_SEG_SIZES
                .iter()
                .any(|size| parse_wal_key(key, *size).is_some());
    }
    let Some((kind, target, file)) = split_layout(key) else {
        return false;
    };
    let Some((id, rest)) = file.split_once('.') else {
        return false;
    };
    if kind == Kind::Base {
        let Some(ext) = rest.strip_prefix("tar") else {
            return false;
        };
        let ext = ext.strip_suffix(".age").unwrap_or(ext);
        return is_id_of(id, target) && ["", ".zst", ".gz"].contains(&ext);
    }
    let ext = if let Some(ext) = rest.strip_prefix("dump") {
        ext
    } else if let Some(ext) = rest
        .strip_prefix(super::record::GLOBALS)
        .and_then(|r| r.strip_prefix(".sql"))
    {
        ext
    } else if let Some((db, ext)) = rest.strip_prefix("db-").and_then(|r| r.split_once(".dump")) {
        if !is_escaped_database(db) {
            return false;
        }
        ext
    } else {
        return false;
    };
    let ext = ext.strip_suffix(".age").unwrap_or(ext);
    is_id_of(id, target) && ["", ".zst", ".gz"].contains(&ext)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_backups_live_under_base() {
        let id = "acme_20240111_020015";
        let o = object_key(Kind::Base, "acme", id, ".zst.age");
        assert_eq!(o, "acme/base/acme_20240111_020015.tar.zst.age");
        assert!(is_own_key(&o));
        let m = meta_key(Kind::Base, "acme", id);
        assert_eq!(parse_meta_key(&m), Some((Kind::Base, "acme", id)));
        assert_eq!(id_of(&o), Some(id));
        assert!(!is_own_key("acme/base/acme_20240111_020015.dump.zst"));
        assert!(!is_own_key("acme/base/acme_20240111_020015.tar.lz4"));
    }

    #[test]
    fn wal_keys_round_trip_and_only_their_exact_shape_is_ours() {
        use datasaver_common::wal::{Segment, WalFile, DEFAULT_SEG_SIZE as SEG};
        let hash = "ab".repeat(32);
        let seg = WalFile::Segment(Segment {
            timeline: 2,
            segno: 0x1_05,
        });
        let key = wal_key("app", "7301", &seg, SEG, &hash, ".zst.age");
        assert_eq!(
            key,
            format!("app/wal/7301/00000002/000000020000000100000005-{hash}.zst.age")
        );
        assert_eq!(
            parse_wal_key(&key, SEG),
            Some(WalKey {
                target: "app",
                system_identifier: "7301",
                file: seg,
                raw_blake3: hash.as_str(),
                extension: ".zst.age"
            })
        );
        assert!(is_own_key(&wal_series_key("app", "7301")));
        assert_eq!(
            parse_wal_series_key("app/wal/7301/series.json"),
            Some(("app", "7301"))
        );
        assert!(!is_own_key("app/wal/x7301/series.json"));
        assert!(is_own_key(&key));
        for (file, name) in [
            (WalFile::History(3), "00000003.history"),
            (
                WalFile::Partial(Segment {
                    timeline: 3,
                    segno: 7,
                }),
                "000000030000000000000007.partial",
            ),
        ] {
            let k = wal_key("app", "7301", &file, SEG, &hash, "");
            assert!(k.ends_with(&format!("/{name}-{hash}")), "{k}");
            assert_eq!(parse_wal_key(&k, SEG).map(|p| p.file), Some(file));
        }
        for foreign in [
            format!("app/wal/7301/00000001/000000020000000100000005-{hash}"),
            format!(
                "app/wal/7301/00000002/000000020000000100000005-{}",
                &hash[..60]
            ),
            format!("app/wal/7301/00000002/000000020000000100000005-{hash}.lz4"),
            "app/wal/7301/00000002/000000020000000100000005".to_string(),
            format!("app/wal/7301/00000002/x/000000020000000100000005-{hash}"),
            format!("App/wal/7301/00000002/000000020000000100000005-{hash}"),
            format!("app/wal/00000002/000000020000000100000005-{hash}"),
            format!("app/wal/73x1/00000002/000000020000000100000005-{hash}"),
        ] {
            assert!(!is_own_key(&foreign), "{foreign}");
        }
    }

    #[test]
    fn layout_and_back() {
        let o = object_key(Kind::Logical, "acme", "acme_20240111_020015", ".zst.age");
        assert_eq!(o, "acme/logical/acme_20240111_020015.dump.zst.age");
        let m = meta_key(Kind::Logical, "acme", "acme_20240111_020015");
        assert_eq!(m, "acme/logical/acme_20240111_020015.meta.json");
        assert_eq!(id_of(&o), Some("acme_20240111_020015"));
        assert_eq!(id_of(&m), Some("acme_20240111_020015"));
        let g = part_key(
            Kind::Logical,
            "acme",
            "acme_20240111_020015",
            "globals",
            ".zst",
        );
        assert_eq!(g, "acme/logical/acme_20240111_020015.globals.sql.zst");
        assert_eq!(id_of(&g), Some("acme_20240111_020015"));
        let d = part_key(
            Kind::Logical,
            "acme",
            "acme_20240111_020015",
            "database:my db.v2/x",
            ".zst",
        );
        assert_eq!(
            d,
            "acme/logical/acme_20240111_020015.db-my%20db%2Ev2%2Fx.dump.zst"
        );
        assert!(is_own_key(&d), "{d}");
        assert_eq!(id_of(&d), Some("acme_20240111_020015"));
        assert!(is_part_name("database:shop") && is_part_name("globals"));
        assert!(!is_part_name("database:") && !is_part_name("other"));
        assert_eq!(
            id_of("prefix/acme/logical/acme_20240111_020015.dump"),
            Some("acme_20240111_020015")
        );
        assert_eq!(id_of("acme/other/x.dump"), None);
        assert_eq!(
            parse_meta_key(&m),
            Some((Kind::Logical, "acme", "acme_20240111_020015"))
        );
    }

    #[test]
    fn own_keys_are_exactly_the_layout() {
        for own in [
            "acme/logical/acme_20240111_020015.dump",
            "acme/logical/acme_20240111_020015.dump.zst",
            "acme/logical/acme_20240111_020015_2.dump.gz.age",
            "acme-main/logical/acme-main_20240111_020015.dump.zst.age",
            "acme/logical/acme_20240111_020015.meta.json",
            "acme/logical/acme_20240111_020015.globals.sql.zst.age",
            "acme/logical/acme_20240111_020015.globals.sql",
            "acme/logical/acme_20240111_020015.db-shop.dump.zst",
            "acme/logical/acme_20240111_020015.db-my%20db.dump.gz.age",
        ] {
            assert!(is_own_key(own), "{own}");
        }
        for foreign in [
            // other applications in a shared bucket or under the prefix
            "videos/raw/upload.mp4",
            "acme/logical/notes.txt",
            "backups/acme/logical/acme_20240111_020015.dump.zst",
            "acme/logical/sub/acme_20240111_020015.dump.zst",
            "acme/physical/acme_20240111_020015.dump.zst",
            // an id of another target, an unknown extension, bad names
            "acme/logical/globex_20240111_020015.dump.zst",
            "acme/logical/acme_20240111_020015.dump.tar",
            "acme/logical/acme_20240111_020015.dump.zst.bak",
            "acme/logical/acme_20240111_020015.other.sql.zst",
            "acme/logical/acme_20240111_020015.globals.zst",
            "acme/logical/acme_20240111_020015.globals.sql.tar",
            "acme/logical/acme_20240111_020015.db-.dump",
            "acme/logical/acme_20240111_020015.db-a%2.dump",
            "acme/logical/acme_20240111_020015.db-a b.dump",
            "acme/logical/acme_20240111_020015.db-shop.sql",
            "Acme/logical/Acme_20240111_020015.dump",
            "acme/logical/acmex_20240111_020015.dump",
            "acme/logical/.acme_20240111_020015.dump",
            ".datasaver-probe/x",
            "",
        ] {
            assert!(!is_own_key(foreign), "{foreign}");
        }
        assert_eq!(
            parse_meta_key("acme/logical/globex_20240111_020015.meta.json"),
            None
        );
        assert_eq!(
            parse_meta_key("x/acme/logical/acme_20240111_020015.meta.json"),
            None
        );
    }
}
