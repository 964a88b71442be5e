//! The index under failure: SIGKILL mid-ingest, readers during ingest, an embedder failing
//! mid-file, a corrupt or locked database, and a 100 MB file streamed in bounded memory.
//!
//! Tests that need a separate process re-run this test binary on one `#[ignore]`d helper test
//! (`current_exe() --ignored --exact NAME`), passing their arguments in environment variables;
//! without those variables the helpers do nothing.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use lever_rag::testing::HashEmbed;
use lever_rag::{AddOptions, ChunkMode, ChunkSettings, Error, Index, OpenOptions};
use rusqlite::{Connection, OpenFlags};

const CHILD_INDEX: &str = "LEVER_TEST_CHILD_INDEX";
const CHILD_DOCS: &str = "LEVER_TEST_CHILD_DOCS";

/// Options that make ingest commit often and embed slowly enough to be caught mid-way.
fn slow_options() -> AddOptions {
    AddOptions {
        embed_batch: 4,
        commit_every: 8,
        ..AddOptions::default()
    }
}

/// Every third file is "big": 40 chunks, so it commits in batches as an incomplete source.
fn kill_corpus(dir: &Path) -> Vec<PathBuf> {
    corpus(dir, 60, |i| if i % 3 == 2 { 40 } else { 3 })
}

