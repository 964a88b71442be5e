//! `lever serve` on the real default model and embedder, over real sockets: OpenAI shapes
//! (chat, streaming chat, completions, embeddings, models, health), answers equal to `lever
//! ask` / `lever embed` for the same input, errors in OpenAI's shape with the right status
//! (on every route: 404, 405; unknown and unsupported parameters named; prompt + max_tokens
//! over the context), the API key, body and max_tokens limits, the bounded queue (429),
//! per-request adapters, batching of concurrent requests, cancellation when a client goes
//! away, graceful SIGTERM, hostile and slow clients (half a request, a huge Content-Length,
//! half-open connections at SIGTERM), a long prompt that must not stall a short request
//! (chunked prefill), and the official `openai` Python client.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::http::{self, get, post};
use common::{Server, lever_in_env};

/// The in-process side of every comparison: the same packed kernels `lever serve` uses, so
/// the two must give the same bits (other commands default to llama.cpp's lane order).
fn lever(dir: &std::path::Path, args: &[&str]) -> common::Out {
    lever_in_env(dir, args, &[("LEVER_PACKED", "1")])
}

const KEY: &str = "sekrit-test-key";

/// The test that times an answer (`a_long_prompt_does_not_stall_a_short_request`) has the
/// machine to itself; the others share it with each other.
static MACHINE: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn shared_machine() -> std::sync::RwLockReadGuard<'static, ()> {
    MACHINE.read().unwrap_or_else(|e| e.into_inner())
}

fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn openai_shapes_and_answers_equal_lever_ask() {
    let _machine = shared_machine();
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(
        d.path(),
        &[
            "--api-key",
            KEY,
            "--max-tokens-limit",
            "64",
            "--max-body-bytes",
            "4096",
        ],
    );
    let a = s.addr.as_str();
    // Health needs no key; everything else does.
    let h = get(a, "/health", None);
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    let r = get(a, "/v1/models", None);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    assert_eq!(get(a, "/v1/models", Some("wrong")).status, 401);
    let m = get(a, "/v1/models", Some(KEY)).json();
    let ids: Vec<&str> = m["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["smollm2-135m-instruct", "all-minilm-l6-v2"]);

    // Greedy chat equals `lever ask` (same chat template, same tokens, same decoder).
    let q = "What is the capital of France?";
    let ask = lever(
        d.path(),
        &[
            "ask",
            q,
            "--max-tokens",
            "16",
            "--temperature",
            "0",
            "--json",
        ],
    )
    .ok()
    .json();
    let body = json!({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": q}], "max_tokens": 16, "temperature": 0});
    let v = post(a, "/v1/chat/completions", Some(KEY), &body);
    assert_eq!(v.status, 200, "{}", v.text());
    let v = v.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(content(&v), ask["text"].as_str().unwrap());
    assert_eq!(v["usage"]["prompt_tokens"], ask["prompt_tokens"]);
    assert_eq!(v["usage"]["completion_tokens"], ask["completion_tokens"]);
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
    );
    let want_finish = if ask["finish_reason"] == "length" {
        "length"
    } else {
        "stop"
    };
    assert_eq!(v["choices"][0]["finish_reason"], want_finish);

    // Streaming: role first, the same text in pieces, the finish, usage, [DONE].
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let r = post(a, "/v1/chat/completions", Some(KEY), &sb);
    assert_eq!(r.status, 200);
    assert!(
        r.headers
            .iter()
            .any(|(k, v)| k == "content-type" && v.starts_with("text/event-stream"))
    );
    let ev = r.events();
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, content(&v));
    let fin = &chunks[chunks.len() - 2];
    assert_eq!(fin["choices"][0]["finish_reason"], want_finish);
    assert_eq!(chunks.last().unwrap()["usage"], v["usage"]);

    // A stop string ends the answer before it, with finish_reason "stop".
    let full = content(&v);
    let word = full.split_whitespace().nth(1).unwrap().to_string();
    let mut stop = body.clone();
    stop["stop"] = json!(word);
    let st = post(a, "/v1/chat/completions", Some(KEY), &stop).json();
    assert_eq!(st["choices"][0]["finish_reason"], "stop");
    assert_eq!(content(&st), full[..full.find(&word).unwrap()]);

    // Text completion: no chat template.
    let c = post(
        a,
        "/v1/completions",
        Some(KEY),
        &json!({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}),
    )
    .json();
    assert_eq!(c["object"], "text_completion");
    assert_eq!(
        c["usage"]["completion_tokens"].as_u64().unwrap()
            + c["usage"]["prompt_tokens"].as_u64().unwrap(),
        c["usage"]["total_tokens"].as_u64().unwrap()
    );
    let raw = lever(
        d.path(),
        &[
            "ask",
            "The capital of France is",
            "--raw",
            "--max-tokens",
            "6",
            "--temperature",
            "0",
            "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(c["choices"][0]["text"], raw["text"]);

    // Embeddings equal `lever embed`.
    let e = post(
        a,
        "/v1/embeddings",
        Some(KEY),
        &json!({"model": "all-minilm-l6-v2", "input": ["hello world", "a second text"]}),
    )
    .json();
    let local = lever(
        d.path(),
        &["embed", "hello world", "a second text", "--json"],
    )
    .ok()
    .json();
    for i in 0..2 {
        let got = e["data"][i]["embedding"].as_array().unwrap();
        let want = local["data"][i]["embedding"].as_array().unwrap();
        assert_eq!(got.len(), 384);
        let diff = got
            .iter()
            .zip(want)
            .map(|(x, y)| (x.as_f64().unwrap() - y.as_f64().unwrap()).abs())
            .fold(0.0, f64::max);
        assert!(diff < 1e-6, "{diff}");
    }
    assert!(e["usage"]["prompt_tokens"].as_u64().unwrap() >= 4);

    // Errors: OpenAI's shape, the right status.
    let err = |r: http::Reply, status: u16, param: Option<&str>| {
        assert_eq!(r.status, status, "{}", r.text());
        let v = r.json();
        assert!(v["error"]["message"].as_str().unwrap().len() > 5, "{v}");
        assert!(v["error"]["type"].is_string());
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p);
        }
        v
    };
    let v = err(
        post(
            a,
            "/v1/chat/completions",
            Some(KEY),
            &json!({"model": "/etc/passwd", "messages": [{"role": "user", "content": "x"}]}),
        ),
        404,
        Some("model"),
    );
    assert_eq!(v["error"]["code"], "model_not_found");
    err(
        post(
            a,
            "/v1/chat/completions",
            Some(KEY),
            &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000}),
        ),
        400,
        Some("max_tokens"),
    );
    err(
        post(
            a,
            "/v1/chat/completions",
            Some(KEY),
            &json!({"messages": [{"role": "user", "content": "x"}], "n": 2}),
        ),
        400,
        Some("n"),
    );
    err(
        post(
            a,
            "/v1/chat/completions",
            Some(KEY),
            &json!({"messages": [{"role": "wizard", "content": "x"}]}),
        ),
        400,
        Some("messages"),
    );
    err(
        post(
            a,
            "/v1/chat/completions",
            Some(KEY),
            &json!({"messages": [{"role": "user", "content": "x"}], "temperature": 5}),
        ),
        400,
        Some("temperature"),
    );
    err(
        http::request(
            a,
            "POST",
            "/v1/chat/completions",
            &[("Authorization", &format!("Bearer {KEY}"))],
            b"{not json",
        ),
        400,
        None,
    );
    let big = json!({"messages": [{"role": "user", "content": "x".repeat(5000)}]});
    err(post(a, "/v1/chat/completions", Some(KEY), &big), 413, None);
    err(get(a, "/v1/nothing", Some(KEY)), 404, None);
    let long =
        json!({"messages": [{"role": "user", "content": "word ".repeat(9000)}], "max_tokens": 4});
    let s2 = Server::start(d.path(), &["--no-embedder"]);
    err(
        post(&s2.addr, "/v1/chat/completions", None, &long),
        400,
        Some("messages"),
    );
    err(
        post(&s2.addr, "/v1/embeddings", None, &json!({"input": "x"})),
        404,
        Some("model"),
    );
}

