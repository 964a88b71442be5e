//! Constrained decoding on the real default model (SmolLM2-135M-Instruct, its chat template):
//! every output parses and validates against its JSON Schema (the `jsonschema` crate) at
//! temperature 0 and 1; regular expressions, choices and Lark grammars are matched whole;
//! a budget too small to finish says so; bad constraints are one line naming the problem.
//! The 52-schema set is bench/structured/schemas.jsonl; this test takes every fourth (13),
//! bench/structured-output.sh all of them.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;

use lever_generate::{
    Constraint, Finish, FinishReason, Generator, Local, Prompt, Request, Sampling,
};
use lever_model::{Message, Model, registry};
use serde_json::Value;

fn default_model() -> Arc<Model> {
    let home = registry::lever_home();
    let source = lever_model::model::resolve(registry::DEFAULT_GENERATOR, &home, &mut |_| {})
        .expect("provision the default model (`lever models pull`)");
    Arc::new(Model::load(&source, &candle_core::Device::Cpu).expect("load the default model"))
}

fn schemas() -> Vec<(String, Value)> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bench/structured/schemas.jsonl");
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["prompt"].as_str().unwrap().to_string(),
                v["schema"].clone(),
            )
        })
        .collect()
}

fn ask(
    g: &mut Local,
    question: &str,
    c: &Constraint,
    temperature: f32,
    max_tokens: usize,
) -> lever_generate::Output {
    let messages = [Message::new("user", question.to_string())];
    let req = Request {
        prompt: Prompt::Chat(&messages),
        max_tokens,
        stop: &[],
        sampling: Sampling {
            temperature: Some(temperature),
            seed: Some(7),
            ..Sampling::default()
        },
        constraint: Some(c),
    };
    g.generate(&req, &mut |_| lever_generate::Flow::Continue)
        .unwrap()
}

#[test]
fn json_schema_outputs_parse_and_validate_at_temperature_0_and_1() {
    let mut g = Local::new(default_model());
    let all = schemas();
    assert!(all.len() >= 50);
    let mut n = 0;
    // bench/structured-output.sh sets LEVER_SCHEMAS_ALL=1 to take every schema.
    let step = if std::env::var_os("LEVER_SCHEMAS_ALL").is_some() {
        1
    } else {
        4
    };
    for (prompt, schema) in all.iter().step_by(step) {
        let validator = jsonschema::validator_for(schema).unwrap();
        for t in [0.0, 1.0] {
            let out = ask(
                &mut g,
                prompt,
                &Constraint::JsonSchema(schema.clone()),
                t,
                160,
            );
            assert_eq!(
                out.valid,
                Some(true),
                "{prompt} at T={t}: {:?} {:?}",
                out.text,
                out.finish_reason
            );
            let v: Value = serde_json::from_str(&out.text).unwrap_or_else(|e| {
                panic!("{prompt} at T={t}: {:?} does not parse: {e}", out.text)
            });
            if let Err(e) = validator.validate(&v) {
                panic!("{prompt} at T={t}: {} is not valid: {e}", out.text);
            }
            n += 1;
        }
    }
    eprintln!("{n} constrained outputs parse and validate");
}

