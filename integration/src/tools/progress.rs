//! Progress bars for long work (warm-up, training, eval) that also report when nobody watches a
//! terminal: under `nohup`, in CI logs or piped through `tee`, indicatif hides its bar, so a
//! 90-minute eval would print nothing until it ends. There the bar is written as a plain line
//! at most every [`LOG_EVERY`], whenever its message (the phase) changes, and when its count
//! is complete.

use parking_lot::Mutex;
use std::fmt;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

/// How often a bar drawn as log lines writes one.
pub const LOG_EVERY: Duration = Duration::from_secs(30);

/// The progress bar every tool shows on long work: `what` (`len` steps), bar, count, time.
pub fn progress_bar(len: usize, what: &str) -> anyhow::Result<ProgressBar> {
    let bar = styled_bar(
        len,
        "{msg:10} {bar:40} {pos}/{len} {elapsed_precise} (eta {eta})",
    )?;
    bar.set_message(what.to_string());
    Ok(bar)
}

/// A bar of `len` steps with an indicatif `template`, drawn on stderr: as a bar on a terminal,
/// otherwise as log lines (see the module docs).
pub fn styled_bar(len: usize, template: &str) -> anyhow::Result<ProgressBar> {
    let bar = ProgressBar::with_draw_target(Some(len as u64), draw_target())
        .with_style(ProgressStyle::with_template(template)?);
    Ok(bar)
}

/// stderr's own target on a terminal, [`LogLines`] on stderr otherwise.
fn draw_target() -> ProgressDrawTarget {
    if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        // every redraw reaches LogLines (cheap: it compares a line) so the last is not lost
        ProgressDrawTarget::term_like(Box::new(LogLines::new(
            Box::new(std::io::stderr()),
            LOG_EVERY,
        )))
    }
}

/// A [`TermLike`] that turns redraws into lines: a drawn bar becomes one line, written when
/// its phase (the text before the bar's first block character) changed, its count is
/// complete (`n/n`) or `every` passed.
pub struct LogLines {
    every: Duration,
    state: Mutex<LogState>,
}

struct LogState {
    sink: Box<dyn Write + Send>,
    pending: String,
    last: Option<(Instant, String)>,
}

impl LogLines {
    /// Lines go to `sink`, one at least `every` apart unless the phase changes.
    pub fn new(sink: Box<dyn Write + Send>, every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new(LogState {
                sink,
                pending: String::new(),
                last: None,
            }),
        }
    }

    fn state(&self) -> parking_lot::MutexGuard<'_, LogState> {
        self.state.lock()
    }
}

/// The text before the bar itself: the message (phase) of the default templates.
fn phase(line: &str) -> &str {
    line.split(['█', '░', '▏', '▎', '▍', '▌', '▋', '▊', '▉'])
        .next()
        .unwrap_or(line)
        .trim()
}

/// Whether the line shows a finished count (`n/n`, the templates' `{pos}/{len}`).
fn complete(line: &str) -> bool {
    line.split_whitespace().any(|word| {
        word.split_once('/').is_some_and(|(pos, len)| {
            matches!((pos.parse::<u64>(), len.parse::<u64>()), (Ok(p), Ok(l)) if p == l)
        })
    })
}

impl fmt::Debug for LogLines {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogLines")
            .field("every", &self.every)
            .finish()
    }
}

impl TermLike for LogLines {
    fn width(&self) -> u16 {
        120
    }

    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }

    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }

    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }

    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }

    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.write_str(s)
    }

    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.state().pending.push_str(s);
        Ok(())
    }

    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn flush(&self) -> std::io::Result<()> {
        let mut state = self.state();
        let line = std::mem::take(&mut state.pending)
            .replace('\r', "")
            .trim()
            .to_string();
        if line.is_empty() {
            return Ok(());
        }
        let due = match &state.last {
            None => true,
            Some((at, previous)) => {
                at.elapsed() >= self.every
                    || phase(previous) != phase(&line)
                    || (complete(&line) && previous != &line)
            }
        };
        if due {
            writeln!(state.sink, "{line}")?;
            state.sink.flush()?;
            state.last = Some((Instant::now(), line));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn draw(term: &LogLines, text: &str) {
        term.write_str(text).expect("write");
        term.write_str("    ").expect("filler");
        term.flush().expect("flush");
    }

    fn lines(sink: &Shared) -> Vec<String> {
        String::from_utf8(sink.0.lock().clone())
            .expect("utf-8")
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn writes_the_first_draw_then_only_phase_changes_within_the_interval() {
        let sink = Shared::default();
        let term = LogLines::new(Box::new(sink.clone()), Duration::from_secs(3600));
        draw(&term, "warm-up    ████░░░░ 1/8");
        draw(&term, "warm-up    █████░░░ 2/8");
        draw(&term, "calibrate  ██████░░ 3/8");
        draw(&term, "calibrate  ███████░ 4/8");
        draw(&term, "calibrate  ████████ 8/8");
        draw(&term, "calibrate  ████████ 8/8");
        assert_eq!(
            lines(&sink),
            [
                "warm-up    ████░░░░ 1/8",
                "calibrate  ██████░░ 3/8",
                "calibrate  ████████ 8/8"
            ]
        );
    }

    #[test]
    fn writes_again_once_the_interval_passed() {
        let sink = Shared::default();
        let term = LogLines::new(Box::new(sink.clone()), Duration::ZERO);
        draw(&term, "eval ██░░ 1/4");
        draw(&term, "eval ███░ 2/4");
        assert_eq!(lines(&sink), ["eval ██░░ 1/4", "eval ███░ 2/4"]);
    }

    #[test]
    fn a_bar_on_a_log_target_reports_its_position() {
        let sink = Shared::default();
        let term = LogLines::new(Box::new(sink.clone()), Duration::ZERO);
        let bar =
            ProgressBar::with_draw_target(Some(10), ProgressDrawTarget::term_like(Box::new(term)))
                .with_style(
                    ProgressStyle::with_template("{msg} {bar:10} {pos}/{len}").expect("style"),
                );
        bar.set_message("phase");
        bar.set_position(7);
        bar.finish();
        let out = lines(&sink);
        assert!(
            out.last()
                .is_some_and(|l| l.starts_with("phase") && l.ends_with("10/10")),
            "{out:?}"
        );
        assert!(out.iter().any(|l| l.ends_with("7/10")), "{out:?}");
    }
}