#[test]
fn a_full_queue_answers_429_and_sigterm_ends_streams_cleanly() {
    let _machine = shared_machine();
    let d = tempfile::tempdir().unwrap();
    // A shutdown deadline far beyond the two streams, however loaded the machine: this test
    // is about finishing them; the deadline has its own test.
    let mut s = Server::start(
        d.path(),
        &[
            "--no-embedder",
            "--max-batch",
            "1",
            "--queue",
            "1",
            "--shutdown-timeout",
            "300",
        ],
    );
    let a = s.addr.clone();
    let counting =
        json!({"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 48, "temperature": 0, "stream": true});
    // One runs, one waits; the third finds the queue full.
    let (st1, _, mut first) = http::open(
        &a,
        "POST",
        "/v1/completions",
        &[("Content-Type", "application/json")],
        counting.to_string().as_bytes(),
    );
    assert_eq!(st1, 200);
    let got_first = http::next_chunk(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&got_first).contains("data: "));
    let b2 = counting.clone();
    let a2 = a.clone();
    let second = std::thread::spawn(move || http::post(&a2, "/v1/completions", None, &b2));
    // Let the second reach the queue.
    let t0 = Instant::now();
    while get(&a, "/health", None).json()["waiting"] != 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the second request never queued"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let third = http::post(
        &a,
        "/v1/completions",
        None,
        &json!({"prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(third.status, 429, "{}", third.text());
    assert_eq!(third.json()["error"]["code"], "rate_limit_exceeded");

    // SIGTERM while streams are in flight: they finish with [DONE]; exit 0.
    let code = {
        let term = std::thread::spawn({
            let pid = s.child.id();
            move || {
                std::thread::sleep(Duration::from_millis(200));
                std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .unwrap();
            }
        });
        let mut rest = Vec::new();
        while let Some(c) = http::next_chunk(&mut first) {
            rest.extend(c);
        }
        term.join().unwrap();
        let text = String::from_utf8_lossy(&rest).into_owned();
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        let second = second.join().unwrap();
        assert_eq!(second.status, 200);
        assert_eq!(second.events().last().unwrap(), "[DONE]");
        s.child.wait().unwrap().code()
    };
    assert_eq!(code, Some(0), "{}", s.log.lock().unwrap());
    assert!(s.log.lock().unwrap().contains("lever serve: stopped"));
    assert!(std::net::TcpStream::connect(&a).is_err());
}

#[test]
fn concurrent_requests_share_steps_and_a_gone_client_is_cancelled() {
    let _machine = shared_machine();
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path(), &["--no-embedder", "--max-tokens-limit", "2000"]);
    let a = s.addr.clone();
    // Four at once, greedy: each answer equals the same request made alone.
    let prompts = [
        "Name a fruit.",
        "Count to five.",
        "What is 2+2?",
        "Say hello.",
    ];
    let body = |p: &str| json!({"messages": [{"role": "user", "content": p}], "max_tokens": 24, "temperature": 0});
    let (alone, prompt_tokens): (Vec<String>, Vec<u64>) = prompts
        .iter()
        .map(|p| {
            let v = post(&a, "/v1/chat/completions", None, &body(p)).json();
            (content(&v), v["usage"]["prompt_tokens"].as_u64().unwrap())
        })
        .unzip();
    let reused = |h: &Value| h["prompt_tokens_reused"].as_u64().unwrap();
    let before = reused(&get(&a, "/health", None).json());
    let together: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = prompts
            .iter()
            .map(|p| {
                let a = a.clone();
                let b = body(p);
                sc.spawn(move || content(&post(&a, "/v1/chat/completions", None, &b).json()))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone);
    let health = get(&a, "/health", None).json();
    assert!(health["max_batch_seen"].as_u64().unwrap() >= 2);
    // The chat template's shared opening came from the prompt cache in the first round; in
    // the second each prompt found its own earlier copy (all but the last token, which is
    // fed for its logits), with the same answers.
    assert!(before >= 8, "{health}");
    let again: u64 = prompt_tokens.iter().map(|n| n - 1).sum();
    assert!(
        reused(&health) - before >= again,
        "{health}: {before} + {again}"
    );

    // A client that leaves mid-stream: its sequence stops long before its 2000 tokens.
    let long = json!({"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 2000, "temperature": 0, "stream": true});
    let (st, _, mut r) = http::open(
        &a,
        "POST",
        "/v1/completions",
        &[("Content-Type", "application/json")],
        long.to_string().as_bytes(),
    );
    assert_eq!(st, 200);
    http::next_chunk(&mut r).unwrap();
    let t0 = Instant::now();
    while get(&a, "/health", None).json()["running"] != 1 {
        assert!(t0.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(r);
    let t0 = Instant::now();
    while get(&a, "/health", None).json()["running"] != 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the abandoned generation kept running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn adapters_are_chosen_per_request() {
    let _machine = shared_machine();
    let d = tempfile::tempdir().unwrap();
    // A small real adapter: a few LoRA steps on GSM8K at a high learning rate.
    let data = common::shared_data("instructions/gsm8k_train_first5000.jsonl");
    lever(
        d.path(),
        &[
            "finetune",
            "--data",
            data.to_str().unwrap(),
            "--field",
            "instruction=question",
            "--field",
            "output=answer",
            "--lora",
            "--steps",
            "3",
            "--batch-size",
            "1",
            "--seq-len",
            "256",
            "--overlong",
            "truncate",
            "--lr",
            "5e-3",
            "--val-fraction",
            "0",
            "--out",
            "run",
        ],
    )
    .ok();
    let adapter: PathBuf = d.path().join("run/adapter");
    let s = Server::start(
        d.path(),
        &[
            "--no-embedder",
            "--adapter",
            &format!("gsm={}", adapter.display()),
        ],
    );
    let q = "Tom has 3 apples and buys 4 more. How many apples does he have?";
    let body = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": 24, "temperature": 0});
    let base = content(
        &post(
            &s.addr,
            "/v1/chat/completions",
            None,
            &body("smollm2-135m-instruct"),
        )
        .json(),
    );
    let tuned = content(
        &post(
            &s.addr,
            "/v1/chat/completions",
            None,
            &body("smollm2-135m-instruct:gsm"),
        )
        .json(),
    );
    let ask_tuned = lever(
        d.path(),
        &[
            "ask",
            q,
            "--adapter",
            adapter.to_str().unwrap(),
            "--max-tokens",
            "24",
            "--temperature",
            "0",
            "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(tuned, ask_tuned["text"].as_str().unwrap());
    assert_ne!(base, tuned);
    let ids: Vec<String> = get(&s.addr, "/v1/models", None).json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["smollm2-135m-instruct", "smollm2-135m-instruct:gsm"]);
}

/// The official `openai` Python package against the server. It needs a python with `openai`
/// (`LEVER_TEST_PYTHON`, else python3); .ci/run installs one.
#[test]
fn the_openai_python_client_works() {
    let _machine = shared_machine();
    let python = std::env::var("LEVER_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let has = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        has,
        "{python} cannot import openai: pip install openai, or set LEVER_TEST_PYTHON"
    );
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path(), &["--api-key", KEY]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .env("LEVER_URL", format!("http://{}/v1", s.addr))
        .env("LEVER_KEY", KEY)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("openai client: all checks passed"),
        "{stdout}"
    );
}

#[test]
fn ask_and_rag_ask_generate_through_a_backend() {
    let _machine = shared_machine();
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path(), &["--api-key", KEY]);
    let url = format!("http://{}", s.addr);
    let q = "Name a large animal.";
    let local = lever(d.path(), &["ask", q, "--max-tokens", "12", "--json"])
        .ok()
        .json();
    let remote = lever(
        d.path(),
        &[
            "ask",
            q,
            "--max-tokens",
            "12",
            "--json",
            "--backend",
            &url,
            "--backend-key",
            KEY,
        ],
    )
    .ok()
    .json();
    // Defaults on both sides are the model's published settings (sampled, seed 42).
    assert_eq!(remote["text"], local["text"]);
    assert_eq!(remote["completion_tokens"], local["completion_tokens"]);
    assert_eq!(remote["backend"], format!("{url}/v1"));
    // Settings beyond OpenAI's (top_k, min_p, repetition_penalty) travel and are applied.
    let hot = [
        "--temperature",
        "1.2",
        "--top-k",
        "3",
        "--min-p",
        "0.02",
        "--repeat-penalty",
        "1.3",
        "--seed",
        "7",
    ];
    let mut args = vec!["ask", q, "--max-tokens", "12", "--json"];
    args.extend_from_slice(&hot);
    let local_hot = lever(d.path(), &args).ok().json();
    args.extend_from_slice(&["--backend", &url, "--backend-key", KEY]);
    let remote_hot = lever(d.path(), &args).ok().json();
    assert_eq!(remote_hot["text"], local_hot["text"]);
    assert_ne!(
        local_hot["text"], local["text"],
        "the settings changed nothing"
    );
    // --raw: a text completion.
    let local = lever(
        d.path(),
        &["ask", "Once upon a time", "--raw", "-n", "8", "--json"],
    )
    .ok()
    .json();
    let remote = lever(
        d.path(),
        &[
            "ask",
            "Once upon a time",
            "--raw",
            "-n",
            "8",
            "--json",
            "--backend",
            &url,
            "--backend-key",
            KEY,
        ],
    )
    .ok()
    .json();
    assert_eq!(remote["text"], local["text"]);

    // rag ask: the same grounded prompt, answered by the server. A server of its own: the
    // first server's prompt cache holds the chat template's opening from the prompts above,
    // computed with the one-query f16 attention of short prompts, which this 124-token prompt
    // would continue from, where `rag ask` computes it at once in f32; the two then differ in
    // rounding (as llama.cpp's `cache_prompt` does), enough to move a sampled token.
    let rag_server = Server::start(d.path(), &["--api-key", KEY]);
    let rag_url = format!("http://{}", rag_server.addr);
    std::fs::create_dir(d.path().join("docs")).unwrap();
    std::fs::write(
        d.path().join("docs/keys.md"),
        "# Keys\n\nRotate the API keys every 90 days with `keyctl rotate`.\n",
    )
    .unwrap();
    lever(d.path(), &["index", "add", "docs"]).ok();
    let question = "How often are API keys rotated?";
    let local = lever(d.path(), &["rag", "ask", question, "-n", "24", "--json"])
        .ok()
        .json();
    let remote = lever(
        d.path(),
        &[
            "rag",
            "ask",
            question,
            "-n",
            "24",
            "--json",
            "--backend",
            &rag_url,
            "--backend-key",
            KEY,
        ],
    )
    .ok()
    .json();
    assert_eq!(remote["answer"], local["answer"]);
    assert_eq!(remote["passages"], local["passages"]);

    // chat: two piped turns, the conversation sent whole each turn.
    let chat = |extra: &[&str]| -> String {
        use std::io::Write;
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_lever"))
            .args(["chat", "-n", "10"])
            .env("LEVER_PACKED", "1")
            .args(extra)
            .current_dir(d.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin
            .take()
            .unwrap()
            .write_all(b"Hi there.\nWhat is 2+2?\n")
            .unwrap();
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let local = chat(&[]);
    let remote = chat(&["--backend", &url, "--backend-key", KEY]);
    assert_eq!(remote, local);
    assert_eq!(local.lines().count(), 2, "{local}");

    // eval: a generation task answered by the server, the same records as in-process;
    // a log-likelihood metric is refused.
    std::fs::write(d.path().join("qa.jsonl"), "{\"q\": \"What is the capital of France?\", \"a\": \"Paris\"}\n{\"q\": \"What is the capital of Japan?\", \"a\": \"Tokyo\"}\n").unwrap();
    let task = "[data]\ntrain = \"qa.jsonl\"\ntest = \"qa.jsonl\"\n[prompt]\ntemplate = \"Question: {{ q }}\\nAnswer:\"\ntarget = \"{{ a }}\"\n[metric]\nname = \"contains\"\n[generation]\nmax_tokens = 6\nstop = [\"\\n\"]\n";
    std::fs::write(d.path().join("t.toml"), task).unwrap();
    let ev = |extra: &[&str]| -> Value {
        let mut args = vec![
            "eval",
            "t.toml",
            "--shots",
            "0,1",
            "--format",
            "chat",
            "--no-cache",
            "--json",
        ];
        args.extend_from_slice(extra);
        lever(d.path(), &args).ok().json()
    };
    let here = ev(&["--out", "here"]);
    let there = ev(&["--out", "there", "--backend", &url, "--backend-key", KEY]);
    for (a, b) in here["settings"]
        .as_array()
        .unwrap()
        .iter()
        .zip(there["settings"].as_array().unwrap())
    {
        assert_eq!(a["score"], b["score"]);
        assert_eq!(a["mean_completion_tokens"], b["mean_completion_tokens"]);
    }
    let outs = |dir: &str| -> Vec<Value> {
        std::fs::read_to_string(d.path().join(dir).join("test-1-shot_fixed_chat.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["output"].clone())
            .collect()
    };
    assert_eq!(outs("here"), outs("there"));
    std::fs::write(
        d.path().join("p.toml"),
        task.replace("contains", "perplexity"),
    )
    .unwrap();
    let e = lever(d.path(), &["eval", "p.toml", "--backend", &url]).failed_alone();
    assert!(e.contains("needs log-likelihoods"), "{e}");

    // ladder: the prompting rungs generated by the server (its key passed on to each rung),
    // the same scores and answers as in-process; a rung done in-process is not kept for a
    // backend; a fine-tuning rung is refused by name.
    std::fs::write(d.path().join("pool.jsonl"), "{\"q\": \"What is the capital of Italy?\", \"a\": \"Rome\"}\n{\"q\": \"What is the capital of Spain?\", \"a\": \"Madrid\"}\n").unwrap();
    std::fs::write(
        d.path().join("l.toml"),
        task.replace("train = \"qa.jsonl\"", "train = \"pool.jsonl\""),
    )
    .unwrap();
    std::fs::write(
        d.path().join("ladder.toml"),
        "task = \"l.toml\"\nformat = \"chat\"\n[finetune]\nsteps = 2\n[[rung]]\nname = \"zero-shot\"\n[[rung]]\nname = \"one-shot\"\nshots = 1\n[[rung]]\nname = \"lora\"\nfinetune = \"lora\"\n",
    )
    .unwrap();
    let climb = |out: &str, extra: &[&str]| -> (Value, String) {
        let mut args = vec![
            "ladder",
            "ladder.toml",
            "--out",
            out,
            "--rungs",
            "zero-shot,one-shot",
            "--no-cache",
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = lever(d.path(), &args).ok();
        (o.json(), o.stderr)
    };
    let (here, _) = climb("ladder", &[]);
    let (there, log) = climb("ladder", &["--backend", &url, "--backend-key", KEY]);
    assert!(!log.contains("done before, kept"), "{log}");
    let answers = |r: &str| -> Vec<Value> {
        std::fs::read_to_string(d.path().join("ladder/rungs").join(r).join("records.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["output"].clone())
            .collect()
    };
    for (a, b) in here["rungs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(there["rungs"].as_array().unwrap())
    {
        assert_eq!(a["score"], b["score"], "{a}\n{b}");
        assert_eq!(a["n"], 2);
    }
    assert_eq!(answers("one-shot").len(), 2);
    let (_, again) = climb("ladder", &["--backend", &url, "--backend-key", KEY]);
    assert!(again.contains("one-shot: done before, kept"), "{again}");
    let e = lever(
        d.path(),
        &["ladder", "ladder.toml", "--out", "l2", "--backend", &url],
    )
    .failed_alone();
    assert!(
        e.contains("rung `lora`: a fine-tuned model is evaluated in this process"),
        "{e}"
    );

    // Errors name the backend.
    let e = lever(d.path(), &["ask", q, "--backend", &url]).failed_alone();
    assert!(e.contains("HTTP 401"), "{e}");
    let e = lever(d.path(), &["ask", q, "--backend", "http://127.0.0.1:9"]).failed_alone();
    assert!(e.contains("http://127.0.0.1:9/v1/chat/completions"), "{e}");
    // https is spoken (rustls): a server that is not there, or that does not speak TLS (this
    // one), is one line naming the endpoint.
    for https in [
        "https://127.0.0.1:9".to_string(),
        format!("https://{}", s.addr),
    ] {
        let e = lever(d.path(), &["ask", q, "--backend", &https]).failed_alone();
        assert!(
            e.starts_with(&format!("error: {https}/v1/chat/completions: ")),
            "{e}"
        );
    }
}

/// The two sides of the `Generator` interface, called as the commands call them, give the same
/// answer to the same request: the model in this process (packed kernels, as `lever serve` runs
/// it) and `lever serve` through the remote client. Chat and text completions, greedy and
/// sampled (unset settings from the model's published ones on both sides), a stop string; and
/// a local session that keeps its KV cache across turns answers as the stateless server does.
#[test]
fn local_and_remote_generators_agree() {
    use lever_generate::{Finish, FinishReason, Flow, Generator, Local, Output, Prompt, Remote};
    use lever_generate::{Request, Sampling};
    use lever_model::Message;

    let _machine = shared_machine();
    lever_model::qweight::set_packing(true);
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path(), &["--api-key", KEY]);
    let mut local = Local::new(std::sync::Arc::new(common::default_model()));
    let url = format!("http://{}", s.addr);
    let mut remote = Remote::parse(&url, Some(KEY.into()), None).unwrap();
    assert_eq!(remote.source().to_string(), format!("{url}/v1"));
    assert!(local.can_chat() && remote.can_chat());

    let run = |g: &mut dyn Generator, req: &Request<'_>| -> Output {
        let mut streamed = String::new();
        let out = g
            .generate(req, &mut |t| {
                streamed.push_str(t);
                Flow::Continue
            })
            .unwrap();
        assert_eq!(streamed, out.text, "{}", g.source());
        out
    };
    let same = |req: &Request<'_>, local: &mut Local, remote: &mut Remote| -> String {
        let a = run(local, req);
        let b = run(remote, req);
        assert_eq!(a.text, b.text, "{req:?}");
        assert_eq!(a.completion_tokens, b.completion_tokens, "{req:?}");
        assert_eq!(a.prompt_tokens, b.prompt_tokens, "{req:?}");
        let server_says = match &a.finish_reason {
            Finish::Local(FinishReason::Length | FinishReason::Context) => "length",
            _ => "stop",
        };
        assert_eq!(b.finish_reason, Finish::Server(Some(server_says.into())));
        assert!(a.timings.is_some() && a.sampling.is_some());
        a.text
    };
    let greedy = Sampling {
        temperature: Some(0.0),
        ..Sampling::default()
    };
    let chat = [
        Message::new("system", "You are terse."),
        Message::new("user", "What is the capital of France?"),
    ];
    let mut req = Request {
        constraint: None,
        prompt: Prompt::Chat(&chat),
        max_tokens: 16,
        stop: &[],
        sampling: greedy.clone(),
    };
    let first = same(&req, &mut local, &mut remote);
    assert!(!first.is_empty());
    // Sampled with the model's published settings for what is unset.
    req.sampling = Sampling {
        temperature: Some(1.1),
        top_k: Some(20),
        seed: Some(3),
        ..Sampling::default()
    };
    let hot = same(&req, &mut local, &mut remote);
    assert_ne!(hot, first, "the settings changed nothing");
    // A text completion with a stop string.
    let stop = [",".to_string()];
    let text = Request {
        constraint: None,
        prompt: Prompt::Text("Once upon a time"),
        max_tokens: 24,
        stop: &stop,
        sampling: greedy.clone(),
    };
    let story = same(&text, &mut local, &mut remote);
    assert!(!story.contains(','), "{story}");
    // A second turn: the local session reuses the first turn's cache.
    local.reset();
    let turn1 = [Message::new("user", "Name a color.")];
    let req1 = Request {
        constraint: None,
        prompt: Prompt::Chat(&turn1),
        max_tokens: 8,
        stop: &[],
        sampling: greedy.clone(),
    };
    let answer = same(&req1, &mut local, &mut remote);
    let turn2 = [
        turn1[0].clone(),
        Message::new("assistant", answer),
        Message::new("user", "Name another one."),
    ];
    let req2 = Request {
        constraint: None,
        prompt: Prompt::Chat(&turn2),
        ..req1.clone()
    };
    let kept = same(&req2, &mut local, &mut remote);
    local.reset();
    assert_eq!(
        run(&mut local, &req2).text,
        kept,
        "a fresh session answers the same"
    );
}

/// Open a connection and send `bytes` (part of a request), leaving it open.
fn send_part(addr: &str, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(bytes).unwrap();
    s
}

/// Read until the server closes the connection; what it sent. Fails if it is still open
/// `limit` after `since`.
fn read_until_closed(s: &mut TcpStream, since: Instant, limit: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let left = limit.saturating_sub(since.elapsed());
        assert!(
            !left.is_zero(),
            "the connection is still open after {limit:?}"
        );
        s.set_read_timeout(Some(left)).unwrap();
        let mut buf = [0u8; 4096];
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(e) => panic!("the connection is still open after {limit:?} ({e})"),
        }
    }
}

/// The status and JSON body of a raw HTTP/1.1 response (not chunked).
fn raw_reply(bytes: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(bytes);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
fn slow_clients_are_dropped_and_an_oversized_body_is_refused_unread() {
    let _machine = shared_machine();
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(
        d.path(),
        &[
            "--no-embedder",
            "--header-timeout",
            "2",
            "--body-timeout",
            "2",
            "--max-body-bytes",
            "4096",
        ],
    );
    let a = s.addr.as_str();
    let t0 = Instant::now();
    // Headers never finished; a body shorter than its Content-Length; nothing at all.
    let mut half_headers = send_part(
        a,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le",
    );
    let mut half_body = send_part(
        a,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"messages\": [",
    );
    let mut silent = TcpStream::connect(a).unwrap();
    // Meanwhile the others are answered.
    assert_eq!(get(a, "/health", None).status, 200);
    let r = post(
        a,
        "/v1/chat/completions",
        None,
        &json!({"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 4}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // Each slow one is closed at its timeout (2 s), with a 408 where a request had begun.
    let limit = Duration::from_secs(8);
    for c in [&mut half_headers, &mut silent] {
        let got = read_until_closed(c, t0, limit);
        assert!(got.is_empty() || raw_reply(&got).0 == 408, "{got:?}");
    }
    let (status, body) = raw_reply(&read_until_closed(&mut half_body, t0, limit));
    assert_eq!(status, 408);
    assert_eq!(body["error"]["code"], "request_timeout", "{body}");
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );

    // A Content-Length over the limit: 413 at once, the body never sent.
    let t1 = Instant::now();
    let mut big = send_part(
        a,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n",
    );
    let (status, body) = raw_reply(&read_until_closed(&mut big, t1, Duration::from_secs(1)));
    assert_eq!(status, 413);
    assert_eq!(body["error"]["code"], "request_too_large", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    // A chunked body (no Content-Length) is cut off where it passes the limit.
    let mut chunked = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1388\r\n".to_vec();
    chunked.extend(vec![b' '; 4200]); // of the 5000 its chunk declares: the server reads all
    let t2 = Instant::now();
    let mut c = send_part(a, &chunked);
    let (status, _) = raw_reply(&read_until_closed(&mut c, t2, Duration::from_secs(5)));
    assert_eq!(status, 413);
}

#[test]
fn sigterm_ends_the_server_within_the_deadline_despite_open_connections() {
    let _machine = shared_machine();
    let d = tempfile::tempdir().unwrap();
    let mut s = Server::start(d.path(), &["--no-embedder"]);
    let a = s.addr.clone();
    // Half-open: headers unfinished, and a body that stops short (its handler waits on it).
    let _half_headers = send_part(&a, b"GET /health HTTP/1.1\r\nHost: x\r\n");
    let _half_body = send_part(
        &a,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\": ",
    );
    // An idle keep-alive connection after one answered request.
    let mut idle = send_part(&a, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    // A long stream in flight.
    let long = json!({"prompt": "1, 2, 3,", "max_tokens": 4000, "temperature": 0, "stream": true});
    let (st, _, mut stream) = http::open(
        &a,
        "POST",
        "/v1/completions",
        &[("Content-Type", "application/json")],
        long.to_string().as_bytes(),
    );
    assert_eq!(st, 200);
    http::next_chunk(&mut stream).unwrap();
    let t0 = Instant::now();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let code = loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            break status.code();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "still running 15 s after SIGTERM: {}",
            s.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = s.log.lock().unwrap().clone();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("closed"), "{log}");
    assert!(log.contains("lever serve: stopped"), "{log}");
    assert!(TcpStream::connect(&a).is_err());
}

#[test]
fn a_long_prompt_does_not_stall_a_short_request() {
    let _machine = MACHINE.write().unwrap_or_else(|e| e.into_inner());
    let d = tempfile::tempdir().unwrap();
    // About 7,000 tokens of real text, counted by the model's tokenizer.
    let text: String = std::fs::read_to_string(common::shared_data("tinyshakespeare/input.txt"))
        .unwrap()
        .chars()
        .take(22_800)
        .collect();
    let n = lever(d.path(), &["tokenize", &text, "--json"]).ok().json()["ids"]
        .as_array()
        .unwrap()
        .len();
    assert!((6500..7500).contains(&n), "{n} tokens");
    let s = Server::start(d.path(), &["--no-embedder"]);
    let a = s.addr.as_str();
    // The prompt and max_tokens must fit the context (8192) together.
    let r = post(
        a,
        "/v1/completions",
        None,
        &json!({"prompt": text, "max_tokens": 4000}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let e = r.json();
    assert_eq!(e["error"]["param"], "max_tokens");
    assert_eq!(e["error"]["code"], "context_length_exceeded");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("{n} in the prompt")) && msg.contains("8192"),
        "{msg}"
    );

    // The long prompt starts; while it is computed, a short chat is answered.
    let long = json!({"prompt": text, "max_tokens": 8, "temperature": 0, "stream": true});
    let (st, _, long_reply) = http::open(
        a,
        "POST",
        "/v1/completions",
        &[("Content-Type", "application/json")],
        long.to_string().as_bytes(),
    );
    assert_eq!(st, 200);
    let t0 = Instant::now();
    while get(a, "/health", None).json()["prefilling"] != 1 {
        assert!(t0.elapsed() < Duration::from_secs(30), "never prefilling");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let t1 = Instant::now();
    let short = post(
        a,
        "/v1/chat/completions",
        None,
        &json!({"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16, "temperature": 0}),
    );
    let took = t1.elapsed();
    assert_eq!(short.status, 200, "{}", short.text());
    assert!(!content(&short.json()).is_empty());
    // Answered between two chunks of the long prompt, not after it.
    let h = get(a, "/health", None).json();
    assert_eq!(h["prefilling"], 1, "{h}");
    assert!(
        took < Duration::from_secs(10),
        "the short request took {took:?}"
    );
    eprintln!("short request answered in {took:?} during a {n}-token prefill");
    // The long one's client leaves: its prefill stops between two chunks.
    drop(long_reply);
    let t2 = Instant::now();
    while get(a, "/health", None).json()["prefilling"] != 0 {
        assert!(
            t2.elapsed() < Duration::from_secs(10),
            "the prefill went on"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn errors_are_openai_shaped_on_every_route_and_unsupported_parameters_named() {
    let _machine = shared_machine();
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path(), &["--no-embedder", "--max-tokens-limit", "9000"]);
    let a = s.addr.as_str();
    let check = |r: http::Reply, status: u16, param: Option<&str>| -> Value {
        assert_eq!(r.status, status, "{}", r.text());
        let v = r.json();
        let e = &v["error"];
        assert!(e["message"].as_str().unwrap().len() > 5, "{v}");
        assert_eq!(e["type"], "invalid_request_error", "{v}");
        assert_eq!(e["param"], param.map_or(Value::Null, |p| json!(p)), "{v}");
        assert!(e.get("code").is_some(), "{v}");
        v
    };
    // A wrong method (405, with Allow), an unknown route (404).
    let r = get(a, "/v1/chat/completions", None);
    assert!(r.headers.iter().any(|(k, v)| k == "allow" && v == "POST"));
    check(r, 405, None);
    check(post(a, "/health", None, &json!({})), 405, None);
    check(get(a, "/v2/anything", None), 404, None);
    check(post(a, "/v1/responses", None, &json!({})), 404, None);

    let msg = json!([{"role": "user", "content": "Hi"}]);
    let chat = |extra: Value| {
        let mut b = json!({"messages": msg, "max_tokens": 2});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        post(a, "/v1/chat/completions", None, &b)
    };
    for (k, v) in [
        ("logit_bias", json!({"42": 10})),
        ("functions", json!([{"name": "f"}])),
        ("response_format", json!({"type": "grammar"})),
        ("presence_penalty", json!(0.5)),
        ("frequency_penalty", json!(1)),
        ("n", json!(2)),
    ] {
        let v = check(chat(json!({k: v})), 400, Some(k));
        assert_eq!(v["error"]["code"], "unsupported_parameter", "{v}");
    }
    // Their neutral values are fine, and so is `user`.
    let r =
        chat(json!({"n": 1, "logprobs": false, "presence_penalty": 0, "tools": [], "user": "u"}));
    assert_eq!(r.status, 200, "{}", r.text());
    for (k, v) in [("best_of", json!(2)), ("suffix", json!("the end"))] {
        let mut b = json!({"prompt": "Hi", "max_tokens": 2});
        b[k] = v;
        check(post(a, "/v1/completions", None, &b), 400, Some(k));
    }
    // Tools: a parameters schema that is not one (named by path), tool_choice without tools or
    // naming an unknown function, tools together with response_format.
    let f = json!([{"type": "function", "function": {"name": "f",
        "parameters": {"type": "object", "properties": {"x": {"type": "strnig"}}}}}]);
    let v = check(chat(json!({"tools": f})), 400, Some("tools"));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/properties/x/type"),
        "{v}"
    );
    check(
        chat(json!({"tool_choice": "required"})),
        400,
        Some("tool_choice"),
    );
    let g = json!([{"type": "function", "function": {"name": "g"}}]);
    check(
        chat(json!({"tools": g, "tool_choice": {"type": "function", "function": {"name": "h"}}})),
        400,
        Some("tool_choice"),
    );
    check(
        chat(json!({"tools": g, "response_format": {"type": "json_object"}})),
        400,
        Some("response_format"),
    );
    // Log-probabilities: bounds, top_logprobs without logprobs, ids outside the vocabulary,
    // max_tokens 0 without echo.
    check(chat(json!({"top_logprobs": 3})), 400, Some("top_logprobs"));
    check(
        chat(json!({"logprobs": true, "top_logprobs": 21})),
        400,
        Some("top_logprobs"),
    );
    for (body, param) in [
        (json!({"prompt": "Hi", "logprobs": 21}), "logprobs"),
        (
            json!({"prompt": [[1, 99999999]], "max_tokens": 1}),
            "prompt",
        ),
        (json!({"prompt": [], "max_tokens": 1}), "prompt"),
        (json!({"prompt": "Hi", "max_tokens": 0}), "max_tokens"),
    ] {
        check(post(a, "/v1/completions", None, &body), 400, Some(param));
    }
    // Unknown parameters, as OpenAI answers them; a wrongly typed one by name.
    let v = check(chat(json!({"temprature": 0})), 400, Some("temprature"));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Unrecognized request argument supplied: temprature")
    );
    check(chat(json!({"top_p": "high"})), 400, Some("top_p"));
    // Prompt + max_completion_tokens over the context names the parameter used.
    let v = check(
        chat(json!({"max_completion_tokens": 8190})),
        400,
        Some("max_completion_tokens"),
    );
    assert_eq!(v["error"]["code"], "context_length_exceeded");
}

/// Prompt log-probabilities (`echo` + `logprobs` on /v1/completions) score multiple-choice
/// items as `lever eval mc` does: the same accuracy on the first reference items, the choice's
/// tokens found by their text offsets as a client finds them; token-id prompts give the same
/// numbers as text. Chat's `logprobs`/`top_logprobs`: greedy tokens are their position's most
/// probable, spell the answer, and stream the same.
#[test]
fn logprobs_score_choices_as_eval_mc_does() {
    let _machine = shared_machine();
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path(), &["--no-embedder"]);
    let a = s.addr.as_str();
    let items_path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../lever-eval/tests/fixtures/mc_items.jsonl");
    let n = 8;
    let items: Vec<Value> = std::fs::read_to_string(&items_path)
        .unwrap()
        .lines()
        .take(n)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let echo = |prompt: Value| -> Value {
        let body = json!({"prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 1});
        let r = post(a, "/v1/completions", None, &body);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    let (mut acc, mut acc_norm) = (0usize, 0usize);
    for item in &items {
        let query = item["query"].as_str().unwrap();
        // lm-eval's `_encode_pair`: a space ending the query belongs to the continuation.
        let qlen = query.trim_end().chars().count();
        let mut lls = Vec::new();
        for choice in item["choices"].as_array().unwrap() {
            let choice = choice.as_str().unwrap();
            let v = echo(json!(format!("{query}{choice}")));
            let c = &v["choices"][0];
            assert_eq!(c["text"], format!("{query}{choice}"));
            assert_eq!(c["finish_reason"], "length");
            let lp = &c["logprobs"];
            let offsets = lp["text_offset"].as_array().unwrap();
            let lps = lp["token_logprobs"].as_array().unwrap();
            assert_eq!(
                lps.len() as u64,
                v["usage"]["prompt_tokens"].as_u64().unwrap()
            );
            assert_eq!(v["usage"]["completion_tokens"], 0);
            assert!(lps[0].is_null());
            let ll: f64 = offsets
                .iter()
                .zip(lps)
                .filter(|(o, _)| o.as_u64().unwrap() as usize >= qlen)
                .map(|(_, l)| l.as_f64().unwrap())
                .sum();
            assert!(ll < 0.0, "{ll}");
            lls.push((ll, choice.chars().count() as f64));
        }
        let argmax = |f: &dyn Fn(&(f64, f64)) -> f64| {
            (0..lls.len()).fold(0, |b, i| if f(&lls[i]) > f(&lls[b]) { i } else { b })
        };
        let gold = item["gold"].as_u64().unwrap() as usize;
        acc += usize::from(argmax(&|x| x.0) == gold);
        acc_norm += usize::from(argmax(&|x| x.0 / x.1) == gold);
    }
    let mc = lever(
        d.path(),
        &[
            "eval",
            "mc",
            items_path.to_str().unwrap(),
            "--limit",
            &n.to_string(),
            "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(acc as f64 / n as f64, mc["acc"].as_f64().unwrap());
    assert_eq!(acc_norm as f64 / n as f64, mc["acc_norm"].as_f64().unwrap());

    // Token ids in, the same log-probabilities out.
    let text = format!(
        "{}{}",
        items[0]["query"].as_str().unwrap(),
        items[0]["choices"][1].as_str().unwrap()
    );
    let ids = common::ids(&lever(d.path(), &["tokenize", &text, "--json"]).ok().json()["ids"]);
    let by_text = echo(json!(text));
    let by_ids = echo(json!([ids]));
    assert_eq!(
        by_ids["choices"][0]["logprobs"],
        by_text["choices"][0]["logprobs"]
    );
    assert_eq!(by_ids["choices"][0]["text"], json!(text));

    // Chat: greedy on the raw logits, so each token is its position's most probable.
    let body = json!({"messages": [{"role": "user", "content": "Name a fruit."}],
        "max_tokens": 8, "temperature": 0, "repetition_penalty": 1,
        "logprobs": true, "top_logprobs": 3});
    let v = post(a, "/v1/chat/completions", None, &body).json();
    let content_lp = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        content_lp.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let mut spelled = String::new();
    for t in &content_lp {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[0]["token"], t["token"], "{t}");
        assert_eq!(top[0]["logprob"], t["logprob"]);
        assert!(top[1]["logprob"].as_f64() <= top[0]["logprob"].as_f64());
        let bytes: Vec<u8> = t["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        spelled.push_str(&String::from_utf8(bytes).unwrap());
    }
    assert_eq!(spelled, content(&v));
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let ev = post(a, "/v1/chat/completions", None, &sb).events();
    let streamed: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(streamed, content_lp);
}
