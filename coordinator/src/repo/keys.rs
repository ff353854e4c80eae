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
    }
}

/// Key of a further object of a backup (a part such as `globals`, SQL),
/// beside its dump: `<target>/logical/<id>.<name>.sql` plus the extension.
pub fn part_key(kind: Kind, target: &str, id: &str, name: &str, extension: &str) -> String {
    match kind {
        Kind::Logical => format!("{target}/logical/{id}.{name}.sql{extension}"),
    }
}

/// The parts a backup may have; anything else in an upload is refused.
pub const PART_NAMES: &[&str] = &[super::record::GLOBALS];

/// Key of a backup's meta file.
pub fn meta_key(kind: Kind, target: &str, id: &str) -> String {
    match kind {
        Kind::Logical => format!("{target}/logical/{id}{META_SUFFIX}"),
    }
}

/// The backup id an object or meta key names, if it is one of ours.
pub fn id_of(key: &str) -> Option<&str> {
    let (dir, file) = key.rsplit_once('/')?;
    if !dir.ends_with("/logical") {
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

/// Whether `key` is one of the layout's own keys: a backup object
/// (`<target>/logical/<id>.dump` plus a codec's extension and `.age`) or a
/// meta file. Start-up cleanup of a shared S3 bucket touches only these.
pub fn is_own_key(key: &str) -> bool {
    if parse_meta_key(key).is_some() {
        return true;
    }
    let Some((_, target, file)) = split_layout(key) else {
        return false;
    };
    let Some((id, rest)) = file.split_once('.') else {
        return false;
    };
    let ext = match rest.strip_prefix("dump") {
        Some(ext) => ext,
        None => {
            let Some(ext) = PART_NAMES
                .iter()
                .find_map(|p| rest.strip_prefix(p).and_then(|r| r.strip_prefix(".sql")))
            else {
                return false;
            };
            ext
        }
    };
    let ext = ext.strip_suffix(".age").unwrap_or(ext);
    is_id_of(id, target) && ["", ".zst", ".gz"].contains(&ext)
}

#[cfg(test)]
mod tests {
    use super::*;

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
