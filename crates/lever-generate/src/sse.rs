//! Reading a server-sent event stream (the `text/event-stream` body of a streaming OpenAI
//! response) as it arrives, following the WHATWG HTML standard's "Interpreting an event
//! stream" (§9.2.6): lines end in CRLF, LF or CR; `data:` lines accumulate and a blank line
//! dispatches them, joined by newlines; a line starting with `:` is a comment; one space after
//! the colon is dropped; `id`, `retry`, `event` and unknown fields are ignored.
//!
//! One field beyond the standard: llama.cpp's server reports an error mid-stream as an
//! `error: {json}` line (`server_sent_event` in `tools/server/utils.hpp`), which a reader
//! following the standard would drop; it is returned as [`Event::Error`].

use std::io::{self, BufRead, Read};

/// The longest line read: a server that never ends a line must not fill the memory.
const MAX_LINE: u64 = 16 << 20;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The joined `data:` lines of an event.
    Data(String),
    /// The value of an `error:` line.
    Error(String),
}

pub struct EventReader<R> {
    r: R,
    line: Vec<u8>,
    /// Lines read but not yet looked at (a chunk may hold several CR-separated lines).
    lines: std::collections::VecDeque<String>,
    data: Option<String>,
    first: bool,
}

impl<R: BufRead> EventReader<R> {
    pub fn new(r: R) -> Self {
        Self {
            r,
            line: Vec::new(),
            lines: Default::default(),
            data: None,
            first: true,
        }
    }

    /// The next event; `None` when the stream ended. A stream cut off inside a line is an
    /// `UnexpectedEof` error; data not followed by its blank line when the stream ends is
    /// dispatched (a truncated JSON payload then fails to parse where it is used).
    pub fn next_event(&mut self) -> io::Result<Option<Event>> {
        loop {
            let Some(line) = self.next_line()? else {
                return Ok(self.data.take().map(Event::Data));
            };
            if line.is_empty() {
                if let Some(d) = self.data.take() {
                    return Ok(Some(Event::Data(d)));
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line.as_str(), ""),
            };
            match field {
                "data" => match &mut self.data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => self.data = Some(value.to_string()),
                },
                "error" => return Ok(Some(Event::Error(value.to_string()))),
                _ => {}
            }
        }
    }

    fn next_line(&mut self) -> io::Result<Option<String>> {
        if let Some(l) = self.lines.pop_front() {
            return Ok(Some(l));
        }
        self.line.clear();
        if (&mut self.r)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut self.line)?
            == 0
        {
            return Ok(None);
        }
        if self.line.len() as u64 > MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("an event stream line is longer than {MAX_LINE} bytes"),
            ));
        }
        let mut bytes = self.line.as_slice();
        if self.first {
            // A byte order mark may open the stream.
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
            self.first = false;
        }
        bytes = match bytes {
            [rest @ .., b'\r', b'\n'] | [rest @ .., b'\n'] | [rest @ .., b'\r'] => rest,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the event stream was cut off inside a line",
                ));
            }
        };
        let text = std::str::from_utf8(bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        // Lone CRs end lines too.
        self.lines.extend(text.split('\r').map(str::to_string));
        Ok(self.lines.pop_front())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A reader that hands out `chunks` one per read, as a network socket would.
    struct Chunks(Vec<Vec<u8>>);

    impl io::Read for Chunks {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return Ok(0);
            }
            let c = &mut self.0[0];
            let n = c.len().min(buf.len());
            buf[..n].copy_from_slice(&c[..n]);
            c.drain(..n);
            if c.is_empty() {
                self.0.remove(0);
            }
            Ok(n)
        }
    }

    fn events(chunks: &[&str]) -> io::Result<Vec<Event>> {
        let r = io::BufReader::with_capacity(
            7,
            Chunks(chunks.iter().map(|c| c.as_bytes().to_vec()).collect()),
        );
        let mut reader = EventReader::new(r);
        let mut out = Vec::new();
        while let Some(e) = reader.next_event()? {
            out.push(e);
        }
        Ok(out)
    }

    fn data(s: &str) -> Event {
        Event::Data(s.to_string())
    }

    #[test]
    fn events_split_anywhere_across_reads_come_out_whole() {
        let stream = "data: {\"a\": 1}\n\ndata: {\"b\": \"é\"}\n\ndata: [DONE]\n\n";
        let whole = events(&[stream]).unwrap();
        assert_eq!(
            whole,
            [data("{\"a\": 1}"), data("{\"b\": \"é\"}"), data("[DONE]")]
        );
        // Every split point, including inside the two-byte "é".
        let bytes = stream.as_bytes();
        for cut in 1..bytes.len() {
            let r = io::BufReader::with_capacity(
                3,
                Chunks(vec![bytes[..cut].to_vec(), bytes[cut..].to_vec()]),
            );
            let mut reader = EventReader::new(r);
            let mut got = Vec::new();
            while let Some(e) = reader.next_event().unwrap() {
                got.push(e);
            }
            assert_eq!(got, whole, "split at byte {cut}");
        }
    }

    #[test]
    fn the_standard_line_rules_hold() {
        let got = events(&[
            "\u{feff}: a comment\r\n",
            "event: message\r\nid: 7\r\nretry: 10\r\n",
            "data:no space\r\ndata:  two spaces\r\n\r\n",
            "data\rdata: x\r\r",
            "\n\n\n",
        ])
        .unwrap();
        assert_eq!(got, [data("no space\n two spaces"), data("\nx")]);
    }

    #[test]
    fn error_lines_are_events() {
        let got = events(&[
            "data: {\"x\": 1}\n\n",
            "error: {\"code\": 500, \"message\": \"boom\"}\n\n",
        ])
        .unwrap();
        assert_eq!(
            got,
            [
                data("{\"x\": 1}"),
                Event::Error("{\"code\": 500, \"message\": \"boom\"}".into())
            ]
        );
    }

    #[test]
    fn a_stream_cut_inside_a_line_is_an_error_and_a_missing_blank_line_is_not() {
        let e = events(&["data: {\"x\": 1}\n\ndata: {\"choi"]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(events(&["data: [DONE]\n"]).unwrap(), [data("[DONE]")]);
        assert_eq!(events(&[""]).unwrap(), []);
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        let r = io::BufReader::new(Chunks(vec![b"data: \xff\n\n".to_vec()]));
        let e = EventReader::new(r).next_event().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
