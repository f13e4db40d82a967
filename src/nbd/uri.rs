//! NBD URIs (the NBD URI standard): `nbd://host[:port]/export`, `nbds://...` (TLS),
//! `nbd+unix:///export?socket=PATH`, `nbds+unix:///export?socket=PATH`.

use std::path::PathBuf;

use super::client::Address;

/// The default NBD port.
pub const PORT: u16 = 10809;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub address: Address,
    pub export: String,
    pub tls: bool,
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or("a % escape is cut short")?;
            // Two hex digits exactly (from_str_radix alone would take "+f").
            if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(format!("bad % escape %{hex}"));
            }
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad % escape %{hex}"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the export name is not UTF-8".to_string())
}

pub fn parse(uri: &str) -> Result<NbdUri, String> {
    let shown = super::client::redact_session(uri);
    let bad = |why: &str| {
        format!(
            "{shown:?} is not an NBD URI ({why}); use nbd://HOST[:PORT]/EXPORT, nbds://… for TLS, or nbd+unix:///EXPORT?socket=PATH"
        )
    };
    let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("no scheme"))?;
    let (tls, unix) = match scheme {
        "nbd" => (false, false),
        "nbds" => (true, false),
        "nbd+unix" => (false, true),
        "nbds+unix" => (true, true),
        _ => return Err(bad("unknown scheme")),
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let export = percent_decode(path).map_err(|e| bad(&e))?;
    let address = if unix {
        if !authority.is_empty() {
            return Err(bad("a unix socket URI has no host"));
        }
        let socket = query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .find_map(|kv| kv.strip_prefix("socket="))
            .ok_or_else(|| bad("missing ?socket=PATH"))?;
        Address::Unix(PathBuf::from(percent_decode(socket).map_err(|e| bad(&e))?))
    } else {
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            let (h, p) = h.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            if !p.is_empty() && !p.starts_with(':') {
                return Err(bad("text after the ] of an IPv6 address"));
            }
            (h.to_string(), p.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad("bad port"))?,
            None => PORT,
        };
        Address::Tcp { host, port }
    };
    Ok(NbdUri {
        address,
        export,
        tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let u = parse("nbds://host.example:10810/disk%201").unwrap();
        assert_eq!(
            u,
            NbdUri {
                address: Address::Tcp {
                    host: "host.example".into(),
                    port: 10810
                },
                export: "disk 1".into(),
                tls: true
            }
        );
        assert_eq!(
            parse("nbd://h").unwrap().address,
            Address::Tcp {
                host: "h".into(),
                port: 10809
            }
        );
        let u = parse("nbd+unix:///e?socket=/tmp/s.sock").unwrap();
        assert_eq!(u.address, Address::Unix("/tmp/s.sock".into()));
        assert_eq!(u.export, "e");
        assert_eq!(
            parse("nbd://[::1]:99/x").unwrap().address,
            Address::Tcp {
                host: "::1".into(),
                port: 99
            }
        );
        assert!(parse("http://x/y").is_err());
        assert!(parse("nbd+unix:///e").is_err());
        assert!(parse("nbd://h:port/").is_err());
        let e = parse("nbd://h:x/%2Fvdi%3Fsession_id%3DOpaqueRef%3Asecret").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
        // Only two hex digits make an escape; a multi-byte character cut by one is an error.
        assert!(
            parse("nbd://h/%+f")
                .unwrap_err()
                .contains("bad % escape %+f")
        );
        assert!(parse("nbd://h/%é").is_err());
        assert!(parse("nbd://h/%4").is_err());
        assert!(parse("nbd://[::1]x/e").is_err());
        assert!(parse("nbd://[]/e").unwrap_err().contains("no host"));
        assert!(parse("nbd://:80/e").unwrap_err().contains("no host"));
    }
}
