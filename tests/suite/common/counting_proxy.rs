//! A TCP proxy in front of an HTTP/1.1 endpoint that records every request's method and target
//! (tests count what cbtfs really sends to S3). It reads the client's requests (line, headers,
//! a `Content-Length` body) to find where each one starts and forwards the bytes unchanged;
//! responses are copied back unchanged. Signatures stay valid: the client signs the `Host` it
//! connects to, and the proxy rewrites nothing.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// One request seen: method and target (`/bucket/key?query`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub target: String,
    /// Which client connection carried it (a client opens more only for requests in
    /// parallel: its pool reuses idle ones).
    pub conn: u64,
}

impl Seen {
    /// A GET of an object (not a listing).
    pub fn is_object_get(&self) -> bool {
        self.method == "GET" && !self.is_list()
    }
    pub fn is_list(&self) -> bool {
        self.method == "GET" && self.target.contains("list-type=")
    }
}

pub struct CountingProxy {
    /// `http://127.0.0.1:PORT`, to give cbtfs as its endpoint.
    pub endpoint: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl CountingProxy {
    /// Proxy to `upstream` (`http://HOST:PORT`).
    pub fn start(upstream: &str) -> CountingProxy {
        let addr = upstream
            .strip_prefix("http://")
            .expect("an http:// upstream")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let s = seen.clone();
        std::thread::spawn(move || {
            for (conn, client) in (1u64..).zip(listener.incoming()) {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&addr) else {
                    continue;
                };
                let s = s.clone();
                std::thread::spawn(move || relay(client, server, s, conn));
            }
        });
        CountingProxy { endpoint, seen }
    }

    /// The requests seen since the last call.
    pub fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

fn relay(client: TcpStream, mut server: TcpStream, seen: Arc<Mutex<Vec<Seen>>>, conn: u64) {
    let (Ok(mut back_from), Ok(mut back_to)) = (server.try_clone(), client.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut back_from, &mut back_to);
        let _ = back_to.shutdown(std::net::Shutdown::Both);
    });
    let mut r = BufReader::new(client);
    loop {
        let mut head = Vec::new();
        let mut len = 0u64;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    let _ = server.shutdown(std::net::Shutdown::Both);
                    return;
                }
                Ok(_) => {}
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
            let end = line == "\r\n";
            head.push(line);
            if end {
                break;
            }
        }
        let mut words = head[0].split_whitespace();
        seen.lock().unwrap().push(Seen {
            method: words.next().unwrap_or("").to_string(),
            target: words.next().unwrap_or("").to_string(),
            conn,
        });
        if server.write_all(head.concat().as_bytes()).is_err() {
            return;
        }
        if chunked {
            // Not parsed: forward the rest as it comes (later requests go uncounted).
            let _ = std::io::copy(&mut r, &mut server);
            return;
        }
        if std::io::copy(&mut (&mut r).take(len), &mut server).is_err() {
            return;
        }
    }
}
