//! Progress of a backup, restore or verify, always on stderr so that stdout
//! holds only the result (`id=$(dsctl backup app)` must keep working).
//!
//! On a terminal: an indicatif bar when the total is known, a spinner with
//! bytes and rate when it is not. Elsewhere (logs, CI, cron mail): plain
//! lines, one per message or phase change and at most one byte count every
//! [`LINE_EVERY`], so a log shows where a long job was without flooding.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use datasaver_common::proto::JobProgress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::output::human_bytes;

/// Plain mode: the longest quiet stretch between two byte-count lines.
const LINE_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `--quiet`: the result and errors only.
    Quiet,
    /// stderr is a terminal.
    Bar,
    /// stderr is a file or pipe.
    Lines,
}

impl Mode {
    /// `--json` output is for programs: they get no plain progress lines
    /// (a bar on a terminal does not reach them).
    pub fn choose(quiet: bool, json: bool) -> Mode {
        if quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            Mode::Bar
        } else if json {
            Mode::Quiet
        } else {
            Mode::Lines
        }
    }
}

/// Which counter says how far a job is when the coordinator sends no total.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Backups: bytes from pg_dump.
    Raw,
    /// Restores and verifies: stored bytes read back.
    Stored,
}

/// How far a job is: bytes done and, when known, where they are heading.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Amount {
    done: u64,
    total: Option<u64>,
    /// The total is a guess (a backup's size from the previous one).
    estimate: bool,
}

fn amount(p: &JobProgress, counter: Counter) -> Amount {
    let (done, total, estimate) = if p.expected_stored_bytes > 0 {
        (p.stored_bytes, p.expected_stored_bytes, false)
    } else if p.expected_raw_bytes > 0 {
        (p.raw_bytes, p.expected_raw_bytes, true)
    } else {
        let done = match counter {
            Counter::Raw => p.raw_bytes,
            Counter::Stored => p.stored_bytes,
        };
        (done, 0, false)
    };
    // An estimate that was passed is no use as a total any more.
    let total = (total > 0 && done <= total).then_some(total);
    Amount {
        done,
        total,
        estimate,
    }
}

/// `about 40 s`, `about 3 min`, `about 2 h 5 min`.
fn about(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("about {s} s")
    } else if s < 3600 {
        format!("about {} min", s.div_ceil(60))
    } else {
        format!("about {} h {} min", s / 3600, (s % 3600) / 60)
    }
}

/// One plain progress line, e.g. `dump: 45.2 MiB of about 120.0 MiB (37%),
/// 12.1 MiB/s, about 6 s left`. `rate` is bytes per second, when known.
fn line(phase: &str, a: Amount, rate: Option<f64>) -> String {
    let mut s = format!("{phase}: {}", human_bytes(a.done));
    if let Some(total) = a.total {
        let pct = a.done.saturating_mul(100) / total.max(1);
        let of = if a.estimate { "of about" } else { "of" };
        s.push_str(&format!(" {of} {} ({pct}%)", human_bytes(total)));
    }
    if let Some(r) = rate.filter(|r| *r > 0.0) {
        s.push_str(&format!(", {}/s", human_bytes(r as u64)));
        if let Some(total) = a.total {
            let left = total.saturating_sub(a.done) as f64 / r;
            s.push_str(&format!(", {} left", about(Duration::from_secs_f64(left))));
        }
    }
    s
}

pub struct Progress {
    mode: Mode,
    counter: Counter,
    bar: Option<ProgressBar>,
    /// Whether the bar currently has the bar style (else a spinner).
    bar_style: bool,
    phase: String,
    /// First byte count of the current phase, for the average rate.
    phase_start: Option<(Instant, u64)>,
    /// Plain mode: when and in which phase the last byte-count line was printed.
    last_line: Option<(Instant, String)>,
}

impl Progress {
    pub fn new(mode: Mode, counter: Counter) -> Self {
        Self {
            mode,
            counter,
            bar: None,
            bar_style: false,
            phase: String::new(),
            phase_start: None,
            last_line: None,
        }
    }

    pub fn update(&mut self, p: &JobProgress) {
        if self.mode == Mode::Quiet {
            return;
        }
        if p.phase != self.phase {
            self.phase = p.phase.clone();
            self.phase_start = None;
            if let Some(bar) = &self.bar {
                bar.reset();
            }
        }
        if !p.message.is_empty() {
            self.message(p);
            return;
        }
        let a = amount(p, self.counter);
        let now = Instant::now();
        let rate = match self.phase_start {
            None => {
                self.phase_start = Some((now, a.done));
                None
            }
            Some((t0, b0)) => {
                let secs = now.duration_since(t0).as_secs_f64();
                (secs > 0.5).then(|| a.done.saturating_sub(b0) as f64 / secs)
            }
        };
        match self.mode {
            Mode::Quiet => {}
            Mode::Lines => {
                let due = match &self.last_line {
                    None => true,
                    Some((at, phase)) => *phase != p.phase || now.duration_since(*at) >= LINE_EVERY,
                };
                if due {
                    eprintln!("{}", line(&p.phase, a, rate));
                    self.last_line = Some((now, p.phase.clone()));
                }
            }
            Mode::Bar => self.draw(&p.phase, a),
        }
    }

