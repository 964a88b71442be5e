//! A client for OpenAI-compatible servers (vLLM, llama.cpp's server, Ollama, another lever),
//! so that lever's commands can generate on a remote engine: streaming chat and text
//! completions over HTTP/1.1, server-sent events parsed as they arrive. Plain `http://` only
//! (no TLS): backends on a team's own network, or behind a local TLS-terminating proxy.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub struct Backend {
    host: String,
    port: u16,
    /// Path prefix up to and including `/v1`.
    prefix: String,
    key: Option<String>,
    /// What to put in "model" (the server's default when None).
    pub model: Option<String>,
}

/// A finished remote generation.
#[derive(Debug, Clone)]
pub struct Remote {
    pub text: String,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Params {
    pub max_tokens: usize,
    /// None: the server's default.
    pub temperature: Option<f32>,
    /// None: the server's default.
    pub top_p: Option<f32>,
    /// Sent as `top_k`, `min_p` and `repetition_penalty`, the names vLLM, llama.cpp's server
    /// and lever serve accept beyond OpenAI's; None: not sent.
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

impl Backend {
    /// `http://HOST[:PORT][/PATH]`; `/v1` is added when the path does not end in it.
    pub fn parse(url: &str, key: Option<String>, model: Option<String>) -> Result<Backend, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            if url.starts_with("https://") {
                format!(
                    "{url}: https backends are not supported (use http://, or a local TLS proxy)"
                )
            } else {
                format!("{url}: expected http://HOST[:PORT][/v1]")
            }
        })?;
        let (hostport, path) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse::<u16>()
                    .map_err(|_| format!("{url}: bad port {p:?}"))?,
            ),
            None => (hostport.to_string(), 80),
        };
        if host.is_empty() {
            return Err(format!("{url}: no host"));
        }
        let path = path.trim_end_matches('/');
        let prefix = if path.ends_with("v1") {
            format!("/{path}")
        } else if path.is_empty() {
            "/v1".to_string()
        } else {
            format!("/{path}/v1")
        };
        Ok(Backend {
            host,
            port,
            prefix,
            key: key.filter(|k| !k.is_empty()),
            model,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}:{}{}", self.host, self.port, self.prefix)
    }

    /// Streaming chat completion; `on_text` gets each piece (return false to stop reading).
    pub fn chat(
        &self,
        messages: &[(String, String)],
        p: &Params,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Remote, String> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|(r, c)| json!({"role": r, "content": c}))
            .collect();
        let mut body = self.body(p);
        body["messages"] = json!(msgs);
        self.stream("/chat/completions", body, on_text, |c| {
            c["delta"]["content"].as_str().map(str::to_string)
        })
    }

    /// Streaming text completion (no chat template).
    pub fn complete(
        &self,
        prompt: &str,
        p: &Params,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Remote, String> {
        let mut body = self.body(p);
        body["prompt"] = json!(prompt);
        self.stream("/completions", body, on_text, |c| {
            c["text"].as_str().map(str::to_string)
        })
    }

    fn body(&self, p: &Params) -> Value {
        let mut b = json!({
            "max_tokens": p.max_tokens,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let optional = [
            ("temperature", p.temperature.map(|v| json!(v))),
            ("top_p", p.top_p.map(|v| json!(v))),
            ("top_k", p.top_k.map(|v| json!(v))),
            ("min_p", p.min_p.map(|v| json!(v))),
            ("repetition_penalty", p.repeat_penalty.map(|v| json!(v))),
        ];
        for (key, value) in optional {
            if let Some(v) = value {
                b[key] = v;
            }
        }
        if let Some(m) = &self.model {
            b["model"] = json!(m);
        }
        if let Some(s) = p.seed {
            b["seed"] = json!(s);
        }
        if !p.stop.is_empty() {
            b["stop"] = json!(p.stop);
        }
        b
    }

    fn stream(
        &self,
        route: &str,
        body: Value,
        on_text: &mut dyn FnMut(&str) -> bool,
        piece: impl Fn(&Value) -> Option<String>,
    ) -> Result<Remote, String> {
        let url = format!("{}{route}", self.url());
        let net = |e: std::io::Error| format!("{url}: {e}");
        let mut s = TcpStream::connect((self.host.as_str(), self.port)).map_err(net)?;
        s.set_read_timeout(Some(Duration::from_secs(600)))
            .map_err(net)?;
        let payload = body.to_string();
        let mut head = format!(
            "POST {}{route} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.prefix,
            self.host,
            self.port,
            payload.len()
        );
        if let Some(k) = &self.key {
            head.push_str(&format!("Authorization: Bearer {k}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).map_err(net)?;
        s.write_all(payload.as_bytes()).map_err(net)?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).map_err(net)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("{url}: not an HTTP response ({:?})", line.trim()))?;
        let mut chunked = false;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).map_err(net)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
            {
                chunked = true;
            }
        }
        let mut body = Body {
            r,
            chunked,
            left: 0,
            done: false,
        };
        if status != 200 {
            let mut text = String::new();
            body.read_to_string(&mut text).ok();
            let msg = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| text.trim().chars().take(300).collect());
            return Err(format!("{url}: HTTP {status}: {msg}"));
        }
        let mut out = Remote {
            text: String::new(),
            prompt_tokens: None,
            completion_tokens: None,
            finish_reason: None,
        };
        let mut reader = BufReader::new(body);
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).map_err(net)? == 0 {
                break;
            }
            let Some(data) = line.trim_end().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                break;
            }
            let v: Value = serde_json::from_str(data)
                .map_err(|e| format!("{url}: a stream event is not JSON ({e}): {data}"))?;
            if let Some(m) = v["error"]["message"].as_str() {
                return Err(format!("{url}: {m}"));
            }
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                out.prompt_tokens = u["prompt_tokens"].as_u64();
                out.completion_tokens = u["completion_tokens"].as_u64();
            }
            if let Some(c) = v["choices"].get(0) {
                if let Some(t) = piece(c).filter(|t| !t.is_empty()) {
                    out.text.push_str(&t);
                    if !on_text(&t) {
                        out.finish_reason = Some("cancelled".into());
                        return Ok(out);
                    }
                }
                if let Some(f) = c["finish_reason"].as_str() {
                    out.finish_reason = Some(f.to_string());
                }
            }
        }
        Ok(out)
    }
}

