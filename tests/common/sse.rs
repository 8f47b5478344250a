//! A Server-Sent Events client for `GET /v1/events`, over a plain socket: the answer's
//! head as it came, then each event as it arrives.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: Option<String>,
    pub kind: String,
    pub data: Value,
}

/// One open `GET /v1/events`; events arrive on `events` (read by `next_*`).
pub struct EventStream {
    pub status: u16,
    /// Lowercased names.
    pub headers: Vec<(String, String)>,
    pub events: mpsc::Receiver<SseEvent>,
    socket: TcpStream,
}

impl EventStream {
    /// Opens the stream with `token`, resuming after `last_event_id` when given. The
    /// status is not checked here: see `status`.
    pub fn open(addr: SocketAddr, token: &str, last_event_id: Option<&str>) -> EventStream {
        let mut socket = TcpStream::connect(addr).expect("connect to the admin address");
        let mut head = format!("GET /v1/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n");
        if let Some(id) = last_event_id {
            head.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        head.push_str("Accept: text/event-stream\r\n\r\n");
        socket.write_all(head.as_bytes()).expect("send the request");
        let mut reader = BufReader::new(socket.try_clone().expect("clone the socket"));
        let mut status_line = String::new();
        reader.read_line(&mut status_line).expect("a status line");
        let status = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status");
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("a header line");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').expect("a header");
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
        let (sender, events) = mpsc::channel();
        thread::spawn(move || read_events(reader, chunked, sender));
        EventStream { status, headers, events, socket }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The next event that is not a usage tick, within `within`.
    #[track_caller]
    pub fn next_change(&self, within: Duration) -> SseEvent {
        self.next_matching(within, |e| e.kind != "usage")
    }

    #[track_caller]
    pub fn next_matching(&self, within: Duration, wanted: impl Fn(&SseEvent) -> bool) -> SseEvent {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(event) if wanted(&event) => return event,
                Ok(_) => {}
                Err(e) => panic!("no matching event within {within:?}: {e}"),
            }
        }
    }

    /// The next change event, if one arrives within `within`.
    pub fn quiet_for(&self, within: Duration) -> Option<SseEvent> {
        let deadline = Instant::now() + within;
        while let Ok(event) = self.events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if event.kind != "usage" {
                return Some(event);
            }
        }
        None
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

/// Decodes the body (chunked or not) and parses `id:`, `event:` and `data:` lines,
/// one event per blank line; comments (`:`) are keep-alives.
fn read_events(mut reader: BufReader<TcpStream>, chunked: bool, sender: mpsc::Sender<SseEvent>) {
    let mut body = Vec::new();
    let mut pending = String::new();
    loop {
        let bytes = if chunked {
            let mut size = String::new();
            if reader.read_line(&mut size).unwrap_or(0) == 0 {
                return;
            }
            let Ok(n) = usize::from_str_radix(size.trim(), 16) else { return };
            if n == 0 {
                return;
            }
            let mut chunk = vec![0; n + 2];
            if reader.read_exact(&mut chunk).is_err() {
                return;
            }
            chunk.truncate(n);
            chunk
        } else {
            let mut chunk = vec![0; 4096];
            match reader.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => chunk[..n].to_vec(),
            }
        };
        body.extend_from_slice(&bytes);
        while let Some(end) = body.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = body.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_owned();
            if line.is_empty() {
                if !pending.is_empty() {
                    if let Some(event) = parse_event(&pending) {
                        if sender.send(event).is_err() {
                            return;
                        }
                    }
                    pending.clear();
                }
            } else {
                pending.push_str(&line);
                pending.push('\n');
            }
        }
    }
}

fn parse_event(block: &str) -> Option<SseEvent> {
    let (mut id, mut kind, mut data) = (None, String::from("message"), String::new());
    for line in block.lines() {
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => id = Some(value.to_owned()),
            "event" => kind = value.to_owned(),
            "data" => data.push_str(value),
            _ => {}
        }
    }
    if data.is_empty() {
        return None;
    }
    let data = serde_json::from_str(&data).unwrap_or_else(|e| panic!("event data is not JSON ({e}): {data}"));
    Some(SseEvent { id, kind, data })
}