fn spawn_self(test: &str, envs: &[(&str, &Path)]) -> std::process::Child {
    // libtest names a test by its path below the crate root: `safety::child_ingest`.
    let module = module_path!().split_once("::").map_or("", |(_, m)| m);
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--ignored",
        "--exact",
        &format!("{module}::{test}"),
        "--nocapture",
        "--test-threads=1",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// Helper run in a child process: ingest `CHILD_DOCS` into `CHILD_INDEX`, slowly.
#[test]
#[ignore = "helper: run by sigkill_mid_ingest_keeps_the_committed_state_and_a_rerun_completes"]
fn child_ingest() {
    let (Some(index), Some(docs)) = (std::env::var_os(CHILD_INDEX), std::env::var_os(CHILD_DOCS))
    else {
        return;
    };
    let e = HashEmbed::new(32).with_delay(Duration::from_millis(3));
    let mut index = Index::open(Path::new(&index)).unwrap();
    index
        .add(&[PathBuf::from(docs)], &e, &slow_options(), &mut quiet)
        .unwrap();
}

/// Raw counts straight from SQLite, read-only: (complete sources, incomplete sources that
/// already have committed chunks).
fn raw_progress(db: &Path) -> (i64, i64) {
    let Ok(conn) = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return (0, 0);
    };
    let q = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap_or(0);
    (
        q("SELECT count(*) FROM sources WHERE complete = 1"),
        q("SELECT count(*) FROM sources s WHERE complete = 0
           AND EXISTS (SELECT 1 FROM chunks c WHERE c.source_id = s.id)"),
    )
}

#[test]
fn sigkill_mid_ingest_keeps_the_committed_state_and_a_rerun_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("docs");
    let files = kill_corpus(&docs);
    let s = small_chunks();
    let expected = expected_map(&files, &s);
    let e = HashEmbed::new(32);
    let dir = tmp.path().join("idx");
    drop(Index::create(&dir, &e, &s).unwrap());
    let db = dir.join("index.db");

    let mut child = spawn_self("child_ingest", &[(CHILD_INDEX, &dir), (CHILD_DOCS, &docs)]);
    // Kill once some files are committed and a big file is half-committed (the hard case).
    let start = Instant::now();
    let wanted = || {
        let (complete, partial) = raw_progress(&db);
        complete >= 3 && partial >= 1
    };
    let signal = |sig: &str, pid: u32| {
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    };
    loop {
        // Freeze the child, then check: the state it is killed in is the state we saw.
        if wanted() {
            signal("-STOP", child.id());
            if wanted() {
                break;
            }
            signal("-CONT", child.id());
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("child ended ({status}) before it could be killed: {err}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "child made no progress"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL on Unix; it also ends a stopped process
    let status = child.wait().unwrap();
    assert!(!status.success());

    // The last committed state is intact and nothing partial is visible.
    let mut index = Index::open(&dir).unwrap();
    let verify = index.verify(true).unwrap();
    assert_eq!(verify.integrity.as_deref(), Some("ok"));
    assert!(verify.is_ok(), "{verify:?}");
    assert!(
        verify.incomplete_sources >= 1,
        "killed during a batched file: {verify:?}"
    );
    let complete = index.sources().unwrap();
    assert!(
        !complete.is_empty() && complete.len() < files.len(),
        "{}",
        complete.len()
    );
    for src in &complete {
        let want = expected[src.path.to_str().unwrap()];
        assert_eq!(src.chunks as usize, want, "{}", src.path.display());
    }
    let visible: usize = complete.iter().map(|s| s.chunks as usize).sum();
    let stats = index.stats().unwrap();
    assert_eq!(
        (stats.chunks, stats.vectors),
        (visible as u64, visible as u64)
    );
    assert_eq!(index.chunks().unwrap().count(), visible);
    assert_eq!(index.load_vectors().unwrap().len(), visible);
    let raw_chunks: i64 = Connection::open(&db)
        .unwrap()
        .query_row("SELECT count(*) FROM chunks", [], |r| r.get(0))
        .unwrap();
    assert!(
        raw_chunks as usize > visible,
        "the partial file's batches are on disk, unseen"
    );

    // A re-run cleans up and completes; the result equals a clean run.
    let report = index
        .add(&[&docs], &e, &slow_options(), &mut quiet)
        .unwrap();
    assert_eq!(report.recovered, verify.incomplete_sources);
    assert_eq!(report.unchanged, complete.len());
    assert_eq!(report.added, files.len() - complete.len());
    let clean_dir = tmp.path().join("clean");
    let mut clean = Index::create(&clean_dir, &e, &s).unwrap();
    clean
        .add(&[&docs], &e, &AddOptions::default(), &mut quiet)
        .unwrap();
    let (a, b) = (index.stats().unwrap(), clean.stats().unwrap());
    assert_eq!(
        (a.sources, a.chunks, a.vectors),
        (b.sources, b.chunks, b.vectors)
    );
    assert_eq!(a.sources as usize, files.len());
    assert_eq!(a.chunks as usize, expected.values().sum::<usize>());
    assert_eq!(content(&index), content(&clean));
    let after = index.verify(true).unwrap();
    assert!(after.is_ok() && after.incomplete_sources == 0, "{after:?}");
}

/// Checks, in one read transaction, that every complete source has exactly its expected chunks
/// and each chunk its vector. Returns (generation, complete sources).
fn check_snapshot(conn: &Connection, expected: &BTreeMap<String, usize>) -> (i64, usize) {
    conn.execute_batch("BEGIN").unwrap();
    let generation: i64 = conn
        .query_row("SELECT value FROM meta WHERE key = 'generation'", [], |r| {
            r.get(0)
        })
        .unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT s.path, s.chunks,
                    (SELECT count(*) FROM chunks c WHERE c.source_id = s.id),
                    (SELECT count(*) FROM chunks c JOIN vectors v ON v.chunk_id = c.id
                     WHERE c.source_id = s.id)
             FROM sources s WHERE s.complete = 1",
        )
        .unwrap();
    let rows: Vec<(String, i64, i64, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (path, recorded, chunks, vectors) in &rows {
        let want = expected[path] as i64;
        assert_eq!(
            (*recorded, *chunks, *vectors),
            (want, want, want),
            "{path} at generation {generation}"
        );
    }
    drop(stmt);
    conn.execute_batch("COMMIT").unwrap();
    (generation, rows.len())
}

#[test]
fn a_reader_sees_consistent_states_while_a_writer_ingests() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("docs");
    let files = corpus(&docs, 30, |i| if i % 4 == 0 { 30 } else { 2 });
    let s = small_chunks();
    let expected = expected_map(&files, &s);
    let dir = tmp.path().join("idx");
    drop(Index::create(&dir, &HashEmbed::new(32), &s).unwrap());

    let writer = {
        let (dir, docs) = (dir.clone(), docs.clone());
        std::thread::spawn(move || {
            let e = HashEmbed::new(32).with_delay(Duration::from_millis(2));
            let mut index = Index::open(&dir).unwrap();
            index.add(&[docs], &e, &slow_options(), &mut quiet).unwrap()
        })
    };
    let conn = Connection::open_with_flags(dir.join("index.db"), OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let reader = Index::open(&dir).unwrap();
    let mut generations = BTreeSet::new();
    let mut last = 0;
    loop {
        let done = writer.is_finished();
        let (generation, _) = check_snapshot(&conn, &expected);
        assert!(
            generation >= last,
            "generation went back: {last} -> {generation}"
        );
        last = generation;
        generations.insert(generation);
        let verify = reader.verify(false).unwrap();
        assert!(verify.is_ok(), "{verify:?}");
        let stats = reader.stats().unwrap();
        assert_eq!(stats.chunks, stats.vectors);
        if done {
            break;
        }
    }
    let report = writer.join().unwrap();
    assert_eq!(report.added, files.len());
    let (_, complete) = check_snapshot(&conn, &expected);
    assert_eq!(complete, files.len());
    assert!(
        generations.len() >= 3,
        "the reader saw the ingest in progress: {generations:?}"
    );
}

#[test]
fn an_embedder_failing_mid_file_leaves_the_previous_state_and_the_next_run_redoes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("docs");
    let small = corpus(&docs.join("small"), 3, |_| 2);
    let big = write(
        &docs.join("big.txt"),
        (0..50)
            .map(|p| paragraph(7, p))
            .collect::<Vec<_>>()
            .join("\n\n"),
    );
    let s = small_chunks();
    let good = HashEmbed::new(32);
    let dir = tmp.path().join("idx");
    let mut index = Index::create(&dir, &good, &s).unwrap();
    index
        .add(&[docs.join("small")], &good, &slow_options(), &mut quiet)
        .unwrap();
    let before = content(&index);

    // 50 chunks in batches of 4, committed every 8: the 6th embed call fails after 2 commits.
    let failing = HashEmbed::new(32).failing_after(5);
    let err = index
        .add(&[&big], &failing, &slow_options(), &mut quiet)
        .unwrap_err();
    assert!(matches!(err, Error::Embed(_)), "{err}");
    let verify = index.verify(true).unwrap();
    assert!(verify.is_ok(), "{verify:?}");
    assert_eq!(verify.incomplete_sources, 1);
    assert_eq!(
        content(&index),
        before,
        "the half-written file is invisible"
    );
    let hits = index.search_text(&good, &paragraph(7, 0), 5).unwrap();
    for h in hits {
        assert_ne!(index.chunk(h.chunk_id).unwrap().unwrap().path, big);
    }

    // The next run is given other paths, and still redoes the interrupted file.
    let report = index
        .add(&[docs.join("small")], &good, &slow_options(), &mut quiet)
        .unwrap();
    assert_eq!(
        (report.recovered, report.added, report.unchanged),
        (1, 1, small.len())
    );
    let stats = index.stats().unwrap();
    assert_eq!(stats.sources, 4);
    assert_eq!(stats.incomplete_sources, 0);
    let big_chunks = index
        .sources()
        .unwrap()
        .iter()
        .find(|x| x.path == big)
        .unwrap()
        .chunks;
    assert_eq!(big_chunks, 50);
}

#[test]
fn a_corrupt_database_is_a_one_line_error_and_is_left_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("docs");
    corpus(&docs, 2, |_| 2);
    let e = HashEmbed::new(16);
    let dir = tmp.path().join("idx");
    let mut index = Index::create(&dir, &e, &small_chunks()).unwrap();
    index
        .add(&[&docs], &e, &AddOptions::default(), &mut quiet)
        .unwrap();
    drop(index); // closing checkpoints the WAL into index.db and removes it

    let db = dir.join("index.db");
    let garbage: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&db, &garbage).unwrap();
    for result in [
        Index::open(&dir).err(),
        Index::create(&dir, &e, &small_chunks()).err(),
    ] {
        let err = result.expect("a corrupt index must not open");
        let msg = err.to_string();
        assert!(msg.contains(db.to_str().unwrap()), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }
    let err = Index::open(&dir).err().unwrap();
    assert!(matches!(err, Error::NotAnIndex { .. }), "{err}");
    assert!(err.to_string().contains("not a database"), "{err}");
    assert_eq!(
        std::fs::read(&db).unwrap(),
        garbage,
        "nothing written over the file"
    );

    // A valid SQLite file that is not ours is refused the same way.
    std::fs::remove_file(&db).unwrap();
    Connection::open(&db)
        .unwrap()
        .execute_batch("CREATE TABLE t (x)")
        .unwrap();
    let err = Index::open(&dir).err().unwrap();
    assert!(
        matches!(err, Error::NotAnIndex { .. }) && err.to_string().contains("meta"),
        "{err}"
    );
}

#[test]
fn a_locked_database_is_a_clear_error_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("docs");
    let first = corpus(&docs.join("first"), 2, |_| 2);
    corpus(&docs.join("second"), 2, |_| 2);
    let e = HashEmbed::new(16);
    let dir = tmp.path().join("idx");
    let opts = OpenOptions {
        busy_timeout: Duration::from_millis(200),
    };
    let mut index = Index::create_with(&dir, &e, &small_chunks(), &opts).unwrap();
    index
        .add(
            &[docs.join("first")],
            &e,
            &AddOptions::default(),
            &mut quiet,
        )
        .unwrap();
    let before = content(&index);

    // Another connection holds SQLite's write lock.
    let other = Connection::open(dir.join("index.db")).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let start = Instant::now();
    let err = index
        .add(
            &[docs.join("second")],
            &e,
            &AddOptions::default(),
            &mut quiet,
        )
        .unwrap_err();
    assert!(start.elapsed() >= Duration::from_millis(200));
    let msg = err.to_string();
    assert!(matches!(err, Error::Locked { .. }), "{msg}");
    assert!(msg.contains("index.db") && msg.contains("locked"), "{msg}");
    assert!(matches!(index.remove(&first[0]), Err(Error::Locked { .. })));
    // Readers are not blocked by a writer (WAL), and a new connection opens fine.
    assert_eq!(content(&index), before);
    let second = Index::open_with(&dir, &opts).unwrap();
    assert_eq!(content(&second), before);
    assert!(
        !second
            .search_text(&e, &paragraph(0, 0), 1)
            .unwrap()
            .is_empty()
    );
    other.execute_batch("ROLLBACK").unwrap();

    // Another lever writer holds the advisory writer lock.
    let lock = std::fs::File::open(dir.join("index.lock")).unwrap();
    lock.lock().unwrap();
    let err = index
        .add(
            &[docs.join("second")],
            &e,
            &AddOptions::default(),
            &mut quiet,
        )
        .unwrap_err();
    assert!(err.to_string().contains("index.lock"), "{err}");
    lock.unlock().unwrap();

    assert_eq!(content(&index), before, "nothing lost");
    let report = index
        .add(&[&docs], &e, &AddOptions::default(), &mut quiet)
        .unwrap();
    assert_eq!((report.added, report.unchanged), (2, 2));
}

