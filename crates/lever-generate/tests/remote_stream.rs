//! The remote generator against a scripted server on a real socket: each test serves one
//! canned HTTP answer (an event stream cut in odd places, an error event, a stream that breaks
//! off, an error status) and checks what `Remote` makes of it, and what it sent.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

use lever_generate::{
    Finish, FinishReason, Flow, Generator, Prompt, Remote, Request, Sampling, Source,
};
use lever_model::Message;
use serde_json::{Value, json};

/// What the scripted server received.
struct Received {
    head: String,
    body: Value,
}

/// Serve one connection on `listener`: read the request, write `parts` (pausing between
/// them so that they reach the client as separate reads), then close.
fn serve_once(listener: TcpListener, parts: Vec<Vec<u8>>) -> JoinHandle<Received> {
    std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut head = String::new();
        let mut len = 0;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        let mut s: TcpStream = s;
        for p in parts {
            // The client may have hung up (a cancelled stream): not this side's failure.
            if s.write_all(&p).and_then(|()| s.flush()).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Received {
            head,
            body: serde_json::from_slice(&body).unwrap(),
        }
    })
}

fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    (l, url)
}

/// A chunked `text/event-stream` answer with `body` cut into chunks at `cuts`.
fn event_stream(body: &str, cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut parts = vec![
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec(),
    ];
    let mut at = 0;
    for &c in cuts.iter().chain([&body.len()]) {
        let piece = &body.as_bytes()[at..c];
        at = c;
        let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
        chunk.extend_from_slice(piece);
        chunk.extend_from_slice(b"\r\n");
        parts.push(chunk);
    }
    parts.push(b"0\r\n\r\n".to_vec());
    parts
}

/// A chat completion chunk.
fn delta(text: &str) -> String {
    format!(
        "data: {}\n\n",
        json!({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]})
    )
}

/// A text completion chunk.
fn chunk(text: &str) -> String {
    format!(
        "data: {}\n\n",
        json!({"choices": [{"index": 0, "text": text, "finish_reason": null}]})
    )
}

fn request<'a>(prompt: Prompt<'a>) -> Request<'a> {
    Request {
        constraint: None,
        prompt,
        max_tokens: 16,
        stop: &[],
        sampling: Sampling {
            temperature: Some(0.0),
            ..Sampling::default()
        },
    }
}

fn collect(
    g: &mut Remote,
    req: &Request<'_>,
) -> (lever_generate::Result<lever_generate::Output>, String) {
    let mut seen = String::new();
    let out = g.generate(req, &mut |t| {
        seen.push_str(t);
        Flow::Continue
    });
    (out, seen)
}

