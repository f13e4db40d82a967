//! The NBD protocol's messages, encoded and decoded on byte buffers (no I/O here).
//!
//! Reference: the NBD protocol document ("fixed newstyle" negotiation, simple and structured
//! replies). Everything a server sends is bounded before it is trusted: option replies, chunk
//! lengths and read lengths are checked against limits, so a hostile server can neither make the
//! client allocate without bound nor panic it.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_BIT: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR_BIT | 2;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

pub const CMD_READ: u16 = 0;
pub const CMD_DISC: u16 = 2;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR: u16 = (1 << 15) | 1;
pub const CHUNK_ERROR_OFFSET: u16 = (1 << 15) | 2;
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

/// `base:allocation` status bits.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// Largest option reply payload accepted during negotiation.
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Largest read the client ever asks for; replies longer than what was asked are refused.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Most `base:allocation` extents accepted in one block status reply (qemu-nbd sends at most
/// 128 Ki; 1 MiB of descriptors): a hostile server cannot make the client hold more.
pub const MAX_EXTENTS: u32 = 1 << 17;
/// Longest error message the protocol allows (its strings are at most 4096 bytes).
pub const MAX_MESSAGE: usize = 4096;
/// Error messages are shown up to this many characters.
const SHOWN_MESSAGE: usize = 200;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("not an NBD server (bad greeting magic {0:#x})")]
    BadGreeting(u64),
    #[error("the server does not speak fixed newstyle NBD (handshake flags {0:#x})")]
    NotFixedNewstyle(u16),
    #[error("bad {what} magic {got:#x}")]
    BadMagic { what: &'static str, got: u64 },
    #[error("option reply for option {got}, expected {want}")]
    WrongOption { want: u32, got: u32 },
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error(
        "the server accepted the export without stating its size (no NBD_INFO_EXPORT before its NBD_REP_ACK to NBD_OPT_GO, which the NBD protocol requires)"
    )]
    NoExportSize,
    #[error(
        "reply for cookie {0:#x}, which names no request in flight (never sent, or already answered)"
    )]
    UnknownCookie(u64),
    #[error("{kind} chunk of {len} bytes where at most {max} fit")]
    ChunkTooLong { kind: u16, len: u32, max: u64 },
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// The server's first 18 bytes: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn parse_greeting(b: &[u8; 18]) -> Result<u16, ProtoError> {
    if be64(b, 0) != NBDMAGIC {
        return Err(ProtoError::BadGreeting(be64(b, 0)));
    }
    if be64(b, 8) != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "newstyle",
            got: be64(b, 8),
        });
    }
    let flags = be16(b, 16);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ProtoError::NotFixedNewstyle(flags));
    }
    Ok(flags)
}

/// A client option: IHAVEOPT, option, length, data.
pub fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// NBD_OPT_GO data: export name, then the info requests (we ask for block sizes).
pub fn go_data(name: &str) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&1u16.to_be_bytes());
    v.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    v
}

/// NBD_OPT_SET_META_CONTEXT data for one context.
pub fn meta_context_data(export: &str, context: &str) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(export.len() as u32).to_be_bytes());
    v.extend_from_slice(export.as_bytes());
    v.extend_from_slice(&1u32.to_be_bytes());
    v.extend_from_slice(&(context.len() as u32).to_be_bytes());
    v.extend_from_slice(context.as_bytes());
    v
}

/// The 20-byte header of an option reply: (option, reply type, payload length).
pub fn parse_option_reply_header(b: &[u8; 20], want: u32) -> Result<(u32, u32), ProtoError> {
    if be64(b, 0) != OPTION_REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "option reply",
            got: be64(b, 0),
        });
    }
    let opt = be32(b, 8);
    if opt != want {
        return Err(ProtoError::WrongOption { want, got: opt });
    }
    let len = be32(b, 16);
    if len > MAX_OPTION_REPLY {
        return Err(ProtoError::TooLong {
            what: "option reply",
            len: len as u64,
            max: MAX_OPTION_REPLY as u64,
        });
    }
    Ok((be32(b, 12), len))
}

