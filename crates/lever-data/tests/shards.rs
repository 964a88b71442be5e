//! Shards written by other programs read back token for token: files that
//! tests/fixtures/llmc_shards.py wrote the way llm.c's `write_datafile` writes them (uint16 and
//! uint32), and nanoGPT's headerless `train.bin`/`val.bin` as its `prepare.py` writes them.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use lever_data::shards::{Dtype, Shard, ShardSet, Source, Split};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn expected(name: &str) -> Vec<u32> {
    let text = std::fs::read_to_string(fixtures().join("llmc_shards.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v[name]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn llmc_write_datafile_shards_read_back_token_for_token() {
    for (name, dtype, n) in [
        ("llmc_gpt2.bin", Dtype::U16, 1004),
        ("llmc_llama3.bin", Dtype::U32, 503),
    ] {
        let want = expected(name);
        assert_eq!(want.len(), n);
        let shard = Shard::open(&fixtures().join(name)).unwrap();
        assert_eq!((shard.dtype, shard.tokens), (dtype, n as u64), "{name}");
        assert_eq!(shard.read_all().unwrap(), want, "{name}");
        // Random access: a window in the middle.
        assert_eq!(shard.read(100, 50).unwrap(), want[100..150], "{name}");
    }
    // uint16's extremes and GPT-2's end-of-text id survive.
    let gpt2 = Shard::open(&fixtures().join("llmc_gpt2.bin"))
        .unwrap()
        .read_all()
        .unwrap();
    assert_eq!(gpt2[..3], [50256, 0, 7919]);
    assert_eq!(gpt2[1001..], [0, 65535, 50256]);
}

#[test]
fn nanogpt_prepare_files_read_back_token_for_token() {
    let set = ShardSet::open(&fixtures().join("nanogpt")).unwrap();
    assert_eq!(set.source, Source::NanoGpt);
    assert!(set.manifest.is_none());
    let train = set.read_all(Split::Train).unwrap();
    let val = set.read_all(Split::Val).unwrap();
    assert_eq!(train, expected("nanogpt/train.bin"));
    assert_eq!(val, expected("nanogpt/val.bin"));
    // prepare.py's split: int(n * 0.9) of the 81 characters.
    assert_eq!((train.len(), val.len()), (72, 9));
}