#[test]
fn a_chat_stream_cut_anywhere_gives_the_text_the_finish_and_the_usage() {
    let body = format!(
        "{}: keep-alive\n\n{}{}data: {}\n\ndata: {}\n\ndata: [DONE]\n\n",
        delta("Hel"),
        delta("lo, "),
        delta("wörld"),
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}),
        json!({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}}),
    );
    // Cuts inside a `data:` line, inside "ö", between the two newlines of an event.
    let o = body.find('ö').unwrap();
    let mut cuts = [3, 20, o + 1, body.find("\n\n").unwrap() + 1, body.len() - 4];
    cuts.sort_unstable();
    let (l, url) = listener();
    let server = serve_once(l, event_stream(&body, &cuts));
    let mut g = Remote::parse(&url, Some("k3y".into()), Some("tiny".into())).unwrap();
    assert_eq!(g.source(), Source::Server(format!("{url}/v1")));
    let msgs = [
        Message::new("system", "Be brief."),
        Message::new("user", "Hi"),
    ];
    let (out, seen) = collect(&mut g, &request(Prompt::Chat(&msgs)));
    let out = out.unwrap();
    assert_eq!(out.text, "Hello, wörld");
    assert_eq!(seen, out.text);
    assert_eq!(out.finish_reason, Finish::Server(Some("length".into())));
    assert_eq!(
        (out.prompt_tokens, out.completion_tokens),
        (Some(9), Some(3))
    );
    assert!(out.timings.is_none() && out.sampling.is_none());
    let got = server.join().unwrap();
    assert!(
        got.head
            .starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
        "{}",
        got.head
    );
    assert!(
        got.head.contains("authorization: Bearer k3y\r\n")
            || got.head.contains("Authorization: Bearer k3y\r\n"),
        "{}",
        got.head
    );
    assert_eq!(
        got.body,
        json!({"model": "tiny", "max_tokens": 16, "temperature": 0.0, "stream": true,
               "stream_options": {"include_usage": true},
               "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]})
    );
}

#[test]
fn a_text_completion_reads_the_text_field() {
    let body = format!(
        "data: {}\n\ndata: {}\n\ndata: [DONE]\n\n",
        json!({"choices": [{"index": 0, "text": " upon", "finish_reason": null}]}),
        json!({"choices": [{"index": 0, "text": " a time", "finish_reason": "stop"}]}),
    );
    let (l, url) = listener();
    let server = serve_once(l, event_stream(&body, &[]));
    let mut g = Remote::parse(&url, None, None).unwrap();
    let (out, _) = collect(&mut g, &request(Prompt::Text("Once")));
    let out = out.unwrap();
    assert_eq!(out.text, " upon a time");
    assert_eq!(out.finish_reason, Finish::Server(Some("stop".into())));
    assert_eq!(out.prompt_tokens, None, "no usage was sent");
    let got = server.join().unwrap();
    assert!(
        got.head.starts_with("POST /v1/completions "),
        "{}",
        got.head
    );
    assert_eq!(got.body["prompt"], "Once");
    assert!(!got.head.to_ascii_lowercase().contains("authorization"));
}

#[test]
fn an_error_event_mid_stream_is_an_error_naming_the_endpoint() {
    for event in [
        // OpenAI's shape, as vLLM and lever serve send it.
        format!(
            "data: {}\n\n",
            json!({"error": {"message": "the model fell over", "type": "server_error"}})
        ),
        // llama.cpp's server.
        format!(
            "error: {}\n\n",
            json!({"code": 500, "message": "the model fell over"})
        ),
    ] {
        let (l, url) = listener();
        let server = serve_once(l, event_stream(&format!("{}{event}", chunk("Hi")), &[]));
        let mut g = Remote::parse(&url, None, None).unwrap();
        let (out, seen) = collect(&mut g, &request(Prompt::Text("x")));
        let e = out.unwrap_err().to_string();
        assert_eq!(e, format!("{url}/v1/completions: the model fell over"));
        assert_eq!(seen, "Hi");
        server.join().unwrap();
    }
}

#[test]
fn a_server_that_closes_mid_stream_is_an_error_not_a_short_answer() {
    // Closed between events, with no finish and no [DONE].
    let (l, url) = listener();
    let mut parts = event_stream(&format!("{}{}", chunk("Hel"), chunk("lo")), &[]);
    parts.pop(); // no last chunk: the connection just ends
    let server = serve_once(l, parts);
    let mut g = Remote::parse(&url, None, None).unwrap();
    let (out, _) = collect(&mut g, &request(Prompt::Text("x")));
    let e = out.unwrap_err().to_string();
    assert!(e.starts_with(&format!("{url}/v1/completions: ")), "{e}");
    server.join().unwrap();

    // A body that is not chunked, cut inside an event.
    let (l, url) = listener();
    let raw = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n{}data: {{\"choi",
        chunk("Hel")
    );
    let server = serve_once(l, vec![raw.into_bytes()]);
    let mut g = Remote::parse(&url, None, None).unwrap();
    let (out, seen) = collect(&mut g, &request(Prompt::Text("x")));
    let e = out.unwrap_err().to_string();
    assert!(e.contains("cut off"), "{e}");
    assert_eq!(seen, "Hel");
    server.join().unwrap();

    // Complete events but no finish and no [DONE]: the answer may be cut.
    let (l, url) = listener();
    let raw = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n{}",
        chunk("Hel")
    );
    let server = serve_once(l, vec![raw.into_bytes()]);
    let mut g = Remote::parse(&url, None, None).unwrap();
    let (out, _) = collect(&mut g, &request(Prompt::Text("x")));
    let e = out.unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{url}/v1/completions: the server closed the stream before the answer was finished (3 characters received)"
        )
    );
    server.join().unwrap();
}