/// What an export is, from NBD_INFO_EXPORT or the EXPORT_NAME reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub max_block: u32,
}

/// Apply an NBD_REP_INFO payload to `info`; returns the information type it carried.
pub fn parse_info(payload: &[u8], info: &mut ExportInfo) -> Result<u16, ProtoError> {
    if payload.len() < 2 {
        return Err(ProtoError::Malformed("info reply"));
    }
    let kind = be16(payload, 0);
    match kind {
        INFO_EXPORT if payload.len() == 12 => {
            info.size = be64(payload, 2);
            info.flags = be16(payload, 10);
        }
        INFO_BLOCK_SIZE if payload.len() == 14 => {
            info.min_block = be32(payload, 2);
            info.max_block = be32(payload, 10);
        }
        INFO_EXPORT | INFO_BLOCK_SIZE => return Err(ProtoError::Malformed("info reply")),
        _ => {} // other information we did not ask for is ignored
    }
    Ok(kind)
}

/// A request header (28 bytes).
pub fn request(cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&cmd.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// A reply's header, after its 4-byte magic says which kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// Simple reply: the error, the cookie; data follows for a successful read.
    Simple { error: u32, cookie: u64 },
    /// One chunk of a structured reply.
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        len: u32,
    },
}

/// Bytes to read after the magic for each kind of reply header.
pub const SIMPLE_REST: usize = 12;
pub const CHUNK_REST: usize = 16;

pub fn reply_rest_len(magic: u32) -> Result<usize, ProtoError> {
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REST),
        STRUCTURED_REPLY_MAGIC => Ok(CHUNK_REST),
        m => Err(ProtoError::BadMagic {
            what: "reply",
            got: m as u64,
        }),
    }
}

pub fn parse_reply_header(magic: u32, rest: &[u8]) -> Result<ReplyHeader, ProtoError> {
    match magic {
        SIMPLE_REPLY_MAGIC if rest.len() == SIMPLE_REST => Ok(ReplyHeader::Simple {
            error: be32(rest, 0),
            cookie: be64(rest, 4),
        }),
        STRUCTURED_REPLY_MAGIC if rest.len() == CHUNK_REST => {
            let len = be32(rest, 12);
            // A chunk carries at most one request's data plus its 8-byte offset.
            if len > MAX_REQUEST + 8 {
                return Err(ProtoError::TooLong {
                    what: "reply chunk",
                    len: len as u64,
                    max: MAX_REQUEST as u64 + 8,
                });
            }
            Ok(ReplyHeader::Chunk {
                flags: be16(rest, 0),
                kind: be16(rest, 2),
                cookie: be64(rest, 4),
                len,
            })
        }
        _ => Err(ProtoError::Malformed("reply header")),
    }
}

/// The most payload bytes a chunk of `kind` may carry in a reply to a request of `req_len`
/// bytes (`read`: a read, else block status), checked before anything is allocated: what a
/// chunk holds is bounded by what the request justifies, never by what the server claims.
pub fn chunk_len_max(kind: u16, read: bool, req_len: u32) -> Result<u64, ProtoError> {
    let max = match kind {
        CHUNK_NONE => 0,
        CHUNK_OFFSET_DATA if read => 8 + req_len as u64,
        CHUNK_OFFSET_HOLE if read => 12,
        CHUNK_BLOCK_STATUS if !read => 4 + 8 * MAX_EXTENTS as u64,
        // errno, message length, message (and an offset for ERROR_OFFSET)
        k if k & (1 << 15) != 0 => 6 + MAX_MESSAGE as u64 + 8,
        CHUNK_OFFSET_DATA | CHUNK_OFFSET_HOLE => {
            return Err(ProtoError::Malformed(
                "data chunk in a reply to block status",
            ));
        }
        CHUNK_BLOCK_STATUS => {
            return Err(ProtoError::Malformed("status chunk in a reply to a read"));
        }
        _ => return Err(ProtoError::Malformed("unknown reply chunk type")),
    };
    Ok(max)
}