const BIG_INDEX: &str = "LEVER_TEST_BIG_INDEX";
const BIG_FILE: &str = "LEVER_TEST_BIG_FILE";
const BIG_OUT: &str = "LEVER_TEST_BIG_OUT";

/// Peak resident memory of this process (VmHWM), in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Helper run in a child process (so that its peak memory is the ingest's): index `BIG_FILE`
/// into `BIG_INDEX` and write the peak RSS before and after to `BIG_OUT`.
#[test]
#[ignore = "helper: run by a_100_mb_file_streams_in_bounded_memory"]
fn child_big_ingest() {
    let (Some(dir), Some(file), Some(out)) = (
        std::env::var_os(BIG_INDEX),
        std::env::var_os(BIG_FILE),
        std::env::var_os(BIG_OUT),
    ) else {
        return;
    };
    let e = HashEmbed::new(32);
    let mut index = Index::open(Path::new(&dir)).unwrap();
    let before = peak_rss_kib();
    let report = index
        .add(
            &[PathBuf::from(file)],
            &e,
            &AddOptions::default(),
            &mut quiet,
        )
        .unwrap();
    let after = peak_rss_kib();
    std::fs::write(out, format!("{before} {after} {}", report.chunks)).unwrap();
}

#[test]
fn a_100_mb_file_streams_in_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("big.txt");
    // 1,000,000 lines of 10 nine-byte words: 100 MB, 10 million words.
    let lines = 1_000_000usize;
    {
        use std::io::Write;
        let mut w = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        for i in 0..lines {
            let words: Vec<String> = (0..10)
                .map(|j| format!("w{:08}", (i * 10 + j) % 999_983))
                .collect();
            writeln!(w, "{}", words.join(" ")).unwrap();
        }
    }
    let size = std::fs::metadata(&file).unwrap().len();
    assert_eq!(size, 100_000_000);
    let settings = ChunkSettings {
        mode: ChunkMode::Tokens,
        size: 200,
        overlap: 20,
    };
    let dir = tmp.path().join("idx");
    drop(Index::create(&dir, &HashEmbed::new(32), &settings).unwrap());
    let out = tmp.path().join("peak");
    let child = spawn_self(
        "child_big_ingest",
        &[(BIG_INDEX, &dir), (BIG_FILE, &file), (BIG_OUT, &out)],
    );
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let measured = std::fs::read_to_string(&out).unwrap();
    let v: Vec<u64> = measured.split(' ').map(|x| x.parse().unwrap()).collect();
    let (before, after, chunks) = (v[0], v[1], v[2]);

    // Windows of 200 tokens every 180: 1 + ceil((N - 200) / 180) for N tokens.
    let n = lines * 10;
    let want = 1 + (n - 200).div_ceil(180);
    assert_eq!(chunks as usize, want);
    let grew_mib = (after.saturating_sub(before)) / 1024;
    eprintln!("100 MB file: {chunks} chunks, peak RSS {before} KiB -> {after} KiB");
    assert!(
        grew_mib < 48,
        "peak memory grew by {grew_mib} MiB while indexing a {} MB file",
        size / 1_000_000
    );
    let index = Index::open(&dir).unwrap();
    let stats = index.stats().unwrap();
    assert_eq!(
        (stats.sources, stats.chunks, stats.vectors),
        (1, want as u64, want as u64)
    );
    let first = index
        .chunk(index.chunks().unwrap().next().unwrap().unwrap().0)
        .unwrap()
        .unwrap();
    assert_eq!((first.line_start, first.line_end), (1, 20));
    let last_id = index.load_vectors().unwrap().ids.last().copied().unwrap();
    let last = index.chunk(last_id as i64).unwrap().unwrap();
    assert_eq!(last.line_end, lines);
}
