//! `lever tokenizer train` and `lever data shard` as a user runs them, on Tiny Shakespeare from
//! ../shared/data: the files they write, what reads them back (lever's tokenizer, the shard
//! reader), nanoGPT's character split reproduced id for id, bounded memory, and one-line
//! refusals that leave nothing behind.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{Out, lever_in, shared_data};
use lever_data::shards::{Dtype, ShardSet, Source, Split};

fn tinyshakespeare() -> Vec<u8> {
    let p = shared_data("tinyshakespeare/input.txt");
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The first `n` bytes of Tiny Shakespeare as `dir/name`.
fn slice(dir: &Path, name: &str, n: usize) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, &tinyshakespeare()[..n]).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Exit 1 with one `error:` line holding every needle, and `out` not created.
#[track_caller]
fn refused(out: &Out, needles: &[&str], not_there: &Path) -> String {
    let line = out.failed_alone();
    for n in needles {
        assert!(line.contains(n), "error line lacks {n:?}: {line}");
    }
    assert!(!not_there.exists(), "{} was created", not_there.display());
    // Nothing half-written beside it either (write_atomic's temporaries).
    let parent = not_there.parent().unwrap();
    let name = not_there
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    for e in std::fs::read_dir(parent).unwrap() {
        let f = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!f.starts_with(&format!(".{name}.")), "left behind: {f}");
    }
    line
}

#[test]
fn bpe_tokenizer_and_shards_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let corpus = slice(d, "ts.txt", 200_000);
    let out = lever_in(
        d,
        &[
            "tokenizer",
            "train",
            s(&corpus),
            "--vocab-size",
            "300",
            "--out",
            "tok",
        ],
    )
    .ok();
    assert!(
        out.stdout.contains("wrote tok/tokenizer.json: vocabulary 300 (256 bytes + 43 merges + 1 special), <|endoftext|> id 0"),
        "{}",
        out.stdout
    );
    let tok_json = d.join("tok/tokenizer.json");
    assert!(d.join("tok/tokenizer_config.json").is_file());
    // Deterministic: a second run writes the same bytes.
    lever_in(
        d,
        &[
            "tokenizer",
            "train",
            s(&corpus),
            "--vocab-size",
            "300",
            "--out",
            "tok2",
        ],
    )
    .ok();
    assert_eq!(
        std::fs::read(&tok_json).unwrap(),
        std::fs::read(d.join("tok2/tokenizer.json")).unwrap()
    );

    let out = lever_in(
        d,
        &[
            "data",
            "shard",
            s(&corpus),
            "--tokenizer",
            s(&tok_json),
            "--out",
            "shards",
            "--val-fraction",
            "0.1",
            "--shard-tokens",
            "20000",
        ],
    )
    .ok();
    assert!(out.stdout.starts_with("wrote shards: "), "{}", out.stdout);
    let set = ShardSet::open(&d.join("shards")).unwrap();
    assert_eq!(set.source, Source::Lever);
    let m = set.manifest.clone().unwrap();
    assert_eq!(
        m.tokenizer.sha256,
        lever_data::shards::sha256_file(&tok_json).unwrap()
    );
    assert_eq!(
        (m.tokenizer.vocab_size, m.tokenizer.eot_id, m.dtype),
        (300, 0, Dtype::U16)
    );
    assert_eq!(m.documents, 1);

    // The shards hold exactly: end-of-text, then the text cut at 90% of its bytes (as
    // nanoGPT cuts), each part encoded by lever's own tokenizer.
    let tok = lever_model::Tokenizer::from_file(&tok_json, None, None).unwrap();
    let text = String::from_utf8(tinyshakespeare()[..200_000].to_vec()).unwrap();
    let cut = (200_000f64 * 0.9) as usize;
    let mut want_train = vec![0u32];
    want_train.extend(tok.encode(&text[..cut], false).unwrap());
    let want_val = tok.encode(&text[cut..], false).unwrap();
    let train = set.read_all(Split::Train).unwrap();
    let val = set.read_all(Split::Val).unwrap();
    assert_eq!(train.len(), want_train.len());
    assert!(
        train == want_train,
        "train tokens differ from encoding the text whole"
    );
    assert!(val == want_val, "val tokens differ");
    assert_eq!(
        (m.tokens.train, m.tokens.val),
        (train.len() as u64, val.len() as u64)
    );
    // Full shards of 20,000 tokens, then the rest; names by split and number.
    let train_shards: Vec<_> = m
        .shards
        .iter()
        .filter(|e| e.split == Split::Train)
        .collect();
    assert_eq!(train_shards.len(), train.len().div_ceil(20_000));
    assert!(
        train_shards[..train_shards.len() - 1]
            .iter()
            .all(|e| e.tokens == 20_000)
    );
    assert_eq!(train_shards[1].file, "train_000001.bin");
    assert_eq!(m.shards.last().unwrap().file, "val_000000.bin");
    // A manifest accepts the same tokenizer bytes and refuses another tokenizer, by name.
    m.check_tokenizer(&d.join("shards"), &d.join("tok2/tokenizer.json"))
        .unwrap();
    let mut other = std::fs::read_to_string(&tok_json).unwrap();
    other.push('\n');
    std::fs::write(d.join("other.json"), other).unwrap();
    let e = m
        .check_tokenizer(&d.join("shards"), &d.join("other.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("were made with tokenizer /"), "{e}");
    assert!(e.contains("/tok/tokenizer.json (sha256 "), "{e}");
    assert!(e.contains("/other.json (sha256 "), "{e}");
}

#[test]
fn char_tokenizer_shards_are_nanogpts_shakespeare_char() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = shared_data("tinyshakespeare/input.txt");
    let out = lever_in(
        d,
        &[
            "tokenizer",
            "train",
            s(&input),
            "--kind",
            "char",
            "--out",
            "char",
        ],
    )
    .ok();
    assert!(
        out.stdout
            .contains("vocabulary 66 (65 characters + 1 special), <|endoftext|> id 65"),
        "{}",
        out.stdout
    );
    lever_in(
        d,
        &[
            "data",
            "shard",
            s(&input),
            "--tokenizer",
            "char",
            "--out",
            "shards",
            "--val-fraction",
            "0.1",
        ],
    )
    .ok();
    let set = ShardSet::open(&d.join("shards")).unwrap();
    let train = set.read_all(Split::Train).unwrap();
    let val = set.read_all(Split::Val).unwrap();
    // nanoGPT's prepare.py: "train has 1,003,854 tokens", "val has 111,540 tokens" — ours have
    // the end-of-text token (65) in front.
    assert_eq!((train.len(), val.len()), (1_003_855, 111_540));
    let text = String::from_utf8(tinyshakespeare()).unwrap();
    let chars: std::collections::BTreeSet<char> = text.chars().collect();
    let stoi: std::collections::HashMap<char, u32> = chars
        .iter()
        .enumerate()
        .map(|(i, c)| (*c, i as u32))
        .collect();
    let n = text.len();
    let nano = |t: &str| t.chars().map(|c| stoi[&c]).collect::<Vec<u32>>();
    assert_eq!(train[0], 65);
    assert!(
        train[1..] == nano(&text[..(n as f64 * 0.9) as usize]),
        "train differs from nanoGPT's"
    );
    assert!(
        val == nano(&text[(n as f64 * 0.9) as usize..]),
        "val differs from nanoGPT's"
    );
}

