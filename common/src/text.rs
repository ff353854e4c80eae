//! Text that came from another process (an agent's errors, progress
//! messages, upload header fields) made safe to store and show: one line, no
//! control characters, bounded length. A compromised or broken agent must not
//! be able to forge log lines, break `dsctl`'s table output or fill the
//! catalog with megabytes of text.

/// Longest error or message kept from an agent, in bytes.
pub const MAX_MESSAGE: usize = 4096;
/// Longest name-like field kept from an agent (database, version, host), in bytes.
pub const MAX_NAME: usize = 256;

/// `s` as one line of at most `max` bytes: every control character (line
/// breaks, escapes, NUL, DEL, C1 controls) becomes a space, and a string
/// that is too long is cut at a character boundary and ends in `…` (still
/// within `max`).
pub fn sanitize(s: &str, max: usize) -> String {
    const MORE: char = '…';
    let clean = |c: char| if c.is_control() { ' ' } else { c };
    if s.len() <= max {
        return s.chars().map(clean).collect();
    }
    // Room for the ellipsis when there is any; below that, just cut.
    let room = if max >= MORE.len_utf8() {
        max - MORE.len_utf8()
    } else {
        max
    };
    let mut out = String::with_capacity(max);
    for c in s.chars().map(clean) {
        if out.len() + c.len_utf8() > room {
            break;
        }
        out.push(c);
    }
    if max >= MORE.len_utf8() {
        out.push(MORE);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn controls_become_spaces() {
        assert_eq!(
            sanitize("pg_dump: error\nfake log line\r\x1b[31mred\x00", 100),
            "pg_dump: error fake log line  [31mred "
        );
        assert_eq!(sanitize("tab\there\u{85}next\u{7f}", 100), "tab here next ");
        assert_eq!(sanitize("ünïcödé ok", 100), "ünïcödé ok");
    }

    #[test]
    fn long_text_is_cut_with_an_ellipsis() {
        assert_eq!(sanitize("abcdefghij", 10), "abcdefghij");
        assert_eq!(sanitize("abcdefghijk", 10), "abcdefg…");
        // never inside a character: "é" is two bytes
        assert_eq!(sanitize("éééééé", 7), "éé…");
        assert_eq!(sanitize("abc", 2), "ab");
        assert_eq!(sanitize("abc", 0), "");
    }

    proptest! {
        #[test]
        fn output_is_one_clean_bounded_line(s in any::<String>(), max in 0usize..64) {
            let out = sanitize(&s, max);
            prop_assert!(out.len() <= max, "{} > {max}", out.len());
            prop_assert!(!out.chars().any(char::is_control), "{out:?}");
            if s.len() <= max {
                prop_assert_eq!(out.chars().count(), s.chars().count());
            } else if max >= 3 {
                prop_assert!(out.ends_with('…'));
            }
        }

        #[test]
        fn clean_short_text_is_unchanged(s in "[a-zA-Z0-9 .:/_-]{0,40}") {
            prop_assert_eq!(sanitize(&s, 40), s);
        }
    }
}
