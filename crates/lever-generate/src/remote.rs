//! An OpenAI-compatible server (vLLM, llama.cpp's server, Ollama, another lever) as a
//! [`Generator`]: streaming chat and text completions over HTTP/1.1 or HTTPS, read as
//! server-sent events ([`crate::sse`]) while they arrive.
//!
//! HTTP, TLS (rustls, with the Mozilla roots of `webpki-roots`), IPv6 hosts, proxies
//! (`HTTPS_PROXY`, `NO_PROXY`, ...) and timeouts are the `ureq` crate's. Only what the caller
//! set is sent, and the server fills in the rest with its own defaults — unless the request
//! says unset means off ([`Unset::Off`]): then the off values are sent.

use std::io::BufReader;
use std::time::Duration;

use lever_model::{GenerationConfig, Message};
use serde_json::{Value, json};

use crate::generator::{Finish, Generator, Output, Prompt, Request, Sampling, Source, Unset};
use crate::sse::{Event, EventReader};
use crate::{Constraint, Error, FinishReason, Flow, Result};

/// Time to open a connection (and finish the TLS handshake).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest wait for the next bytes of an answer: a long prompt's prefill on a busy
/// server, or a queue, comes before the first.
const READ_TIMEOUT: Duration = Duration::from_secs(600);
/// How much of an error response is read for its message.
const ERROR_BODY_LIMIT: u64 = 64 * 1024;

#[derive(Debug, Clone)]
pub struct Remote {
    agent: ureq::Agent,
    /// `SCHEME://HOST:PORT/PREFIX`, the prefix ending in `/v1`.
    base: String,
    key: Option<String>,
    /// What to put in "model" (the server's default when None).
    pub model: Option<String>,
}

impl Remote {
    /// `http[s]://HOST[:PORT][/PATH]`; `/v1` is added when the path does not end in it. An
    /// IPv6 host is written in brackets: `http://[::1]:8080`.
    pub fn parse(url: &str, key: Option<String>, model: Option<String>) -> Result<Remote> {
        let bad = |why: String| Error::Remote {
            url: url.to_string(),
            message: why,
        };
        let expected = "expected http://HOST[:PORT][/v1] or https://…";
        let Some((scheme, _)) = url.split_once("://") else {
            return Err(bad(expected.into()));
        };
        let default_port = match scheme {
            "http" => 80,
            "https" => 443,
            _ => return Err(bad(expected.into())),
        };
        let uri: ureq::http::Uri = url.parse().map_err(|e| bad(format!("not a URL ({e})")))?;
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
        let host = uri.host().unwrap_or_default();
        if host.is_empty() || authority.contains('@') {
            return Err(bad(format!("no host ({expected})")));
        }
        if uri.query().is_some() {
            return Err(bad("a query string has no place in a backend URL".into()));
        }
        let port = match authority.strip_prefix(host).unwrap_or_default() {
            "" => default_port,
            p => p
                .strip_prefix(':')
                .and_then(|p| p.parse::<u16>().ok())
                .ok_or_else(|| bad(format!("bad port {:?}", p.trim_start_matches(':'))))?,
        };
        let path = uri.path().trim_matches('/');
        let prefix = if path.ends_with("v1") {
            format!("/{path}")
        } else if path.is_empty() {
            "/v1".to_string()
        } else {
            format!("/{path}/v1")
        };
        let agent = ureq::Agent::config_builder()
            // Error answers are read for their message.
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_per_read(Some(READ_TIMEOUT))
            .user_agent(concat!("lever/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(Remote {
            agent,
            base: format!("{scheme}://{host}:{port}{prefix}"),
            key: key.filter(|k| !k.is_empty()),
            model,
        })
    }

