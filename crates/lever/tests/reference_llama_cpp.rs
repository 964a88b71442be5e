//! lever against llama.cpp on the same GGUF file (SmolLM2-135M-Instruct Q4_1): tokenization,
//! greedy output and perplexity. Fixtures: scripts/make-llama-cpp-fixtures.sh.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::{default_model, fixture, ids, shared_data};
use lever_generate::Session;
use lever_generate::sampling::argmax;

#[test]
fn tokenizer_matches_llama_tokenize() {
    let model = default_model();
    let fx = fixture("llama-cpp/tokenize.json");
    let cases = fx["cases"].as_array().expect("cases");
    assert!(cases.len() >= 30, "need at least 30 golden strings");
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let want = ids(&case["ids"]);
        let got = model.tokenizer.encode(text, true).expect("encode");
        if got != want {
            failures.push(format!(
                "{text:?}\n  llama.cpp {want:?}\n  lever     {got:?}"
            ));
        }
        // Decoding the ids gives the text back (byte-level BPE is lossless).
        assert_eq!(model.tokenizer.decode(&got), text, "round trip of {text:?}");
    }
    assert!(
        failures.is_empty(),
        "{} of {} differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Gemma 3's SentencePiece vocabulary (scores, byte fallback, no space prefix, whitespace runs
/// as user-defined tokens) against `llama-tokenize` on the same GGUF: the llama-family strings
/// plus byte-fallback ones. Fixture: scripts/gemma3_tokenize_fixture.py. Reads only the
/// vocabulary (lever does not run the gemma3 architecture yet); provisions gemma3-270m on
/// first use, as `lever models pull` does in CI.
#[test]
fn gemma3_tokenizer_matches_llama_tokenize() {
    let source = gemma3_source();
    let tokenizer = lever_model::model::load_tokenizer(&source).expect("read the vocabulary");
    let fx = fixture("llama-cpp/gemma3-tokenize.json");
    assert_eq!(fx["add_space_prefix"], false);
    let cases = fx["cases"].as_array().expect("cases");
    assert!(cases.len() >= 90, "{} cases", cases.len());
    let mut failures = Vec::new();
    let mut byte_fallback = 0;
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let want = ids(&case["ids"]);
        let got = tokenizer.encode(text, true).expect("encode");
        if got != want {
            failures.push(format!(
                "{text:?}\n  llama.cpp {want:?}\n  lever     {got:?}"
            ));
        }
        // BOS first (the file asks for it); the rest decodes to the text.
        assert_eq!(got.first().copied(), tokenizer.bos(), "{text:?}");
        let body = tokenizer.encode(text, false).expect("encode");
        assert_eq!(body.as_slice(), &got[1..], "{text:?}");
        assert_eq!(tokenizer.decode(&body), text, "round trip of {text:?}");
        if body.iter().any(|&id| {
            tokenizer
                .id_to_token(id)
                .is_some_and(|t| t.starts_with("<0x"))
        }) {
            byte_fallback += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // 9 of the strings need byte tokens (control characters, rare CJK, new emoji, …).
    assert!(
        byte_fallback >= 9,
        "only {byte_fallback} strings used byte tokens"
    );
}

/// Tokens identical to llama.cpp's before the first divergence, summed over the 12 prompts
/// (251 measured 2026-11-27 with lever's kernels).
const MATCHED_FLOOR: usize = 245;

#[test]
fn greedy_output_matches_llama_completion() {
    let model = default_model();
    let fx = fixture("llama-cpp/greedy.json");
    let cases = fx["cases"].as_array().expect("cases");
    assert!(cases.len() >= 10);
    let (mut exact, mut near_ties) = (0, 0);
    let mut failures = Vec::new();
    let mut matched_tokens = 0;
    let (mut forced_same, mut forced_total, mut forced_margins) = (0, 0, Vec::<f32>::new());
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let prompt = case["prompt"].as_str().expect("prompt");
        let prompt_ids = ids(&case["prompt_ids"]);
        assert_eq!(
            model.tokenizer.encode(prompt, true).expect("encode"),
            prompt_ids,
            "{name}: prompt tokens"
        );
        if let Some(messages) = case.get("messages").filter(|m| m.is_array()) {
            let messages: Vec<lever_model::Message> =
                serde_json::from_value(messages.clone()).expect("messages");
            let rendered = model
                .chat_template
                .as_ref()
                .expect("chat template")
                .render(&messages, true)
                .expect("render");
            assert_eq!(rendered, prompt, "{name}: chat template rendering");
        }
        let want = ids(&case["completion_ids"]);
        let mut session = Session::new(&model);
        let mut logits = session.prefill(&model, &prompt_ids).expect("prefill");
        let mut diverged = None;
        let mut same = 0;
        for (step, &want_id) in want.iter().enumerate() {
            let got = argmax(&logits);
            if got != want_id {
                let mut sorted = logits.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                let gap = sorted[0] - sorted[1];
                if gap >= 0.01 {
                    failures.push(format!(
                        "{name}: step {step}: lever {got} vs llama.cpp {want_id}, top-2 gap {gap:.4} is not a near-tie"
                    ));
                }
                diverged = Some((step, gap));
                break;
            }
            same += 1;
            if model.tokenizer.is_eog(got) {
                break;
            }
            logits = session.feed(&model, &[got]).expect("feed");
        }
        matched_tokens += same;
        // Teacher-forced: every step sees llama.cpp's tokens so far, so one divergence does
        // not decide the rest; count the steps where lever picks llama.cpp's next token.
        let mut session = Session::new(&model);
        let mut logits = session.prefill(&model, &prompt_ids).expect("prefill");
        for &want_id in &want {
            let got = argmax(&logits);
            forced_total += 1;
            if got == want_id {
                forced_same += 1;
            } else {
                let top = logits[got as usize];
                forced_margins.push(top - logits[want_id as usize]);
            }
            if model.tokenizer.is_eog(want_id) {
                break;
            }
            logits = session.feed(&model, &[want_id]).expect("feed");
        }
        match diverged {
            None => exact += 1,
            Some((step, gap)) => {
                near_ties += 1;
                eprintln!("{name}: diverged at step {step} (top-2 gap {gap:.4})");
            }
        }
    }
    forced_margins.sort_by(f32::total_cmp);
    eprintln!(
        "teacher-forced: {forced_same}/{forced_total} steps pick llama.cpp's token; margins where not: {forced_margins:.3?}"
    );
    eprintln!(
        "greedy: {exact} identical, {near_ties} diverged, {matched_tokens} tokens identical before any divergence\n{}",
        failures.join("\n")
    );
    // KNOWN GAP (issue 2, 8a). Free-running greedy text is chaotic at this model size: one
    // different pick changes everything after it, and llama.cpp disagrees with itself as
    // much (`-ub 1`: 6 of 12 identical; `-fa off`: 4 of 12; scripts/llama-cpp-self-consistency.sh).
    // Measured 2026-11-27: candle's kernels gave 6 identical / 269 tokens, teacher-forced
    // 369/380 (worst margin 0.335); lever's kernels (llama.cpp's Q4_1/Q8_0 lane arithmetic,
    // f16 attention, ggml RoPE angles) give 5 / 251, teacher-forced 368/380 (worst 0.297) and
    // 20x closer perplexity. The teacher-forced count is the steady measure; both floors
    // catch a real regression.
    assert!(
        forced_same >= 366,
        "teacher-forced agreement fell to {forced_same}/{forced_total}"
    );
    assert!(
        forced_margins.last().is_none_or(|m| *m < 0.35),
        "a teacher-forced disagreement is not close: {forced_margins:?}"
    );
    assert!(exact >= 5, "identical prompts fell from 5 to {exact}");
    assert!(
        matched_tokens >= MATCHED_FLOOR,
        "identical tokens fell to {matched_tokens}"
    );
}

#[test]
fn perplexity_within_one_percent_of_llama_perplexity() {
    let model = default_model();
    let fx = fixture("llama-cpp/perplexity.json");
    let want = fx["results"]
        .as_array()
        .expect("results")
        .iter()
        .find(|r| r["chunks"] == 4)
        .expect("4-chunk result")["ppl"]
        .as_f64()
        .expect("ppl");
    let text = std::fs::read_to_string(shared_data("tinyshakespeare/input.txt")).expect("data");
    let tokens = model.tokenizer.encode(&text, true).expect("encode");
    let got = lever_generate::perplexity(&model, &tokens, 512, Some(4), &mut |_, _| {})
        .expect("perplexity");
    let rel = (got.ppl - want).abs() / want;
    eprintln!(
        "perplexity ctx 512, 4 chunks: lever {:.4}, llama.cpp {want:.4}, rel diff {:.4}%",
        got.ppl,
        rel * 100.0
    );
    assert_eq!(got.chunks, 4);
    assert_eq!(got.scored_tokens, 4 * 255);
    assert!(rel < 0.01, "lever {} vs llama.cpp {want}", got.ppl);
}

/// `lever quantize` writes files llama.cpp loads: the same bytes it was scored on (sha256), and
/// lever's perplexity on them within 1% of llama-perplexity's.
#[test]
fn quantized_files_load_in_llama_cpp_and_score_alike() {
    let fx = fixture("llama-cpp/quantize.json");
    let dir = tempfile::tempdir().expect("tempdir");
    let src = default_model().info.path;
    let text = std::fs::read_to_string(shared_data("tinyshakespeare/input.txt")).expect("data");
    for r in fx["results"].as_array().expect("results") {
        let ty = r["type"].as_str().expect("type");
        let out = dir.path().join(format!("{ty}.gguf"));
        let qtype = lever_model::formats::quantize::parse_type(ty).expect("type");
        lever_model::formats::quantize::quantize_gguf(&src, &out, qtype, &mut |_, _| {})
            .expect("quantize");
        let sum = lever_model::registry::sha256_file(&out).expect("sha256");
        assert_eq!(
            sum,
            r["sha256"].as_str().expect("sha"),
            "{ty}: output bytes changed"
        );
        let model = lever_model::Model::load_gguf(&out, &candle_core::Device::Cpu).expect("load");
        let tokens = model.tokenizer.encode(&text, true).expect("encode");
        let got = lever_generate::perplexity(&model, &tokens, 512, Some(4), &mut |_, _| {})
            .expect("perplexity")
            .ppl;
        let want = r["llama_cpp_ppl"].as_f64().expect("ppl");
        let rel = (got - want).abs() / want;
        eprintln!(
            "{ty}: lever {got:.4}, llama.cpp {want:.4}, {:.3}% apart",
            rel * 100.0
        );
        assert!(rel < 0.01, "{ty}: {got} vs {want}");
    }
}

/// llama-perplexity on gemma-3-270m-q4_k_m.gguf, tinyshakespeare, `-c 1024 --chunks 2 -t 2`
/// (0.3.36 build, 2026-12-07): each chunk runs past the 512-token sliding window of the
/// local layers, so the window's mask is measured too.
const GEMMA3_PPL_CTX1024_2CHUNKS: f64 = 50.2302;

/// gemma3-270m (lever's gemma3 block; Q5_0/Q8_0 on the packed kernels, Q4_K on candle's, Q6_K on
/// lever's) against llama.cpp on the same file: perplexity within 1%.
#[test]
fn gemma3_perplexity_within_one_percent_of_llama_perplexity() {
    let source = gemma3_source();
    let model = lever_model::Model::load(&source, &candle_core::Device::Cpu).expect("load");
    let text = std::fs::read_to_string(shared_data("tinyshakespeare/input.txt")).expect("data");
    let tokens = model.tokenizer.encode(&text, true).expect("encode");
    let got = lever_generate::perplexity(&model, &tokens, 1024, Some(2), &mut |_, _| {})
        .expect("perplexity");
    let want = GEMMA3_PPL_CTX1024_2CHUNKS;
    let rel = (got.ppl - want).abs() / want;
    eprintln!(
        "gemma3 perplexity ctx 1024, 2 chunks: lever {:.4}, llama.cpp {want:.4}, rel diff {:.4}%",
        got.ppl,
        rel * 100.0
    );
    assert_eq!(got.chunks, 2);
    assert!(rel < 0.01, "lever {} vs llama.cpp {want}", got.ppl);
}

/// gemma3-270m fed llama.cpp's own greedy tokens step by step (teacher-forced, as the default
/// model's test): the steps where lever's greedy pick is llama.cpp's, and how close the logits
/// are where not. Fixture: scripts/gemma3_greedy_fixture.py (12 raw prompts × 32 tokens).
#[test]
fn gemma3_teacher_forced_agreement_with_llama_completion() {
    let source = gemma3_source();
    let model = lever_model::Model::load(&source, &candle_core::Device::Cpu).expect("load");
    let fx = fixture("llama-cpp/gemma3-greedy.json");
    let cases = fx["cases"].as_array().expect("cases");
    assert!(cases.len() >= 12, "{} cases", cases.len());
    let (mut same, mut total, mut margins) = (0, 0, Vec::<f32>::new());
    for case in cases {
        let prompt_ids = ids(&case["prompt_ids"]);
        let prompt = case["prompt"].as_str().expect("prompt");
        assert_eq!(
            model.tokenizer.encode(prompt, true).expect("encode"),
            prompt_ids,
            "{prompt:?}"
        );
        let mut session = Session::new(&model);
        let mut logits = session.prefill(&model, &prompt_ids).expect("prefill");
        for &want in &ids(&case["completion_ids"]) {
            let got = argmax(&logits);
            total += 1;
            if got == want {
                same += 1;
            } else {
                margins.push(logits[got as usize] - logits[want as usize]);
            }
            if model.tokenizer.is_eog(want) {
                break;
            }
            logits = session.feed(&model, &[want]).expect("feed");
        }
    }
    margins.sort_by(f32::total_cmp);
    eprintln!(
        "gemma3 teacher-forced: {same}/{total} steps pick llama.cpp's token; margins where not: {margins:.3?}"
    );
    // Measured 2026-12-08: 374/384, worst margin 0.322, with Q5_0, Q8_0, Q4_K and Q6_K in the
    // packed kernels (371/384, worst 0.223, in llama.cpp's lane order: LEVER_PACKED=0). Both floors
    // catch a real regression.
    assert!(same * 100 >= total * 96, "agreement fell to {same}/{total}");
    assert!(
        margins.last().is_none_or(|m| *m < 0.35),
        "a disagreement is not close: {margins:?}"
    );
}

/// Gemma 3's SentencePiece vocabulary written as a Hugging Face tokenizer.json (what `lever
/// export` writes for a GGUF-loaded Gemma) and read by the `tokenizers` library (the one behind
/// Python's `tokenizers` and transformers' fast tokenizers): the ids of every fixture string
/// equal llama-tokenize's (BOS included), and decoding gives the text back.
#[test]
fn gemma3_tokenizer_json_encodes_as_llama_tokenize() {
    let source = gemma3_source();
    let tokenizer = lever_model::model::load_tokenizer(&source).expect("read the vocabulary");
    let json = tokenizer.to_hf_json().expect("write tokenizer.json");
    let hf: tokenizers::Tokenizer = json.parse().expect("tokenizers reads it");
    let fx = fixture("llama-cpp/gemma3-tokenize.json");
    let mut failures = Vec::new();
    for case in fx["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let want = ids(&case["ids"]);
        let got = hf.encode(text, true).expect("encode").get_ids().to_vec();
        if got != want {
            failures.push(format!(
                "{text:?}\n  llama.cpp {want:?}\n  tokenizer.json {got:?}"
            ));
        }
        // After BOS, the text back, special tokens as written.
        assert_eq!(
            hf.decode(&got[1..], false).expect("decode"),
            text,
            "{text:?}"
        );
    }
    assert!(
        failures.is_empty(),
        "{} differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The registry's gemma3-270m, provisioned.
fn gemma3_source() -> lever_model::model::ModelSource {
    let home = lever_model::registry::lever_home();
    lever_model::model::resolve(lever_model::registry::GEMMA3_270M, &home, &mut |_| {})
        .expect("provision gemma3-270m (`lever models pull gemma3-270m`)")
}