/// An HTTP body, chunked or read to the end.
struct Body {
    r: BufReader<TcpStream>,
    chunked: bool,
    left: usize,
    done: bool,
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.chunked {
            return self.r.read(buf);
        }
        if self.done {
            return Ok(0);
        }
        if self.left == 0 {
            let mut size = String::new();
            if self.r.read_line(&mut size)? == 0 {
                self.done = true;
                return Ok(0);
            }
            if size.trim().is_empty() {
                // The CRLF after the previous chunk.
                size.clear();
                if self.r.read_line(&mut size)? == 0 {
                    self.done = true;
                    return Ok(0);
                }
            }
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {size:?}")))?;
            if n == 0 {
                self.done = true;
                return Ok(0);
            }
            self.left = n;
        }
        let want = buf.len().min(self.left);
        let got = self.r.read(&mut buf[..want])?;
        self.left -= got;
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls() {
        let b = Backend::parse("http://127.0.0.1:8080", None, None).unwrap();
        assert_eq!(b.url(), "http://127.0.0.1:8080/v1");
        assert_eq!(
            Backend::parse("http://h:1/v1/", None, None).unwrap().url(),
            "http://h:1/v1"
        );
        assert_eq!(
            Backend::parse("http://h/api", None, None).unwrap().url(),
            "http://h:80/api/v1"
        );
        assert!(
            Backend::parse("https://h", None, None)
                .unwrap_err()
                .contains("https")
        );
        assert!(Backend::parse("h:80", None, None).is_err());
        assert!(Backend::parse("http://h:x", None, None).is_err());
    }
}
