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
    let id = file
        .strip_suffix(META_SUFFIX)
        .or_else(|| file.split_once(".dump").map(|(id, _)| id))?;
    datasaver_common::names::validate_backup_id(id).ok()?;
    Some(id)
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
        assert_eq!(
            id_of("prefix/acme/logical/acme_20240111_020015.dump"),
            Some("acme_20240111_020015")
        );
        assert_eq!(id_of("acme/other/x.dump"), None);
    }
}