/// `text` shown safely in an error: at most a few hundred characters, control characters
/// escaped (a server's message must not reach a terminal raw).
pub fn shown_message(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out: String = text
        .chars()
        .take(SHOWN_MESSAGE)
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    if text.chars().count() > SHOWN_MESSAGE {
        out.push('…');
    }
    out
}

/// A chunk's payload, checked against the request it answers (`req_off`, `req_len`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk<'a> {
    None,
    /// Data for bytes `offset..offset+data.len()` of the export.
    Data {
        offset: u64,
        data: &'a [u8],
    },
    /// Zeros for `offset..offset+len`.
    Hole {
        offset: u64,
        len: u32,
    },
    /// `base:allocation` descriptors: (length, flags).
    Status {
        context: u32,
        extents: Vec<(u32, u32)>,
    },
    /// The server reports an error (errno-like value and message).
    Error {
        error: u32,
        message: String,
    },
}

pub fn parse_chunk(
    kind: u16,
    p: &[u8],
    req_off: u64,
    req_len: u32,
) -> Result<Chunk<'_>, ProtoError> {
    let in_request = |offset: u64, len: u64| {
        offset >= req_off
            && offset.checked_add(len).is_some_and(|end| {
                req_off
                    .checked_add(req_len as u64)
                    .is_some_and(|req_end| end <= req_end)
            })
    };
    match kind {
        CHUNK_NONE if p.is_empty() => Ok(Chunk::None),
        CHUNK_OFFSET_DATA if p.len() > 8 => {
            let offset = be64(p, 0);
            let data = &p[8..];
            if !in_request(offset, data.len() as u64) {
                return Err(ProtoError::Malformed("data chunk outside its request"));
            }
            Ok(Chunk::Data { offset, data })
        }
        CHUNK_OFFSET_HOLE if p.len() == 12 => {
            let (offset, len) = (be64(p, 0), be32(p, 8));
            if len == 0 || !in_request(offset, len as u64) {
                return Err(ProtoError::Malformed("hole chunk outside its request"));
            }
            Ok(Chunk::Hole { offset, len })
        }
        CHUNK_BLOCK_STATUS if p.len() >= 12 && (p.len() - 4).is_multiple_of(8) => {
            let context = be32(p, 0);
            if (p.len() - 4) / 8 > MAX_EXTENTS as usize {
                return Err(ProtoError::TooLong {
                    what: "block status reply",
                    len: ((p.len() - 4) / 8) as u64,
                    max: MAX_EXTENTS as u64,
                });
            }
            let extents: Vec<(u32, u32)> = p[4..]
                .chunks_exact(8)
                .map(|c| (be32(c, 0), be32(c, 4)))
                .collect();
            // An empty extent says nothing and would let a caller loop without progress.
            if extents.iter().any(|&(len, _)| len == 0) {
                return Err(ProtoError::Malformed(
                    "block status reply with a zero-length extent",
                ));
            }
            Ok(Chunk::Status { context, extents })
        }
        CHUNK_ERROR | CHUNK_ERROR_OFFSET if p.len() >= 6 => {
            let error = be32(p, 0);
            let mlen = be16(p, 4) as usize;
            // The message, then (ERROR_OFFSET) an 8-byte offset: nothing else may follow.
            let tail = if kind == CHUNK_ERROR_OFFSET { 8 } else { 0 };
            if mlen > MAX_MESSAGE || p.len() != 6 + mlen + tail {
                return Err(ProtoError::Malformed("error chunk (message length)"));
            }
            let message = p.get(6..6 + mlen).map(shown_message).unwrap_or_default();
            Ok(Chunk::Error { error, message })
        }
        CHUNK_NONE | CHUNK_OFFSET_DATA | CHUNK_OFFSET_HOLE | CHUNK_BLOCK_STATUS | CHUNK_ERROR
        | CHUNK_ERROR_OFFSET => Err(ProtoError::Malformed("reply chunk")),
        k if k & (1 << 15) != 0 => Ok(Chunk::Error {
            error: if p.len() >= 4 { be32(p, 0) } else { 5 },
            message: format!("unknown error chunk type {k}"),
        }),
        _ => Err(ProtoError::Malformed("unknown reply chunk type")),
    }
}