    /// The base URL, up to and including `/v1`.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn body(&self, req: &Request<'_>) -> Value {
        let s = match req.sampling.unset {
            Unset::ModelDefaults => req.sampling.clone(),
            // "Off" must mean off on the server too: lever serve fills an unset setting from
            // the model's published ones (as vLLM does with `--generation-config auto`), so
            // every setting is sent, the unset ones with their off values.
            Unset::Off => {
                let p = req.sampling.resolve(&GenerationConfig::default());
                Sampling {
                    temperature: Some(p.temperature),
                    top_k: Some(p.top_k),
                    top_p: Some(p.top_p),
                    min_p: Some(p.min_p),
                    repeat_penalty: Some(p.repeat_penalty),
                    repeat_last_n: None,
                    seed: Some(p.seed),
                    unset: Unset::Off,
                }
            }
        };
        let mut b = json!({
            "max_tokens": req.max_tokens,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        // Beyond OpenAI's: `top_k`, `min_p` and `repetition_penalty`, the names vLLM,
        // llama.cpp's server and lever serve accept.
        let optional = [
            ("temperature", s.temperature.map(|v| json!(v))),
            ("top_p", s.top_p.map(|v| json!(v))),
            ("top_k", s.top_k.map(|v| json!(v))),
            ("min_p", s.min_p.map(|v| json!(v))),
            ("repetition_penalty", s.repeat_penalty.map(|v| json!(v))),
            ("model", self.model.as_ref().map(|m| json!(m))),
            ("seed", s.seed.map(|v| json!(v))),
            ("stop", (!req.stop.is_empty()).then(|| json!(req.stop))),
        ];
        for (key, value) in optional {
            if let Some(v) = value {
                b[key] = v;
            }
        }
        match req.prompt {
            Prompt::Chat(messages) => b["messages"] = json!(messages_json(messages)),
            Prompt::Text(text) => b["prompt"] = json!(text),
        }
        // OpenAI's `response_format` for JSON; vLLM's `guided_*` fields (which lever serve
        // and SGLang read too) for the rest.
        match req.constraint {
            None => {}
            Some(Constraint::JsonSchema(schema)) => {
                b["response_format"] = json!({"type": "json_schema",
                    "json_schema": {"name": "answer", "schema": schema, "strict": true}});
            }
            Some(Constraint::JsonObject) => b["response_format"] = json!({"type": "json_object"}),
            Some(Constraint::Regex(rx)) => b["guided_regex"] = json!(rx),
            Some(Constraint::Lark(g)) => b["guided_grammar"] = json!(g),
            Some(Constraint::Choice(c)) => b["guided_choice"] = json!(c),
        }
        b
    }

    /// POST `body` to `route` and read the event stream; `on_text` gets each piece.
    fn stream(
        &self,
        route: &str,
        body: &Value,
        piece: fn(&Value) -> Option<&str>,
        on_text: &mut dyn FnMut(&str) -> Flow,
    ) -> Result<Output> {
        let url = format!("{}{route}", self.base);
        let fail = |message: String| Error::Remote {
            url: url.clone(),
            message,
        };
        let mut post = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json")
            .header("Accept", "text/event-stream");
        if let Some(k) = &self.key {
            post = post.header("Authorization", format!("Bearer {k}"));
        }
        let response = post
            .send(body.to_string())
            .map_err(|e| fail(e.to_string()))?;
        let status = response.status();
        let mut body = response.into_body();
        if status != 200 {
            let text = body
                .with_config()
                .limit(ERROR_BODY_LIMIT)
                .read_to_string()
                .unwrap_or_default();
            return Err(fail(format!(
                "HTTP {}: {}",
                status.as_u16(),
                error_message(&text)
            )));
        }
        let mut events = EventReader::new(BufReader::new(body.into_reader()));
        let mut out = Output {
            valid: None,
            text: String::new(),
            finish_reason: Finish::Server(None),
            prompt_tokens: None,
            completion_tokens: None,
            timings: None,
            sampling: None,
        };
        let mut finished = false;
        loop {
            let data = match events.next_event().map_err(|e| fail(e.to_string()))? {
                None => break,
                Some(Event::Error(e)) => return Err(fail(error_message(&e))),
                Some(Event::Data(d)) => d,
            };
            let data = data.trim();
            if data == "[DONE]" {
                finished = true;
                break;
            }
            let v: Value = serde_json::from_str(data)
                .map_err(|e| fail(format!("a stream event is not JSON ({e}): {data}")))?;
            if let Some(m) = v["error"]["message"].as_str() {
                return Err(fail(m.to_string()));
            }
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                let count = |k: &str| u[k].as_u64().map(|n| n as usize);
                out.prompt_tokens = count("prompt_tokens");
                out.completion_tokens = count("completion_tokens");
            }
            let Some(c) = v["choices"].get(0) else {
                continue;
            };
            if let Some(t) = piece(c).filter(|t| !t.is_empty()) {
                out.text.push_str(t);
                if on_text(t) == Flow::Stop {
                    // Dropping the response closes the connection: the server stops.
                    out.finish_reason = Finish::Local(FinishReason::Cancelled);
                    return Ok(out);
                }
            }
            if let Some(f) = c["finish_reason"].as_str() {
                out.finish_reason = Finish::Server(Some(f.to_string()));
                finished = true;
            }
        }
        if !finished {
            return Err(fail(format!(
                "the server closed the stream before the answer was finished ({} characters received)",
                out.text.chars().count()
            )));
        }
        Ok(out)
    }
}