#[test]
fn an_error_status_gives_the_servers_message() {
    let (l, url) = listener();
    let body = json!({"error": {"message": "Invalid API key", "type": "invalid_request_error"}})
        .to_string();
    let raw = format!(
        "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let server = serve_once(l, vec![raw.into_bytes()]);
    let mut g = Remote::parse(&url, None, None).unwrap();
    let msgs = [Message::new("user", "Hi")];
    let (out, _) = collect(&mut g, &request(Prompt::Chat(&msgs)));
    assert_eq!(
        out.unwrap_err().to_string(),
        format!("{url}/v1/chat/completions: HTTP 401: Invalid API key")
    );
    server.join().unwrap();
}

#[test]
fn stopping_the_callback_cancels() {
    let (l, url) = listener();
    let body = format!(
        "{}{}{}data: [DONE]\n\n",
        chunk("one "),
        chunk("two "),
        chunk("three")
    );
    let server = serve_once(l, event_stream(&body, &[]));
    let mut g = Remote::parse(&url, None, None).unwrap();
    let mut n = 0;
    let out = g
        .generate(&request(Prompt::Text("x")), &mut |_| {
            n += 1;
            if n == 2 { Flow::Stop } else { Flow::Continue }
        })
        .unwrap();
    assert_eq!(out.text, "one two ");
    assert!(out.finish_reason.cancelled());
    assert_eq!(out.finish_reason, Finish::Local(FinishReason::Cancelled));
    server.join().unwrap();
}

#[test]
fn an_ipv6_host_is_reached() {
    let Ok(l) = TcpListener::bind("[::1]:0") else {
        // No IPv6 loopback on this machine: the URL form is still checked in the unit tests.
        eprintln!("SKIPPED: no IPv6 loopback here");
        return;
    };
    let url = format!("http://[::1]:{}", l.local_addr().unwrap().port());
    let body = format!("{}data: [DONE]\n\n", chunk("six"));
    let server = serve_once(l, event_stream(&body, &[]));
    let mut g = Remote::parse(&url, None, None).unwrap();
    let (out, _) = collect(&mut g, &request(Prompt::Text("x")));
    assert_eq!(out.unwrap().text, "six");
    server.join().unwrap();
}

#[test]
fn unreachable_servers_are_named() {
    // Port 9 (discard) is closed here; https to it fails at the connection.
    for url in ["http://127.0.0.1:9", "https://127.0.0.1:9"] {
        let mut g = Remote::parse(url, None, None).unwrap();
        let (out, _) = collect(&mut g, &request(Prompt::Text("x")));
        let e = out.unwrap_err().to_string();
        assert!(e.starts_with(&format!("{url}/v1/completions: ")), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }
    // https to a server that speaks plain HTTP: the TLS handshake fails, by name.
    let (l, url) = listener();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
    });
    let url = url.replace("http://", "https://");
    let mut g = Remote::parse(&url, None, None).unwrap();
    let (out, _) = collect(&mut g, &request(Prompt::Text("x")));
    let e = out.unwrap_err().to_string();
    assert!(e.starts_with(&format!("{url}/v1/completions: ")), "{e}");
    assert!(!e.contains('\n'), "{e}");
    server.join().unwrap();
}
