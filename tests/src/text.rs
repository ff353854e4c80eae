//! dsctl's human output made comparable across runs and machines, for snapshot tests.
//!
//! [`Redactor::redact`] replaces what changes from run to run (times, backup ids, sizes,
//! durations, ports, temp paths, checksums, keys, versions) with fixed placeholders, and
//! re-aligns dsctl's tables afterwards: a table's column widths follow its longest cell, so
//! without re-aligning, a size of `950 B` in one run and `1.2 KiB` in the next would shift every
//! column to its right.

use regex::Regex;
use std::sync::OnceLock;

/// Replaces literals the test knows (backup ids, the fleet dir) with names it chooses, then
/// everything else that varies with generic placeholders.
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    names: Vec<(String, String)>,
}

impl Redactor {
    pub fn new() -> Redactor {
        Redactor::default()
    }

    /// Show `literal` as `name` wherever it appears, e.g. a backup id as `<backup A>` or the
    /// fleet's temp dir as `[FLEET]`. Longer literals are replaced first, so `x_2` is not
    /// half-replaced by a name for `x`.
    pub fn name(&mut self, literal: impl Into<String>, name: impl Into<String>) -> &mut Self {
        let literal = literal.into();
        if !literal.is_empty() {
            self.names.push((literal, name.into()));
            self.names
                .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        }
        self
    }

    /// `text` with known names and every varying value replaced; tables re-aligned.
    pub fn redact(&self, text: &str) -> String {
        let lines: Vec<&str> = text.lines().collect();
        let mut out: Vec<String> = Vec::new();
        let mut i = 0;
        while i < lines.len() {
            match table_columns(lines[i]) {
                Some(starts) => {
                    let mut rows = vec![split_cells(lines[i], &starts)];
                    let mut j = i + 1;
                    while j < lines.len() && is_row(lines[j], &starts) {
                        let cells = split_cells(lines[j], &starts)
                            .into_iter()
                            .map(|c| self.redact_line(&c))
                            .collect();
                        rows.push(cells);
                        j += 1;
                    }
                    out.extend(render(&rows, starts[0]));
                    i = j;
                }
                None => {
                    out.push(self.redact_line(lines[i]));
                    i += 1;
                }
            }
        }
        let mut s = out.join("\n");
        if text.ends_with('\n') {
            s.push('\n');
        }
        s
    }

    /// One line (or cell) with known names and varying values replaced.
    pub fn redact_line(&self, line: &str) -> String {
        let mut s = line.to_string();
        for (literal, name) in &self.names {
            s = s.replace(literal.as_str(), name);
        }
        for (re, with) in patterns() {
            s = re.replace_all(&s, *with).into_owned();
        }
        s
    }
}

/// Generic placeholders, applied in this order.
fn patterns() -> &'static [(Regex, &'static str)] {
    static P: OnceLock<Vec<(Regex, &'static str)>> = OnceLock::new();
    P.get_or_init(|| {
        let version = env!("CARGO_PKG_VERSION").replace('.', r"\.");
        [
            (r"blake3:[0-9a-f]{64}", "blake3:[CHECKSUM]"),
            (r"AGE-SECRET-KEY-1[0-9A-Z]+", "AGE-SECRET-KEY-1[SECRET]"),
            (r"\bage1[0-9a-z]{20,}", "age1[RECIPIENT]"),
            (
                r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})",
                "[TIME]",
            ),
            (r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", "[TIME]"),
            // <target>_<YYYYMMDD>_<HHMMSS>[_N]: backup ids and default restore databases
            (r"_\d{8}_\d{6}(?:_\d+)?\b", "_[ID]"),
            (r"\b\d+(?:\.\d+)? (?:B|KiB|MiB|GiB|TiB)\b", "[SIZE]"),
            (r"\b\d+ bytes\b", "[SIZE]"),
            (r"\b\d+(?:\.\d+)? s\b", "[DURATION]"),
            (
                r"\b(?:127\.0\.0\.1|localhost|\[::1\]):\d+",
                "127.0.0.1:[PORT]",
            ),
            (r"/tmp/[A-Za-z0-9._-]+", "[TMP]"),
            // server and pg_dump versions differ between machines
            (
                r"\(PostgreSQL\) \d+(?:\.\d+)*(?: \([^)]*\))?",
                "(PostgreSQL) [PG]",
            ),
            (
                r"PostgreSQL \d+(?:\.\d+)*(?: \([^)]*\))?",
                "PostgreSQL [PG]",
            ),
            (&format!(r"\b{version}\b"), "[VERSION]"),
            // a server's pg_control_system().system_identifier
            (r"(system identifier\s+)\d{6,}", "${1}[SYSID]"),
        ]
        .into_iter()
        .map(|(re, with)| {
            (
                Regex::new(re).unwrap_or_else(|e| panic!("redaction pattern {re:?}: {e}")),
                with,
            )
        })
        .collect()
    })
}

