//! A minimal Server-Sent Events reader over any byte stream: enough for lockstep's watch
//! and event streams (`id`, `event`, `data`, comments), tolerant of chunk boundaries
//! anywhere, including inside a line or a UTF-8 character.

use futures_util::{Stream, StreamExt};

/// One dispatched SSE event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `id:` field, if any.
    pub id: Option<String>,
    /// The `event:` field (default `message`).
    pub event: String,
    /// The `data:` lines joined by `\n`.
    pub data: String,
}

/// Incremental parser: feed bytes, take complete events.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    current: SseEvent,
    has_data: bool,
}

impl SseParser {
    /// Feeds a chunk; returns the events it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line);
            if line.is_empty() {
                if self.has_data {
                    let mut ev = std::mem::take(&mut self.current);
                    if ev.event.is_empty() {
                        ev.event = "message".into();
                    }
                    out.push(ev);
                } else {
                    self.current = SseEvent::default();
                }
                self.has_data = false;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (&line[..], ""),
            };
            match field {
                "id" => self.current.id = Some(value.to_string()),
                "event" => self.current.event = value.to_string(),
                "data" => {
                    if self.has_data {
                        self.current.data.push('\n');
                    }
                    self.current.data.push_str(value);
                    self.has_data = true;
                }
                _ => {}
            }
        }
        out
    }
}

/// Turns a response body into a stream of events; ends when the body ends or fails.
///
/// A chunk that completes no event (a keep-alive comment, half an event) yields an item
/// with an empty `event`, so a reader can tell a live but quiet stream from a dead one.
pub fn events(
    body: impl Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Send + 'static,
) -> impl Stream<Item = SseEvent> + Send {
    let mut parser = SseParser::default();
    body.take_while(|r| std::future::ready(r.is_ok()))
        .flat_map(move |chunk| {
            let mut evs = chunk.map(|c| parser.feed(&c)).unwrap_or_default();
            if evs.is_empty() {
                evs.push(SseEvent::default());
            }
            futures_util::stream::iter(evs)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_survive_any_chunking() {
        let wire = b": keep-alive\n\nid: 7\nevent: release\ndata: {\"a\":1}\n\nid: 8\r\nevent: release\r\ndata: x\r\ndata: y\r\n\r\n";
        for split in 1..wire.len() {
            let mut p = SseParser::default();
            let mut got = p.feed(&wire[..split]);
            got.extend(p.feed(&wire[split..]));
            assert_eq!(got.len(), 2, "split at {split}");
            assert_eq!(got[0].id.as_deref(), Some("7"));
            assert_eq!(got[0].event, "release");
            assert_eq!(got[0].data, "{\"a\":1}");
            assert_eq!(got[1].data, "x\ny");
        }
    }

    #[test]
    fn an_event_cut_before_its_blank_line_is_not_dispatched() {
        let mut p = SseParser::default();
        assert!(p.feed(b"id: 1\nevent: release\ndata: {\"trunc").is_empty());
    }
}
