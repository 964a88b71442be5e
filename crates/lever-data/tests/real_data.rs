//! The data layer on the real default model and the real datasets in ../shared/data.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use lever_data::sft::{self, Overlong, Prepared};
use lever_data::{Dataset, Example, Fields, Format};
use lever_model::{Model, registry};

fn default_model() -> Model {
    let home = registry::lever_home();
    let source = lever_model::model::resolve(registry::DEFAULT_GENERATOR, &home, &mut |_| {})
        .expect("provision the default model (`lever models pull`)");
    Model::load(&source, &candle_core::Device::Cpu).expect("load the default model")
}

fn shared(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data")
        .join(rel)
}

fn gsm8k_fields() -> Fields {
    let mut f = Fields::default();
    f.set("instruction=question").unwrap();
    f.set("output=answer").unwrap();
    f
}

/// GSM8K under SmolLM2's ChatML template: the trained tokens are exactly the answer and the
/// end-of-turn marker, and the pieces tokenize as the whole rendered text does (so training
/// sees the ids that inference sees).
#[test]
fn assistant_tokens_are_the_only_trained_ones() {
    let model = default_model();
    let template = model.chat_template.as_ref().unwrap();
    let data = Dataset::read(
        &shared("instructions/gsm8k_train_first5000.jsonl"),
        None,
        &gsm8k_fields(),
    )
    .unwrap();
    assert_eq!(data.format, Format::Alpaca);
    assert_eq!(data.examples.len(), 5000);
    for (line, example) in data.examples.iter().take(200) {
        let t = sft::tokenize(&model.tokenizer, Some(template), example, *line).unwrap();
        let Example::Conversation(messages) = example else {
            panic!()
        };
        let whole = model
            .tokenizer
            .encode(&template.render(messages, false).unwrap(), true)
            .unwrap();
        assert_eq!(t.ids, whole, "line {line}: pieces tokenize like the whole");
        let trained: Vec<u32> = t
            .ids
            .iter()
            .zip(&t.trained)
            .filter(|(_, m)| **m)
            .map(|(i, _)| *i)
            .collect();
        let answer = &messages.last().unwrap().content;
        assert_eq!(
            model.tokenizer.decode(&trained),
            format!("{answer}<|im_end|>\n"),
            "line {line}"
        );
        // Trained tokens form one contiguous span at the end.
        let first = t.trained.iter().position(|m| *m).unwrap();
        assert!(t.trained[first..].iter().all(|m| *m), "line {line}");
    }
}

/// Self-Instruct's nested instances, read through field paths; multi-turn chat with a system
/// prompt; the split is seeded and counts what it drops.
#[test]
fn preparation_splits_by_seed_and_counts_what_it_drops() {
    let model = default_model();
    let template = model.chat_template.as_ref();
    let mut fields = Fields::default();
    fields.set("input=instances/0/input").unwrap();
    fields.set("output=instances/0/output").unwrap();
    let data = Dataset::read(
        &shared("instructions/self_instruct_seed_tasks.jsonl"),
        None,
        &fields,
    )
    .unwrap();
    assert_eq!(data.examples.len(), 175);
    let a = Prepared::new(
        &data,
        &model.tokenizer,
        template,
        128,
        Overlong::Skip,
        0.1,
        7,
    )
    .unwrap();
    let b = Prepared::new(
        &data,
        &model.tokenizer,
        template,
        128,
        Overlong::Skip,
        0.1,
        7,
    )
    .unwrap();
    let c = Prepared::new(
        &data,
        &model.tokenizer,
        template,
        128,
        Overlong::Truncate,
        0.1,
        8,
    )
    .unwrap();
    assert_eq!(a.train, b.train);
    assert_ne!(a.train, c.train);
    assert!(
        a.skipped_long > 0 && a.truncated == 0,
        "{} {}",
        a.skipped_long,
        a.truncated
    );
    assert_eq!(
        a.train.len() + a.validation.len() + a.skipped_long + a.skipped_untrained,
        175
    );
    assert_eq!(c.truncated, a.skipped_long);
    assert!(
        c.train
            .iter()
            .chain(&c.validation)
            .all(|t| t.ids.len() <= 128)
    );
    assert_eq!(
        a.validation.len(),
        ((175 - a.skipped_long) as f64 * 0.1).round() as usize
    );

    let text = sft::show_mask(&model.tokenizer, &a.train[0]);
    assert!(
        text.contains(" + ") && text.contains(" . ") && text.contains("<|im_start|>"),
        "{text}"
    );
}

#[test]
fn multi_turn_chat_trains_every_assistant_turn() {
    let model = default_model();
    let template = model.chat_template.as_ref().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.jsonl");
    std::fs::write(&path, r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}"#).unwrap();
    let data = Dataset::read(&path, None, &Fields::default()).unwrap();
    let t = sft::tokenize(&model.tokenizer, Some(template), &data.examples[0].1, 1).unwrap();
    let mut spans = Vec::new();
    let mut cur = Vec::new();
    for (id, m) in t.ids.iter().zip(&t.trained) {
        if *m {
            cur.push(*id);
        } else if !cur.is_empty() {
            spans.push(model.tokenizer.decode(&std::mem::take(&mut cur)));
        }
    }
    if !cur.is_empty() {
        spans.push(model.tokenizer.decode(&cur));
    }
    assert_eq!(spans, vec!["Hello!<|im_end|>\n", "4<|im_end|>\n"]);
}