fn messages_json(messages: &[Message]) -> Vec<Value> {
    messages
        .iter()
        .map(|m| json!({"role": m.role, "content": m.content}))
        .collect()
}

/// The message of an OpenAI error body (`{"error": {"message"}}`, or llama.cpp's bare
/// `{"message"}`), else the start of the text.
fn error_message(text: &str) -> String {
    let v = serde_json::from_str::<Value>(text).unwrap_or_default();
    v["error"]["message"]
        .as_str()
        .or_else(|| v["message"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| text.trim().chars().take(300).collect())
}

impl Generator for Remote {
    fn source(&self) -> Source {
        Source::Server(self.base.clone())
    }

    fn can_chat(&self) -> bool {
        true
    }

    fn generate(
        &mut self,
        req: &Request<'_>,
        on_text: &mut dyn FnMut(&str) -> Flow,
    ) -> Result<Output> {
        let body = self.body(req);
        match req.prompt {
            Prompt::Chat(_) => self.stream(
                "/chat/completions",
                &body,
                |c| c["delta"]["content"].as_str(),
                on_text,
            ),
            Prompt::Text(_) => self.stream("/completions", &body, |c| c["text"].as_str(), on_text),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn url(u: &str) -> String {
        Remote::parse(u, None, None).unwrap().url().to_string()
    }

    fn refused(u: &str) -> String {
        match Remote::parse(u, None, None) {
            Ok(r) => panic!("{u} was taken as {}", r.url()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn urls() {
        assert_eq!(url("http://127.0.0.1:8080"), "http://127.0.0.1:8080/v1");
        assert_eq!(url("http://h:1/v1/"), "http://h:1/v1");
        assert_eq!(url("http://h/api"), "http://h:80/api/v1");
        assert_eq!(url("https://h"), "https://h:443/v1");
        assert_eq!(url("https://h:8443/x/v1"), "https://h:8443/x/v1");
        assert_eq!(url("http://[::1]:8080"), "http://[::1]:8080/v1");
        assert_eq!(url("http://[::1]"), "http://[::1]:80/v1");
        for bad in [
            "h:80",
            "ftp://h",
            "http://h:x",
            "http://",
            "http://u@h",
            "http://h/?a=1",
        ] {
            let e = refused(bad);
            assert!(e.starts_with(&format!("{bad}: ")), "{bad}: {e}");
        }
    }

    fn request<'a>(prompt: Prompt<'a>, stop: &'a [String]) -> Request<'a> {
        Request {
            constraint: None,
            prompt,
            max_tokens: 7,
            stop,
            sampling: Sampling::default(),
        }
    }

    #[test]
    fn only_the_settings_given_are_sent() {
        let r = Remote::parse("http://h", None, Some("m".into())).unwrap();
        let msgs = [Message::new("user", "hi")];
        let b = r.body(&request(Prompt::Chat(&msgs), &[]));
        assert_eq!(
            b,
            json!({"max_tokens": 7, "stream": true, "stream_options": {"include_usage": true},
                   "model": "m", "messages": [{"role": "user", "content": "hi"}]})
        );
        let stop = ["\n".to_string()];
        let mut req = request(Prompt::Text("go"), &stop);
        req.sampling.top_k = Some(3);
        req.sampling.repeat_penalty = Some(1.5);
        req.sampling.repeat_last_n = Some(9);
        req.sampling.seed = Some(4);
        let r = Remote::parse("http://h", None, None).unwrap();
        assert_eq!(
            r.body(&req),
            json!({"max_tokens": 7, "stream": true, "stream_options": {"include_usage": true},
                   "top_k": 3, "repetition_penalty": 1.5, "seed": 4, "stop": ["\n"], "prompt": "go"})
        );
        // Unset meaning off: the off values are sent, so that a server does not fill them in
        // from the model (regression: eval through lever serve got the model's repeat penalty).
        req.sampling = Sampling {
            temperature: Some(0.5),
            unset: Unset::Off,
            ..Sampling::default()
        };
        assert_eq!(
            r.body(&req),
            json!({"max_tokens": 7, "stream": true, "stream_options": {"include_usage": true},
                   "temperature": 0.5, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                   "repetition_penalty": 1.0, "seed": 0, "stop": ["\n"], "prompt": "go"})
        );
    }
}