    fn message(&mut self, p: &JobProgress) {
        match self.mode {
            Mode::Quiet => {}
            Mode::Lines => eprintln!("{}", p.message),
            Mode::Bar => {
                let bar = self.bar().clone();
                if p.queue_ahead.is_some() || p.phase == "queued" {
                    // The place in the queue changes in place, not line by line.
                    bar.set_style(spinner_style("{spinner} {msg}"));
                    self.bar_style = false;
                    bar.set_message(p.message.clone());
                } else {
                    // Messages stay on screen above the bar, as a log of
                    // what happened; the bar shows the phase until bytes flow.
                    bar.println(&p.message);
                    if !self.bar_style {
                        bar.set_style(spinner_style("{spinner} {prefix}"));
                    }
                    bar.set_prefix(p.phase.clone());
                }
            }
        }
    }

    fn bar(&mut self) -> &ProgressBar {
        self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(spinner_style("{spinner} {prefix}"));
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        })
    }

    fn draw(&mut self, phase: &str, a: Amount) {
        let had_bar_style = self.bar_style;
        let bar = self.bar().clone();
        bar.set_prefix(phase.to_string());
        match a.total {
            Some(total) => {
                if !had_bar_style {
                    let about = if a.estimate { "~" } else { "" };
                    let template = format!(
                        "{{prefix}} [{{bar:30}}] {{bytes}} of {about}{{total_bytes}}, \
                         {{binary_bytes_per_sec}}, {{eta}} left"
                    );
                    bar.set_style(
                        ProgressStyle::with_template(&template)
                            .unwrap_or_else(|_| ProgressStyle::default_bar())
                            .progress_chars("=> "),
                    );
                }
                bar.set_length(total);
                self.bar_style = true;
            }
            None => {
                if had_bar_style || bar.length().is_some() {
                    bar.unset_length();
                }
                bar.set_style(spinner_style(
                    "{spinner} {prefix}: {bytes}, {binary_bytes_per_sec}",
                ));
                self.bar_style = false;
            }
        }
        bar.set_position(a.done);
    }

    /// The job ended well: clear the bar and, unless quiet, say so in one
    /// line on stderr.
    pub fn done(&mut self, summary: Option<String>) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if self.mode != Mode::Quiet {
            if let Some(s) = summary {
                eprintln!("{s}");
            }
        }
    }

    /// The job failed: clear the bar so the error line stands alone.
    pub fn failed(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

fn spinner_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(raw: u64, stored: u64, exp_raw: u64, exp_stored: u64) -> JobProgress {
        JobProgress {
            phase: "x".into(),
            raw_bytes: raw,
            stored_bytes: stored,
            expected_raw_bytes: exp_raw,
            expected_stored_bytes: exp_stored,
            ..Default::default()
        }
    }

    #[test]
    fn picks_the_counter_with_a_total() {
        let a = amount(&p(10, 5, 0, 20), Counter::Raw);
        assert_eq!((a.done, a.total, a.estimate), (5, Some(20), false));
        let a = amount(&p(10, 5, 40, 0), Counter::Stored);
        assert_eq!((a.done, a.total, a.estimate), (10, Some(40), true));
        let a = amount(&p(10, 5, 0, 0), Counter::Stored);
        assert_eq!((a.done, a.total), (5, None));
        // an estimate that was passed is dropped
        let a = amount(&p(50, 5, 40, 0), Counter::Raw);
        assert_eq!((a.done, a.total), (50, None));
    }

    #[test]
    fn plain_lines_show_bytes_rate_percent_and_eta() {
        let mib = 1024 * 1024;
        let a = Amount {
            done: 30 * mib,
            total: Some(120 * mib),
            estimate: true,
        };
        assert_eq!(
            line("dump", a, Some(10.0 * mib as f64)),
            "dump: 30.0 MiB of about 120.0 MiB (25%), 10.0 MiB/s, about 9 s left"
        );
        let a = Amount {
            done: 30 * mib,
            total: None,
            estimate: false,
        };
        assert_eq!(line("restore", a, None), "restore: 30.0 MiB");
        assert_eq!(
            line("restore", a, Some(2.0 * mib as f64)),
            "restore: 30.0 MiB, 2.0 MiB/s"
        );
        assert_eq!(about(Duration::from_secs(125)), "about 3 min");
        assert_eq!(about(Duration::from_secs(7500)), "about 2 h 5 min");
    }
}