/// errno-style NBD error values, named.
pub fn error_name(e: u32) -> &'static str {
    match e {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_and_option_encoding() {
        let mut g = [0u8; 18];
        g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        g[16..].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_greeting(&g), Ok(3));
        g[17] = 0;
        assert!(matches!(
            parse_greeting(&g),
            Err(ProtoError::NotFixedNewstyle(0))
        ));
        let o = option(OPT_GO, &go_data("x"));
        assert_eq!(&o[8..12], &7u32.to_be_bytes());
        assert_eq!(be32(&o, 12) as usize, o.len() - 16);
    }

    #[test]
    fn option_reply_header_checks() {
        let mut h = [0u8; 20];
        h[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        h[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        h[12..16].copy_from_slice(&REP_ACK.to_be_bytes());
        assert_eq!(parse_option_reply_header(&h, OPT_GO), Ok((REP_ACK, 0)));
        assert!(parse_option_reply_header(&h, OPT_STARTTLS).is_err());
        h[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            parse_option_reply_header(&h, OPT_GO),
            Err(ProtoError::TooLong { .. })
        ));
    }

    #[test]
    fn chunks_outside_their_request_are_refused() {
        let mut p = 100u64.to_be_bytes().to_vec();
        p.extend_from_slice(&[1, 2, 3]);
        assert!(matches!(
            parse_chunk(CHUNK_OFFSET_DATA, &p, 100, 3),
            Ok(Chunk::Data { offset: 100, .. })
        ));
        assert!(parse_chunk(CHUNK_OFFSET_DATA, &p, 100, 2).is_err());
        assert!(parse_chunk(CHUNK_OFFSET_DATA, &p, 101, 10).is_err());
        let mut h = 0u64.to_be_bytes().to_vec();
        h.extend_from_slice(&0u32.to_be_bytes());
        assert!(
            parse_chunk(CHUNK_OFFSET_HOLE, &h, 0, 10).is_err(),
            "empty hole"
        );
    }

    proptest! {
        #[test]
        fn hostile_bytes_never_panic(magic in any::<u32>(), rest in prop::collection::vec(any::<u8>(), 0..40),
                                     kind in any::<u16>(), payload in prop::collection::vec(any::<u8>(), 0..64),
                                     off in any::<u64>(), len in any::<u32>()) {
            let _ = reply_rest_len(magic);
            let _ = parse_reply_header(magic, &rest);
            let _ = parse_reply_header(SIMPLE_REPLY_MAGIC, &rest);
            let _ = parse_reply_header(STRUCTURED_REPLY_MAGIC, &rest);
            let _ = parse_chunk(kind, &payload, off, len);
            let mut info = ExportInfo::default();
            let _ = parse_info(&payload, &mut info);
            if rest.len() >= 20 {
                let mut h = [0u8; 20];
                h.copy_from_slice(&rest[..20]);
                let _ = parse_option_reply_header(&h, OPT_GO);
            }
            if rest.len() >= 18 {
                let mut g = [0u8; 18];
                g.copy_from_slice(&rest[..18]);
                let _ = parse_greeting(&g);
            }
        }

        #[test]
        fn chunk_lengths_are_bounded(len in any::<u32>()) {
            let mut rest = [0u8; 16];
            rest[12..16].copy_from_slice(&len.to_be_bytes());
            match parse_reply_header(STRUCTURED_REPLY_MAGIC, &rest) {
                Ok(ReplyHeader::Chunk { len: l, .. }) => prop_assert!(l <= MAX_REQUEST + 8),
                Ok(_) => prop_assert!(false),
                Err(_) => prop_assert!(len > MAX_REQUEST + 8),
            }
        }
    }
}