#[test]
fn folders_and_jsonl_make_one_document_each() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let corpus = slice(d, "ts.txt", 50_000);
    lever_in(
        d,
        &[
            "tokenizer",
            "train",
            s(&corpus),
            "--vocab-size",
            "280",
            "--out",
            "tok",
        ],
    )
    .ok();
    let data = d.join("data");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::write(data.join("a.txt"), "To be, or not to be.\n").unwrap();
    std::fs::write(data.join("sub/b.md"), "# Act I\n\nEnter HAMLET.\n").unwrap();
    std::fs::write(
        data.join("c.jsonl"),
        "{\"text\": \"first\"}\n\n{\"text\": \"says <|endoftext|> in text\", \"id\": 2}\n",
    )
    .unwrap();
    std::fs::write(data.join("notes.bin"), [0u8, 1, 2]).unwrap();
    std::fs::write(data.join("empty.txt"), "").unwrap();
    let out = lever_in(
        d,
        &[
            "data",
            "shard",
            "data",
            "--tokenizer",
            "tok",
            "--out",
            "shards",
            "--val-fraction",
            "0",
        ],
    )
    .ok();
    assert!(
        out.stderr.contains("skipped data/empty.txt: empty"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("skipped data/notes.bin: not .txt"),
        "{}",
        out.stderr
    );
    let set = ShardSet::open(&d.join("shards")).unwrap();
    let m = set.manifest.clone().unwrap();
    assert_eq!((m.documents, m.tokens.val), (4, 0));
    let tokens = set.read_all(Split::Train).unwrap();
    // Each document starts with end-of-text; the one written inside a text stays text.
    assert_eq!(tokens.iter().filter(|&&t| t == 0).count(), 4);
    let tok = lever_model::Tokenizer::from_file(&d.join("tok/tokenizer.json"), None, None).unwrap();
    let docs = [
        "To be, or not to be.\n",
        "first",
        "says <|endoftext|> in text",
        "# Act I\n\nEnter HAMLET.\n",
    ];
    let text: Vec<String> = tokens
        .split(|&t| t == 0)
        .skip(1)
        .map(|ids| tok.decode(ids))
        .collect();
    assert_eq!(text, docs);
}

