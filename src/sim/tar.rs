//! The simulated host's own ustar writer and reader (POSIX.1-1988 `ustar` interchange format,
//! as `pax`/`tar` document it), for `/export_metadata` and `/import_metadata`. It shares no code
//! with the client's.
//!
//! An archive is a sequence of 512-byte blocks: per member a header block, then the contents
//! padded to a whole block; the archive ends with two blocks of zeros. Header fields used here:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 100 | name (NUL-padded) |
//! | 100 | 8 | mode (octal) |
//! | 108, 116 | 8, 8 | uid, gid (octal) |
//! | 124 | 12 | size (octal) |
//! | 136 | 12 | mtime (octal) |
//! | 148 | 8 | checksum: sum of the header's bytes with this field as spaces, octal |
//! | 156 | 1 | type flag (`0` or NUL: a regular file) |
//! | 257 | 6 | magic `ustar\0`, then version `00` |
//! | 345 | 155 | prefix of the name (ustar) |

const BLOCK: usize = 512;
/// Members an archive may hold (a metadata export holds one).
const MAX_MEMBERS: usize = 1024;

fn octal(field: &mut [u8], value: u64) {
    // Width-1 digits and a NUL terminator.
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(&s.as_bytes()[s.len() - digits..]);
    field[digits] = 0;
}

/// A ustar archive of `files` (name ≤ 100 bytes, contents), regular files mode 0644.
pub fn write(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        let mut h = [0u8; BLOCK];
        let n = name.as_bytes();
        let n = &n[..n.len().min(100)];
        h[..n.len()].copy_from_slice(n);
        octal(&mut h[100..108], 0o644);
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], data.len() as u64);
        octal(&mut h[136..148], 0);
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        // Six octal digits, NUL, space: the customary form.
        h[148..154].copy_from_slice(format!("{:06o}", sum & 0o777_777).as_bytes());
        h[154] = 0;
        h[155] = b' ';
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        let pad = (BLOCK - data.len() % BLOCK) % BLOCK;
        out.resize(out.len() + pad, 0);
    }
    out.resize(out.len() + 2 * BLOCK, 0);
    out
}

fn parse_octal(field: &[u8]) -> Result<u64, String> {
    let s: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| b != 0 && b != b' ')
        .collect();
    if s.is_empty() {
        return Ok(0);
    }
    if s.len() > 21 || !s.iter().all(|b| (b'0'..=b'7').contains(b)) {
        return Err(format!(
            "bad octal field {:?}",
            String::from_utf8_lossy(field)
        ));
    }
    s.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(8)
            .and_then(|a| a.checked_add(u64::from(d - b'0')))
            .ok_or_else(|| "octal field overflows".to_string())
    })
}

/// The regular-file members of an archive (name, contents), read to its end-of-archive
/// blocks. Anything malformed — a bad checksum, a member running past the end, no end blocks —
/// is an error naming what was wrong.
pub fn read(tar: &[u8]) -> Result<Vec<(String, &[u8])>, String> {
    let mut out = Vec::new();
    let mut off = 0usize;
    loop {
        let h = tar
            .get(off..off.saturating_add(BLOCK))
            .ok_or_else(|| format!("the archive ends at byte {off} without its end blocks"))?;
        if h.iter().all(|&b| b == 0) {
            let second = tar.get(off + BLOCK..off.saturating_add(2 * BLOCK));
            return match second {
                Some(b) if b.iter().all(|&x| x == 0) => Ok(out),
                _ => Err(format!("only one end block at byte {off}")),
            };
        }
        if out.len() >= MAX_MEMBERS {
            return Err(format!("more than {MAX_MEMBERS} members"));
        }
        let stored = parse_octal(&h[148..156])?;
        let sum: u64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(b)
                }
            })
            .sum();
        if sum != stored {
            return Err(format!(
                "header at byte {off}: checksum {stored:o} where the header sums to {sum:o}"
            ));
        }
        let size = usize::try_from(parse_octal(&h[124..136])?)
            .map_err(|_| "member size too large".to_string())?;
        let base = &h[..100];
        let base = &base[..base.iter().position(|&b| b == 0).unwrap_or(100)];
        let prefix = &h[345..500];
        let prefix = &prefix[..prefix.iter().position(|&b| b == 0).unwrap_or(155)];
        let mut name = String::from_utf8_lossy(prefix).into_owned();
        if !name.is_empty() && &h[257..262] == b"ustar" {
            name.push('/');
        } else {
            name.clear();
        }
        name.push_str(&String::from_utf8_lossy(base));
        let start = off + BLOCK;
        let data = start
            .checked_add(size)
            .and_then(|end| tar.get(start..end))
            .ok_or_else(|| {
                format!("member {name:?} of {size} bytes runs past the end of the archive")
            })?;
        if matches!(h[156], b'0' | 0) {
            out.push((name, data));
        }
        off = size
            .div_ceil(BLOCK)
            .checked_mul(BLOCK)
            .and_then(|n| start.checked_add(n))
            .ok_or("member size too large")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_archives_read_back() {
        let big = vec![7u8; 1000];
        let t = write(&[("ova.xml", b"<value/>"), ("dir/b", &big), ("empty", b"")]);
        assert_eq!(t.len(), 512 * (2 + 1 + 2 + 1 + 2));
        let m = read(&t).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0], ("ova.xml".to_string(), &b"<value/>"[..]));
        assert_eq!(m[1], ("dir/b".to_string(), &big[..]));
        assert_eq!(m[2].1.len(), 0);
        // The header as the format has it: size field, magic, checksum in octal.
        assert_eq!(&t[124..136], b"00000000010\0");
        assert_eq!(&t[257..265], b"ustar\x0000");
        assert_eq!(read(&write(&[])).unwrap().len(), 0);
    }

    #[test]
    fn damaged_archives_are_refused() {
        let t = write(&[("ova.xml", b"<value/>")]);
        for cut in [0, 100, 512, 1024, 1536, t.len() - 1] {
            assert!(read(&t[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = t.clone();
        bad[0] ^= 1;
        assert!(read(&bad).unwrap_err().contains("checksum"));
        let mut huge = t.clone();
        huge[124..136].copy_from_slice(b"77777777777\0");
        // Fix the checksum so the size itself is what is refused.
        huge[148..156].fill(b' ');
        let sum: u64 = huge[..512].iter().map(|&b| u64::from(b)).sum();
        huge[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        assert!(read(&huge).unwrap_err().contains("runs past"));
        let mut junk = t.clone();
        junk[148..156].copy_from_slice(b"9999999\0");
        assert!(read(&junk).unwrap_err().contains("octal"));
        assert!(read(b"<html>error</html>").is_err());
    }
}
