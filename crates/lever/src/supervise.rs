//! `--supervise`: the training runs as a child process (this binary, the same command line
//! without the supervision flags) and when it dies — a non-zero exit, a signal — it is started
//! again from its newest complete checkpoint (`--resume`), after a pause, up to
//! `--max-restarts` times. Each restart is a line of RUN/restarts.jsonl: when, the cause, the
//! step reached, the step it resumes from, and the steps and seconds lost.
//!
//! What is not restarted, and why:
//! - exit code 2 (bad usage): the same arguments would be refused again;
//! - three starts in a row that exit with an error (code 1) before completing a step: lever
//!   reports errors it cannot get past (bad data, settings a resumed run refuses, a folder it
//!   may not write), so they would repeat; a kill by a signal is never counted here;
//! - everything else, up to --max-restarts; the pause (--restart-delay) doubles for each
//!   restart in a row that got no further than the one before, at most 10 minutes.
//!
//! `--launcher "mpirun -np 4 ..."` puts a launcher in front of the child's command line: the
//! supervisor then watches the launcher, which ends (non-zero) when any rank dies, and the
//! whole world is started again, resuming from rank 0's checkpoint.
//!
//! The child gets SIGTERM when the supervisor dies (Linux: PR_SET_PDEATHSIG), so stopping
//! the supervisor (Ctrl-C, a scheduler's SIGTERM, even SIGKILL) stops the training too.
//!
//! OPT-175B's logbook (about 70 automatic restarts in two months) and PaLM's report are why
//! this exists; the rules are lever's own.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::cli::SuperviseArgs;

/// The child writes its one-line error into the file this variable names (main.rs), so that
/// the supervisor can give the cause of a failure.
pub const ERROR_FILE_ENV: &str = "LEVER_ERROR_FILE";

/// Starts in a row that fail with an error before their first step, after which supervision
/// stops.
const SETUP_FAILURES: usize = 3;

/// The longest pause before a restart.
const MAX_DELAY_S: f64 = 600.0;

/// The pause before a restart: `base` doubled for each of `stalled` restarts in a row that got
/// no further than the one before, at most [`MAX_DELAY_S`].
pub fn backoff(base: f64, stalled: u32) -> f64 {
    (base * 2f64.powi(stalled.min(30) as i32)).min(MAX_DELAY_S.max(base))
}

/// Supervise the training whose run folder is `run`: the command line of this process,
/// without the supervision flags, as a child, restarted as the module doc says.
pub fn run(run: &Path, s: &SuperviseArgs) -> Result<()> {
    let exe = std::env::current_exe().context("--supervise: the path of this program")?;
    let given = strip(
        &std::env::args_os().skip(1).collect::<Vec<_>>(),
        &["--supervise"],
        &["--max-restarts", "--restart-delay", "--launcher"],
    );
    let forced = given.iter().any(|a| a == "--force");
    let plain = strip(&given, &["--force", "--resume"], &[]);
    let with = |flag: &str| -> Vec<OsString> {
        let mut v = plain.clone();
        v.push(flag.into());
        v
    };
    // `--launcher "mpirun -np 4"`: the program and its options, the training after them.
    let launcher = match s.launcher.as_deref().map(str::split_whitespace) {
        Some(mut words) => match words.next() {
            Some(program) => Some((program.to_string(), words.collect::<Vec<_>>())),
            None => bail!("--launcher: empty; give a command such as \"mpirun -np 4\""),
        },
        None => None,
    };
    let checkpoints = run.join("checkpoints");
    let mut log = RestartLog::open(run, forced);
    let (mut restarts, mut stalled, mut setup_failures) = (0usize, 0u32, 0usize);
    let mut furthest = step_reached(run).unwrap_or(0);
    for start in 1.. {
        // The first start as asked (resuming when the run has a checkpoint, unless --force);
        // later ones resume, or start over when the run never reached a checkpoint.
        let args = if start == 1 {
            if !forced && lever_train::checkpoint::any(&checkpoints) {
                with("--resume")
            } else {
                given.clone()
            }
        } else if lever_train::checkpoint::any(&checkpoints) {
            with("--resume")
        } else if run.join("metrics.jsonl").exists() {
            with("--force")
        } else {
            given.clone()
        };
        let from = newest_sealed(&checkpoints).map_or(0, |(s, _)| s);
        let err_file = tempfile::NamedTempFile::new().context("--supervise: a temporary file")?;
        let began = lever_now();
        let mut cmd = match &launcher {
            Some((program, opts)) => {
                let mut c = Command::new(program);
                c.args(opts).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(&args).env(ERROR_FILE_ENV, err_file.path());
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "--supervise: starting {}",
                launcher
                    .as_ref()
                    .map_or(exe.display().to_string(), |l| l.0.clone())
            )
        })?;
        let pid = child.id();
        let status = child
            .wait()
            .context("--supervise: waiting for the training")?;
        if status.success() {
            log.write()?;
            if restarts > 0 {
                eprintln!(
                    "supervise: finished after {restarts} restart{}",
                    plural(restarts)
                );
            }
            return Ok(());
        }
        let died = lever_now();
        let cause = describe(status, err_file.path());
        let reached = step_reached(run).unwrap_or(0);
        let touched = modified_since(&run.join("metrics.jsonl"), began);
        let progressed = touched && reached > from;
        if status.code() == Some(2) {
            log.write()?;
            bail!("--supervise: the training {cause}; bad usage is not restarted");
        }
        if status.code() == Some(1) && !progressed {
            setup_failures += 1;
        } else {
            setup_failures = 0;
        }
        if setup_failures >= SETUP_FAILURES {
            log.write()?;
            bail!(
                "--supervise: {setup_failures} starts in a row failed before their first step, not restarted again: the training {cause}"
            );
        }
        if restarts >= s.max_restarts {
            log.write()?;
            bail!(
                "--supervise: gave up after {restarts} restart{} (--max-restarts {}): the training {cause}",
                plural(restarts),
                s.max_restarts
            );
        }
        if reached > furthest {
            furthest = reached;
            stalled = 0;
        } else if restarts > 0 {
            stalled += 1;
        }
        let delay = backoff(s.restart_delay, stalled);
        // Where the next start resumes: the newest sealed checkpoint (it verifies them).
        let (resume_step, saved) = newest_sealed(&checkpoints).unwrap_or((0, 0.0));
        let lost = died - began.max(saved);
        restarts += 1;
        log.push(json!({
            "time": died,
            "restart": restarts,
            "pid": pid,
            "cause": cause,
            "exit_code": status.code(),
            "signal": signal_of(status),
            "step": reached,
            "resume_step": resume_step,
            "steps_lost": reached.saturating_sub(resume_step),
            "seconds_lost": lost + delay,
            "delay_s": delay,
        }));
        log.write()?;
        eprintln!(
            "supervise: the training (pid {pid}) {cause} at step {reached}; restart {restarts} of {} from step {resume_step} in {delay:.1} s",
            s.max_restarts
        );
        std::thread::sleep(Duration::from_secs_f64(delay));
    }
    unreachable!("the loop above returns")
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn lever_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `args` without the flags `bare` (no value) and `valued` (`--flag V` or `--flag=V`).
pub fn strip(args: &[OsString], bare: &[&str], valued: &[&str]) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if bare.iter().any(|b| s == *b) {
            continue;
        }
        if valued.iter().any(|v| s == *v) {
            it.next();
            continue;
        }
        if valued
            .iter()
            .any(|v| s.strip_prefix(v).is_some_and(|r| r.starts_with('=')))
        {
            continue;
        }
        out.push(a.clone());
    }
    out
}