#[test]
fn tokenizer_train_refusals_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let corpus = slice(d, "ts.txt", 20_000);
    let out = d.join("tok");
    let r = lever_in(
        d,
        &[
            "tokenizer",
            "train",
            "ts.txt",
            "--vocab-size",
            "200",
            "--out",
            "tok",
        ],
    );
    refused(
        &r,
        &[
            "--vocab-size: 200 is smaller than the byte-level alphabet",
            "= 257",
        ],
        &out,
    );
    let r = lever_in(
        d,
        &[
            "tokenizer",
            "train",
            "ts.txt",
            "--kind",
            "char",
            "--vocab-size",
            "20",
            "--out",
            "tok",
        ],
    );
    refused(
        &r,
        &["20 is smaller than this corpus's character vocabulary"],
        &out,
    );
    std::fs::write(d.join("empty.txt"), "").unwrap();
    let r = lever_in(
        d,
        &[
            "tokenizer",
            "train",
            "empty.txt",
            "--vocab-size",
            "300",
            "--out",
            "tok",
        ],
    );
    refused(&r, &["empty.txt: empty file"], &out);
    let mut bad = tinyshakespeare()[..5_000].to_vec();
    bad.truncate(bad.iter().rposition(|&b| b == b'\n').unwrap() + 1);
    let line = 1 + bad.iter().filter(|&&b| b == b'\n').count();
    bad.extend_from_slice(b"caf\xE9\n");
    std::fs::write(d.join("latin1.txt"), &bad).unwrap();
    let r = lever_in(
        d,
        &[
            "tokenizer",
            "train",
            "latin1.txt",
            "--vocab-size",
            "300",
            "--out",
            "tok",
        ],
    );
    refused(
        &r,
        &[&format!(
            "latin1.txt:{line}: byte 0xE9 at column 4 is not UTF-8"
        )],
        &out,
    );
    // An existing folder with files: refused, then replaced with --force.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let r = lever_in(
        d,
        &[
            "tokenizer",
            "train",
            s(&corpus),
            "--vocab-size",
            "260",
            "--out",
            "tok",
        ],
    );
    let line = r.failed_alone();
    assert!(
        line.contains("tok: already exists") && line.contains("--force"),
        "{line}"
    );
    assert!(out.join("keep.txt").is_file());
    lever_in(
        d,
        &[
            "tokenizer",
            "train",
            s(&corpus),
            "--vocab-size",
            "260",
            "--out",
            "tok",
            "--force",
        ],
    )
    .ok();
    assert!(!out.join("keep.txt").exists() && out.join("tokenizer.json").is_file());
}