#[test]
fn regex_choice_and_grammar_are_matched_whole() {
    let mut g = Local::new(default_model());
    let date = regex::Regex::new(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$").unwrap();
    let re = regex::Regex::new(r"^[0-9]{1,2} \+ [0-9]{1,2} = [0-9]{1,2}$").unwrap();
    for t in [0.0, 1.0] {
        let out = ask(
            &mut g,
            "When did the war end?",
            &Constraint::Regex("[0-9]{4}-[0-9]{2}-[0-9]{2}".into()),
            t,
            20,
        );
        assert!(date.is_match(&out.text), "{:?}", out.text);
        assert_eq!(out.valid, Some(true));
        let choices = vec![
            "positive".to_string(),
            "negative".to_string(),
            "neutral".to_string(),
        ];
        let out = ask(
            &mut g,
            "Sentiment of: 'I loved this film'",
            &Constraint::Choice(choices.clone()),
            t,
            8,
        );
        assert!(choices.contains(&out.text), "{:?}", out.text);
        let out = ask(
            &mut g,
            "Add two small numbers.",
            &Constraint::Lark("start: NUM \" + \" NUM \" = \" NUM\nNUM: /[0-9]{1,2}/\n".into()),
            t,
            20,
        );
        assert!(re.is_match(&out.text), "{:?}", out.text);
    }
}

#[test]
fn a_budget_too_small_is_flagged_and_bad_constraints_are_one_line() {
    let mut g = Local::new(default_model());
    let out = ask(
        &mut g,
        "Describe a person.",
        &Constraint::JsonObject,
        0.0,
        3,
    );
    assert_eq!(out.finish_reason, Finish::Local(FinishReason::Length));
    assert_eq!(out.valid, Some(false), "{:?}", out.text);
    assert!(out.text.starts_with('{'), "{:?}", out.text);

    let mut bad = |c: Constraint| {
        let messages = [Message::new("user", "x".to_string())];
        let req = Request {
            prompt: Prompt::Chat(&messages),
            max_tokens: 4,
            stop: &[],
            sampling: Sampling::default(),
            constraint: Some(&c),
        };
        let e = g
            .generate(&req, &mut |_| lever_generate::Flow::Continue)
            .unwrap_err()
            .to_string();
        assert_eq!(e.lines().count(), 1, "{e}");
        e
    };
    let e = bad(Constraint::JsonSchema(serde_json::json!(
        {"type": "object", "properties": {"a": {"type": "strnig"}}}
    )));
    assert!(e.contains("/properties/a/type"), "{e}");
    let e = bad(Constraint::JsonSchema(
        serde_json::json!({"type": "string", "format": "weird"}),
    ));
    assert!(e.contains("weird"), "{e}");
    // A keyword llguidance does not implement is named, not ignored.
    let e = bad(Constraint::JsonSchema(
        serde_json::json!({"type": "array", "items": {"type": "integer"}, "uniqueItems": true}),
    ));
    assert!(e.contains("uniqueItems"), "{e}");
    let e = bad(Constraint::Regex("([a-z".into()));
    assert!(
        e.contains("regular expression") && e.contains("([a-z"),
        "{e}"
    );
    let e = bad(Constraint::Lark("start: \"a\" missing\n".into()));
    assert!(e.contains("missing"), "{e}");
    let e = bad(Constraint::Choice(vec![]));
    assert!(e.contains("no choices"), "{e}");
}

/// Tool calls (`lever_generate::tools`): with a call required, the answer is one call whose
/// name is a tool's and whose arguments validate against that tool's parameters, at both
/// temperatures; a named function gets that function; with `auto`, the answer is a call or a
/// text that does not start with '<'.
#[test]
fn tool_calls_name_a_tool_and_their_arguments_validate() {
    use lever_generate::tools::{self, Tool, ToolChoice};
    let mut g = Local::new(default_model());
    let weather = serde_json::json!({"type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30},
                       "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]});
    let tools_list = [
        Tool::new(
            "get_weather",
            Some("Weather in a city".into()),
            Some(weather.clone()),
        )
        .unwrap(),
        Tool::new("get_time", Some("The time now".into()), None).unwrap(),
    ];
    let question = format!(
        "{}\nWhat is the weather in Paris?",
        tools::system_prompt(&tools_list)
    );
    let validator = jsonschema::validator_for(&weather).unwrap();
    for t in [0.0, 1.0] {
        let c = tools::constraint(&tools_list, &ToolChoice::Required).unwrap();
        let out = ask(&mut g, &question, &c, t, 60);
        assert_eq!(out.valid, Some(true), "{:?}", out.text);
        let call = tools::parse_call(&out.text).unwrap_or_else(|| panic!("{:?}", out.text));
        assert!(["get_weather", "get_time"].contains(&call.name.as_str()));
        if call.name == "get_weather" {
            assert!(validator.is_valid(&call.arguments), "{:?}", out.text);
        }
        let c = tools::constraint(&tools_list, &ToolChoice::Named("get_weather".into())).unwrap();
        let out = ask(&mut g, &question, &c, t, 60);
        let call = tools::parse_call(&out.text).unwrap_or_else(|| panic!("{:?}", out.text));
        assert_eq!(call.name, "get_weather");
        assert!(validator.is_valid(&call.arguments), "{:?}", out.text);
        let c = tools::constraint(&tools_list, &ToolChoice::Auto).unwrap();
        let out = ask(&mut g, &question, &c, t, 60);
        match tools::parse_call(&out.text) {
            Some(call) => assert!(["get_weather", "get_time"].contains(&call.name.as_str())),
            None => assert!(
                !out.text.starts_with('<') && !out.text.is_empty(),
                "{:?}",
                out.text
            ),
        }
    }
}