/// The last step with a training loss in RUN/metrics.jsonl.
fn step_reached(run: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v.get("loss").is_some())
        .and_then(|v| v["step"].as_u64())
}

fn modified_since(path: &Path, t: f64) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
        .is_some_and(|m| m.as_secs_f64() >= t - 1e-3)
}

/// The step and time of the newest checkpoint with a completion marker, unchecked (the
/// child checks the files when it resumes).
fn newest_sealed(root: &Path) -> Option<(u64, f64)> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs.iter()
        .filter_map(|d| {
            let text = std::fs::read_to_string(d.join(lever_train::checkpoint::MARKER)).ok()?;
            let v: Value = serde_json::from_str(&text).ok()?;
            Some((v["step"].as_u64()?, v["saved_unix"].as_f64().unwrap_or(0.0)))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
}

/// "exited with code 1: error: ..." or "was killed by SIGKILL (signal 9)".
fn describe(status: ExitStatus, err_file: &Path) -> String {
    if let Some(sig) = signal_of(status) {
        return format!("was killed by {} (signal {sig})", signal_name(sig));
    }
    let code = status.code().unwrap_or(-1);
    let said = std::fs::read_to_string(err_file).unwrap_or_default();
    match said.lines().next().map(str::trim).filter(|l| !l.is_empty()) {
        Some(line) => format!("exited with code {code} ({line})"),
        None => format!("exited with code {code}"),
    }
}

#[cfg(unix)]
fn signal_of(status: ExitStatus) -> Option<i32> {
    std::os::unix::process::ExitStatusExt::signal(&status)
}

#[cfg(not(unix))]
fn signal_of(_: ExitStatus) -> Option<i32> {
    None
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => "a signal",
    }
}

/// The child gets SIGTERM when this process dies, however it dies.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub(crate) fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn die_with_parent(_: &mut Command) {}

/// RUN/restarts.jsonl, kept whole in memory and written whole (atomically) after each
/// restart: a child that starts the run over removes the run's files, this one among them.
struct RestartLog {
    path: PathBuf,
    lines: Vec<String>,
}

impl RestartLog {
    /// The restarts so far of the run being continued; none when it starts over.
    fn open(run: &Path, over: bool) -> RestartLog {
        let path = run.join("restarts.jsonl");
        let lines = if over {
            Vec::new()
        } else {
            std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .map(String::from)
                .collect()
        };
        RestartLog { path, lines }
    }

    fn push(&mut self, line: Value) {
        self.lines.push(line.to_string());
    }

    fn write(&self) -> Result<()> {
        if self.lines.is_empty() || !self.path.parent().is_some_and(Path::is_dir) {
            return Ok(());
        }
        let body = self.lines.join("\n") + "\n";
        lever_model::fsutil::write_atomic(&self.path, |tmp| {
            std::fs::write(tmp, &body).with_context(|| self.path.display().to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn supervision_flags_are_taken_out_in_both_spellings() {
        let args = os(&[
            "--threads",
            "2",
            "pretrain",
            "--supervise",
            "--max-restarts",
            "3",
            "--restart-delay=0.5",
            "--out",
            "run",
            "--force",
        ]);
        assert_eq!(
            strip(
                &args,
                &["--supervise"],
                &["--max-restarts", "--restart-delay"]
            ),
            os(&["--threads", "2", "pretrain", "--out", "run", "--force"])
        );
    }

    #[test]
    fn the_pause_doubles_while_no_restart_gets_further_and_is_capped() {
        assert_eq!(backoff(10.0, 0), 10.0);
        assert_eq!(backoff(10.0, 3), 80.0);
        assert_eq!(backoff(10.0, 20), 600.0);
        assert_eq!(backoff(0.0, 5), 0.0);
        // A pause asked for above the cap is kept.
        assert_eq!(backoff(900.0, 2), 900.0);
    }
}