/// A dsctl table header (upper-case words, columns two or more spaces apart): the character
/// offset where each column starts.
fn table_columns(line: &str) -> Option<Vec<usize>> {
    let body = line.trim_start();
    let indent = line.len() - body.len();
    let is_header = !body.is_empty()
        && body.contains("  ")
        && body.chars().all(|c| c.is_ascii_uppercase() || c == ' ');
    if !is_header {
        return None;
    }
    let chars: Vec<char> = line.chars().collect();
    let mut starts = vec![indent];
    for k in indent + 2..chars.len() {
        if chars[k] != ' ' && chars[k - 1] == ' ' && chars[k - 2] == ' ' {
            starts.push(k);
        }
    }
    Some(starts)
}

/// Whether `line` is a row of the table with these column starts: same indent, and the two
/// characters before every column start it reaches are spaces (dsctl pads every column with
/// two), which a sentence after the table never has.
fn is_row(line: &str, starts: &[usize]) -> bool {
    let chars: Vec<char> = line.chars().collect();
    let indent = starts[0];
    if chars.len() <= indent || chars[..indent].iter().any(|c| *c != ' ') || chars[indent] == ' ' {
        return false;
    }
    starts[1..]
        .iter()
        .filter(|&&s| s < chars.len())
        .all(|&s| chars[s - 1] == ' ' && chars[s - 2] == ' ')
}

fn split_cells(line: &str, starts: &[usize]) -> Vec<String> {
    let chars: Vec<char> = line.chars().collect();
    starts
        .iter()
        .enumerate()
        .map(|(n, &s)| {
            let end = starts
                .get(n + 1)
                .copied()
                .unwrap_or(chars.len())
                .min(chars.len());
            if s >= end {
                String::new()
            } else {
                chars[s..end].iter().collect::<String>().trim().to_string()
            }
        })
        .collect()
}

/// Rows aligned the way dsctl aligns them: two spaces after the widest cell of each column.
fn render(rows: &[Vec<String>], indent: usize) -> Vec<String> {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|r| {
            let mut s = " ".repeat(indent);
            for (c, cell) in r.iter().enumerate() {
                s.push_str(cell);
                let pad = widths[c] - cell.chars().count() + 2;
                s.push_str(&" ".repeat(pad));
            }
            s.trim_end().to_string()
        })
        .collect()
}

/// stderr of a job in plain-line mode without its byte-count lines (`dump: 12.0 MiB, …/s`):
/// whether a job lasts long enough for one depends on the machine, the messages do not.
pub fn without_byte_counts(stderr: &str) -> String {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| {
        Regex::new(r"^[a-z_-]+: \d+(?:\.\d+)? (?:B|KiB|MiB|GiB|TiB)\b")
            .unwrap_or_else(|e| panic!("byte-count pattern: {e}"))
    });
    stderr
        .lines()
        .filter(|l| !re.is_match(l))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realigns_tables_after_redacting() {
        let text = "\
ID                   TARGET  SIZE     PINNED  LABEL
app_20261202_010203  app     950 B            first
app_20261202_010205  app     1.2 KiB  yes
3 backups: 2.1 KiB stored; times UTC
";
        let mut r = Redactor::new();
        r.name("app_20261202_010205", "<B>");
        assert_eq!(
            r.redact(text),
            "\
ID        TARGET  SIZE    PINNED  LABEL
app_[ID]  app     [SIZE]          first
<B>       app     [SIZE]  yes
3 backups: [SIZE] stored; times UTC
"
        );
    }

    #[test]
    fn indented_tables_end_at_the_next_sentence() {
        let text = "target app: keep last 1\n  ACTION        ID     WHY\n  keep          a_1    last 1 of 1\n  would delete  bb_22  not kept\ndry run: 1 backup would be deleted, nothing changed";
        assert_eq!(
            Redactor::new().redact(text),
            "target app: keep last 1\n  ACTION        ID     WHY\n  keep          a_1    last 1 of 1\n  would delete  bb_22  not kept\ndry run: 1 backup would be deleted, nothing changed"
        );
    }

    #[test]
    fn replaces_what_varies() {
        let r = Redactor::new();
        assert_eq!(
            r.redact_line("ok (blake3:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef) at 2026-12-02T01:02:03.5+00:00 in 1.2 s from 127.0.0.1:50123 /tmp/dsfleetAb12/x"),
            "ok (blake3:[CHECKSUM]) at [TIME] in [DURATION] from 127.0.0.1:[PORT] [TMP]/x"
        );
        assert_eq!(
            r.redact_line("app on 127.0.0.1 (PostgreSQL 17.5 (Debian 17.5-1))"),
            "app on 127.0.0.1 (PostgreSQL [PG])"
        );
        assert_eq!(
            r.redact_line("pg_dump (PostgreSQL) 16.4"),
            "pg_dump (PostgreSQL) [PG]"
        );
        assert_eq!(
            r.redact_line("system identifier  7714690401596385035"),
            "system identifier  [SYSID]"
        );
        assert_eq!(
            r.redact_line("into app_copy (43407 bytes of archive)"),
            "into app_copy ([SIZE] of archive)"
        );
    }

    #[test]
    fn drops_byte_count_lines_only() {
        let err =
            "backup x started\ndump: 12.0 MiB, 3.0 MiB/s\nbackup x completed: 1.0 MiB stored\n";
        assert_eq!(
            without_byte_counts(err),
            "backup x started\nbackup x completed: 1.0 MiB stored\n"
        );
    }
}