#[test]
fn data_shard_refusals_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let corpus = slice(d, "ts.txt", 20_000);
    lever_in(
        d,
        &[
            "tokenizer",
            "train",
            s(&corpus),
            "--vocab-size",
            "260",
            "--out",
            "tok",
        ],
    )
    .ok();
    lever_in(
        d,
        &[
            "tokenizer",
            "train",
            s(&corpus),
            "--vocab-size",
            "260",
            "--out",
            "tok-end",
            "--eot",
            "<|end|>",
        ],
    )
    .ok();
    let out = d.join("shards");
    let shard = |args: &[&str]| {
        let mut all = vec!["data", "shard"];
        all.extend_from_slice(args);
        lever_in(d, &all)
    };
    std::fs::write(
        d.join("docs.jsonl"),
        "{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"body\": \"c\"}\n",
    )
    .unwrap();
    let r = shard(&["docs.jsonl", "--tokenizer", "tok", "--out", "shards"]);
    refused(&r, &["docs.jsonl:3: field `text`: missing"], &out);
    std::fs::write(d.join("num.jsonl"), "{\"text\": 5}\n").unwrap();
    let r = shard(&["num.jsonl", "--tokenizer", "tok", "--out", "shards"]);
    refused(&r, &["num.jsonl:1: field `text`: not a string"], &out);
    let r = shard(&["ts.txt", "--tokenizer", "tok-end", "--out", "shards"]);
    refused(
        &r,
        &["tok-end/tokenizer.json: has no end-of-text token `<|endoftext|>`"],
        &out,
    );
    std::fs::write(d.join("empty.txt"), "").unwrap();
    let r = shard(&["empty.txt", "--tokenizer", "tok", "--out", "shards"]);
    refused(&r, &["empty.txt: empty file"], &out);
    std::fs::create_dir(d.join("nothing")).unwrap();
    let r = shard(&["nothing", "--tokenizer", "tok", "--out", "shards"]);
    refused(&r, &["nothing: no .txt, .md or .jsonl files"], &out);
    std::fs::write(d.join("blank.jsonl"), "\n\n").unwrap();
    let r = shard(&["blank.jsonl", "--tokenizer", "tok", "--out", "shards"]);
    refused(&r, &["no documents in these inputs"], &out);
    let r = shard(&["ts.txt", "--tokenizer", "missing.json", "--out", "shards"]);
    refused(&r, &["missing.json: no such tokenizer.json"], &out);
    // A character vocabulary meets a character it lacks: the file and line are named.
    lever_in(
        d,
        &[
            "tokenizer",
            "train",
            s(&corpus),
            "--kind",
            "char",
            "--out",
            "char",
        ],
    )
    .ok();
    std::fs::write(d.join("accents.txt"), "plain\nline two\ncafé\n").unwrap();
    let r = shard(&["accents.txt", "--tokenizer", "char", "--out", "shards"]);
    refused(
        &r,
        &["accents.txt:3: character 'é' (U+00E9) is not in the vocabulary"],
        &out,
    );
    // Bad flag values are usage errors (exit 2).
    let r = shard(&[
        "ts.txt",
        "--tokenizer",
        "tok",
        "--out",
        "shards",
        "--val-fraction",
        "1",
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("not a fraction in [0, 1)"),
        "{}",
        r.stderr
    );
    // An existing folder with files is refused, and kept.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let line = shard(&["ts.txt", "--tokenizer", "tok", "--out", "shards"]).failed_alone();
    assert!(line.contains("shards: already exists"), "{line}");
    assert!(out.join("keep.txt").is_file());
}

/// Peak resident memory of `lever ARGS` in MB, from `wait4`'s resource usage of the child.
#[allow(unsafe_code)]
fn peak_rss_mb(dir: &Path, args: &[&str]) -> f64 {
    let child = Command::new(env!("CARGO_BIN_EXE_lever"))
        .args(args)
        .current_dir(dir)
        .env("RAYON_NUM_THREADS", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data (integers and timevals), for which all zeros is valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not reaped yet (nothing else waits on it); `status` and
    // `usage` are valid for writes for the duration of the call.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{args:?} failed"
    );
    std::mem::forget(child);
    // ru_maxrss is in KiB on Linux.
    usage.ru_maxrss as f64 / 1024.0
}

#[test]
fn shard_memory_does_not_grow_with_the_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let text = tinyshakespeare();
    let corpus = slice(d, "ts.txt", 100_000);
    lever_in(
        d,
        &[
            "tokenizer",
            "train",
            s(&corpus),
            "--vocab-size",
            "300",
            "--out",
            "tok",
        ],
    )
    .ok();
    std::fs::write(d.join("x1.txt"), &text).unwrap();
    std::fs::write(d.join("x8.txt"), text.repeat(8)).unwrap();
    let run = |input: &str, out: &str| {
        peak_rss_mb(
            d,
            &["data", "shard", input, "--tokenizer", "tok", "--out", out],
        )
    };
    let x1 = run("x1.txt", "s1");
    let x8 = run("x8.txt", "s8");
    let t1 = ShardSet::open(&d.join("s1")).unwrap().tokens(Split::Train);
    let t8 = ShardSet::open(&d.join("s8")).unwrap().tokens(Split::Train);
    eprintln!("peak RSS: 1x ({t1} tokens) {x1:.1} MB, 8x ({t8} tokens) {x8:.1} MB");
    assert!(t8 > 7 * t1);
    // Holding the 8x corpus (8.9 MB) and its ids (~2.6M u32, 10 MB) would add ~20 MB.
    assert!(x8 < x1 + 8.0, "peak RSS grew from {x1:.1} MB to {x8:.1} MB");
}
