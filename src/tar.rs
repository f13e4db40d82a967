//! Just enough ustar for VM metadata exports: xapi's `/export_metadata` answers a tar holding
//! `ova.xml`; the simulated host builds one and backup checks what it received.

const BLOCK: usize = 512;

/// A tar of `files` (name, contents), as `tar` writes it (ustar, mode 0644).
pub fn build(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        let mut h = [0u8; BLOCK];
        let n = name.as_bytes();
        h[..n.len().min(100)].copy_from_slice(&n[..n.len().min(100)]);
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
    }
    out.resize(out.len() + 2 * BLOCK, 0);
    out
}

/// The members of a tar: (name, contents). None if it is not a well-formed tar.
pub fn members(tar: &[u8]) -> Option<Vec<(String, &[u8])>> {
    walk(tar).map(|(m, _)| m)
}

/// True if `tar` parses member by member to its end-of-archive marker: two blocks of zeros.
/// A close-delimited `/export_metadata` body that is complete this way is the whole archive,
/// however the connection ended afterwards.
pub fn complete(tar: &[u8]) -> bool {
    walk(tar).is_some_and(|(_, end)| {
        end.checked_add(2 * BLOCK)
            .and_then(|e| tar.get(end..e))
            .is_some_and(|z| z.iter().all(|&b| b == 0))
    })
}

/// A tar's members: (name, contents).
type Members<'a> = Vec<(String, &'a [u8])>;

/// The members, and the offset of the first zero block that ends them.
fn walk(tar: &[u8]) -> Option<(Members<'_>, usize)> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while let Some(h) = tar.get(off..off.saturating_add(BLOCK))
        && h.len() == BLOCK
    {
        if h.iter().all(|&b| b == 0) {
            return Some((out, off));
        }
        let stored = u32::try_from(parse_octal(&h[148..156])?).ok()?;
        let sum: u32 = h[..148].iter().map(|&b| b as u32).sum::<u32>()
            + 8 * b' ' as u32
            + h[156..].iter().map(|&b| b as u32).sum::<u32>();
        if sum != stored {
            return None;
        }
        let name_end = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
        let name = String::from_utf8_lossy(&h[..name_end]).into_owned();
        let size = usize::try_from(parse_octal(&h[124..136])?).ok()?;
        let start = off + BLOCK;
        let end = start.checked_add(size)?;
        if end > tar.len() {
            return None;
        }
        out.push((name, tar.get(start..end)?));
        off = start.checked_add(size.div_ceil(BLOCK).checked_mul(BLOCK)?)?;
    }
    None
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(field).ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c == ' ');
    u64::from_str_radix(s, 8).ok()
}

/// True if `tar` is a tar holding a member called `name`.
pub fn holds(tar: &[u8], name: &str) -> bool {
    members(tar).is_some_and(|m| m.iter().any(|(n, _)| n == name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_and_read_back() {
        let t = build(&[("ova.xml", b"<value/>"), ("b", &[7u8; 1000])]);
        let m = members(&t).unwrap();
        assert_eq!(m[0], ("ova.xml".to_string(), &b"<value/>"[..]));
        assert_eq!(m[1].1.len(), 1000);
        assert!(holds(&t, "ova.xml"));
        assert!(!holds(b"<html>error</html>", "ova.xml"));
        let mut bad = t.clone();
        bad[0] ^= 1;
        assert!(members(&bad).is_none());
        assert!(members(&t[..600]).is_none());
    }

    #[test]
    fn complete_needs_both_end_blocks() {
        let t = build(&[("ova.xml", b"<value/>")]);
        assert!(complete(&t));
        // Cut anywhere before the second end block: not complete.
        for cut in [0, 511, 512, 1024, 1536, t.len() - 1] {
            assert!(!complete(&t[..cut]), "cut at {cut}");
        }
        // Bytes after the end blocks (padding to a record) do not matter.
        let mut padded = t.clone();
        padded.resize(10240, 0);
        assert!(complete(&padded));
        assert!(!complete(b"<html>error</html>"));
        let mut bad = t.clone();
        bad[0] ^= 1;
        assert!(!complete(&bad));
    }
}
