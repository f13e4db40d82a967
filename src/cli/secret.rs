//! Where the repository's secret comes from: never argv.
//!
//! In this order (the first one given wins):
//!
//! 1. `--key-file F` (a cbtfs key file, see `repo::keys`)
//! 2. `--repo-password-file F` (its first line; a trailing LF or CR LF is not part of it)
//! 3. `CBTFS_KEY_FILE`
//! 4. `CBTFS_REPO_PASSWORD_FILE`
//! 5. `CBTFS_REPO_PASSWORD`
//!
//! Giving both flags is refused. With none of them the caller decides: it may ask on the
//! terminal ([`prompt`]), or refuse. No secret is ever put in an error message or a log line;
//! messages name the file or the variable it came from.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use zeroize::Zeroize;

use crate::repo::keys::Secret;

/// The longest password line read (a password file holding something else is refused rather
/// than read whole).
const MAX_PASSWORD: u64 = 4096;

/// The secret sources given as flags.
#[derive(Debug, Clone, Default)]
pub struct SecretSources {
    /// `--repo-password-file F`
    pub password_file: Option<PathBuf>,
    /// `--key-file F`
    pub key_file: Option<PathBuf>,
}

/// The flags and environment variables one repository's secret may come from.
#[derive(Debug, Clone, Copy)]
pub struct SecretNames {
    pub key_flag: &'static str,
    pub password_flag: &'static str,
    pub key_env: &'static str,
    pub password_file_env: &'static str,
    pub password_env: &'static str,
}

/// The repository a command works on (for `cbtfs copy`: the source).
pub const REPO_NAMES: SecretNames = SecretNames {
    key_flag: "--key-file",
    password_flag: "--repo-password-file",
    key_env: "CBTFS_KEY_FILE",
    password_file_env: "CBTFS_REPO_PASSWORD_FILE",
    password_env: "CBTFS_REPO_PASSWORD",
};

/// `cbtfs copy`'s destination, in the same order of precedence.
pub const TO_NAMES: SecretNames = SecretNames {
    key_flag: "--to-key-file",
    password_flag: "--to-repo-password-file",
    key_env: "CBTFS_TO_KEY_FILE",
    password_file_env: "CBTFS_TO_REPO_PASSWORD_FILE",
    password_env: "CBTFS_TO_REPO_PASSWORD",
};

/// The secret the flags or the environment give, or `None` if they give none. `purpose` says
/// what it is for in messages ("to open repository /backup").
pub fn resolve(sources: &SecretSources, purpose: &str) -> Result<Option<Secret>> {
    resolve_with(sources, purpose, |name| std::env::var_os(name))
}

/// `resolve` for the secret `names` name (`TO_NAMES`: a copy's destination).
pub fn resolve_named(
    sources: &SecretSources,
    names: &SecretNames,
    purpose: &str,
) -> Result<Option<Secret>> {
    resolve_named_with(sources, names, purpose, |name| std::env::var_os(name))
}

/// `resolve` with the environment as a function (tests).
fn resolve_with(
    sources: &SecretSources,
    purpose: &str,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<Option<Secret>> {
    resolve_named_with(sources, &REPO_NAMES, purpose, env)
}

fn resolve_named_with(
    sources: &SecretSources,
    names: &SecretNames,
    purpose: &str,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<Option<Secret>> {
    let n = names;
    if let (Some(k), Some(p)) = (&sources.key_file, &sources.password_file) {
        bail!(
            "both {} {} and {} {} were given {purpose}; give one of them",
            n.key_flag,
            k.display(),
            n.password_flag,
            p.display()
        );
    }
    if let Some(k) = &sources.key_file {
        return key_file(k, n.key_flag, purpose).map(Some);
    }
    if let Some(p) = &sources.password_file {
        return password_file(p, n.password_flag, purpose).map(Some);
    }
    let set = |name: &str| env(name).filter(|v| !v.is_empty());
    if let Some(k) = set(n.key_env) {
        return key_file(Path::new(&k), n.key_env, purpose).map(Some);
    }
    if let Some(p) = set(n.password_file_env) {
        return password_file(Path::new(&p), n.password_file_env, purpose).map(Some);
    }
    if let Some(mut v) = env(n.password_env) {
        let text = v.to_str().map(str::to_string);
        v.zeroize_os();
        let Some(p) = text else {
            bail!(
                "{} is not UTF-8 text (given {purpose}); set it to the password",
                n.password_env
            );
        };
        if p.is_empty() {
            bail!(
                "{} is set but empty (given {purpose}); set it to the password, or unset it",
                n.password_env
            );
        }
        return Ok(Some(Secret::Password(p)));
    }
    Ok(None)
}

/// Wipe an `OsString` that held a secret.
trait ZeroizeOs {
    fn zeroize_os(&mut self);
}
impl ZeroizeOs for OsString {
    fn zeroize_os(&mut self) {
        let mut bytes = std::mem::take(self).into_encoded_bytes();
        bytes.zeroize();
    }
}

fn key_file(path: &Path, from: &str, purpose: &str) -> Result<Secret> {
    Secret::read_key_file(path).with_context(|| format!("the key file from {from} {purpose}"))
}

/// The password in the first line of `path`.
fn password_file(path: &Path, from: &str, purpose: &str) -> Result<Secret> {
    read_password_file(path)
        .with_context(|| format!("the password file from {from} {purpose}"))
        .map(Secret::Password)
}

/// The first line of a password file, without its line end (LF or CR LF). Warns (does not
/// refuse) when other users may read the file.
pub fn read_password_file(path: &Path) -> Result<String> {
    let shown = path.display();
    let file = File::open(path).with_context(|| format!("opening the password file {shown}"))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading the password file {shown}"))?;
    if !meta.is_file() {
        bail!("the password file {shown} is not a regular file");
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o044 != 0 {
        tracing::warn!(
            path = %shown,
            "the password file {shown} has mode {mode:03o}: other users may read it; `chmod 600 {shown}`"
        );
    }
    let mut line = Vec::new();
    let read = BufReader::new(file)
        .take(MAX_PASSWORD + 1)
        .read_until(b'\n', &mut line);
    if let Err(e) = read {
        line.zeroize();
        return Err(e).with_context(|| format!("reading the password file {shown}"));
    }
    let result =
        password_line(&line).map_err(|why| anyhow::anyhow!("the password file {shown} {why}"));
    line.zeroize();
    result
}

/// A password from the bytes of a line as read (with or without its LF / CR LF). The error
/// says what is wrong without quoting the line.
fn password_line(line: &[u8]) -> std::result::Result<String, String> {
    let without_lf = line.strip_suffix(b"\n");
    let ended = without_lf.is_some();
    let body = without_lf.unwrap_or(line);
    let body = body.strip_suffix(b"\r").unwrap_or(body);
    if !ended && line.len() as u64 > MAX_PASSWORD {
        return Err(format!(
            "has a first line longer than {MAX_PASSWORD} bytes: it does not look like a password file (the first line is the password)"
        ));
    }
    if body.is_empty() {
        return Err("is empty: its first line must be the password".to_string());
    }
    match std::str::from_utf8(body) {
        Ok(s) => Ok(s.to_string()),
        Err(_) => Err("does not hold UTF-8 text in its first line".to_string()),
    }
}

/// Ask for a password on the terminal (`/dev/tty`, echo off), twice with `confirm`.
pub fn prompt(prompt: &str, confirm: bool) -> Result<Secret> {
    let mut tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .context(
            "no password given and no terminal to ask on: give --repo-password-file F, --key-file F, or set CBTFS_REPO_PASSWORD_FILE",
        )?;
    prompt_on(&mut tty, prompt, confirm)
}

/// `prompt` on an open terminal.
fn prompt_on(tty: &mut File, prompt: &str, confirm: bool) -> Result<Secret> {
    let first = read_hidden(tty, prompt)?;
    if first.is_empty() {
        bail!("the password is empty: type at least one character");
    }
    if confirm {
        let again = format!("{} (again): ", prompt.trim_end().trim_end_matches(':'));
        let second = read_hidden(tty, &again)?;
        if *first != *second {
            bail!("the two passwords typed differ; nothing was changed");
        }
    }
    Ok(Secret::Password(first.take()))
}

/// A `String` wiped when dropped.
struct Wiped(String);
impl Wiped {
    fn take(mut self) -> String {
        std::mem::take(&mut self.0)
    }
}
impl std::ops::Deref for Wiped {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}
impl Drop for Wiped {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Restores the terminal's settings when dropped: on every path out of `read_hidden`.
struct EchoOff<'a> {
    tty: &'a File,
    saved: libc::termios,
}

impl<'a> EchoOff<'a> {
    fn new(tty: &'a File) -> std::io::Result<Self> {
        let fd = tty.as_raw_fd();
        // SAFETY: termios is plain data; tcgetattr fills it or fails (checked).
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is open for the lifetime of `tty`; `saved` is a valid termios to write.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut quiet = saved;
        quiet.c_lflag &= !libc::ECHO;
        quiet.c_lflag |= libc::ECHONL;
        // SAFETY: as above; `quiet` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(fd, libc::TCSAFLUSH, &quiet) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(EchoOff { tty, saved })
    }
}

impl Drop for EchoOff<'_> {
    fn drop(&mut self) {
        // SAFETY: the fd is still open (`tty` outlives the guard); `saved` came from tcgetattr.
        unsafe { libc::tcsetattr(self.tty.as_raw_fd(), libc::TCSAFLUSH, &self.saved) };
    }
}

/// Write `prompt`, read one line with echo off, return it without its line end.
fn read_hidden(tty: &mut File, prompt: &str) -> Result<Wiped> {
    tty.write_all(prompt.as_bytes())
        .and_then(|()| tty.flush())
        .context("writing the password prompt to /dev/tty")?;
    let guard = EchoOff::new(tty).context("turning echo off on /dev/tty")?;
    let mut line = Vec::new();
    let read = BufReader::new(guard.tty)
        .take(MAX_PASSWORD + 1)
        .read_until(b'\n', &mut line);
    drop(guard);
    if let Err(e) = read {
        line.zeroize();
        return Err(e).context("reading the password from /dev/tty");
    }
    if line.is_empty() {
        bail!("no password was typed (end of input)");
    }
    let result = match password_line(&line) {
        Ok(p) => Ok(Wiped(p)),
        Err(_) if line == b"\n" || line == b"\r\n" => Ok(Wiped(String::new())),
        Err(_) => Err(anyhow::anyhow!(
            "the password typed is not usable (not UTF-8, or longer than {MAX_PASSWORD} bytes)"
        )),
    };
    line.zeroize();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let m: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn password(s: Option<Secret>) -> String {
        match &s {
            Some(Secret::Password(p)) => p.clone(),
            other => panic!("expected a password, got {other:?}"),
        }
    }

    fn key_path(s: Option<Secret>) -> PathBuf {
        match &s {
            Some(Secret::KeyFile { path, .. }) => path.clone(),
            other => panic!("expected a key file, got {other:?}"),
        }
    }

    struct Files {
        _dir: tempfile::TempDir,
        pw1: PathBuf,
        pw2: PathBuf,
        key1: PathBuf,
        key2: PathBuf,
    }

    fn files() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let pw1 = dir.path().join("pw1");
        let pw2 = dir.path().join("pw2");
        std::fs::write(&pw1, "from-flag-file\n").unwrap();
        std::fs::write(&pw2, "from-env-file\n").unwrap();
        let key1 = dir.path().join("key1");
        let key2 = dir.path().join("key2");
        Secret::create_key_file(&key1).unwrap();
        Secret::create_key_file(&key2).unwrap();
        Files {
            _dir: dir,
            pw1,
            pw2,
            key1,
            key2,
        }
    }

    #[test]
    fn a_copy_destination_reads_only_its_own_names() {
        let f = files();
        let src_env = [
            ("CBTFS_KEY_FILE", f.key1.to_str().unwrap()),
            ("CBTFS_REPO_PASSWORD", "source-password"),
        ];
        let none = SecretSources::default();
        // The source's variables are not the destination's.
        assert!(
            resolve_named_with(&none, &TO_NAMES, "", env(&src_env))
                .unwrap()
                .is_none()
        );
        let to_env = [
            ("CBTFS_KEY_FILE", f.key1.to_str().unwrap()),
            ("CBTFS_TO_KEY_FILE", f.key2.to_str().unwrap()),
            ("CBTFS_TO_REPO_PASSWORD", "dest-password"),
        ];
        assert_eq!(
            key_path(resolve_named_with(&none, &TO_NAMES, "", env(&to_env)).unwrap()),
            f.key2
        );
        assert_eq!(
            password(resolve_named_with(&none, &TO_NAMES, "", env(&to_env[2..])).unwrap()),
            "dest-password"
        );
        let to_pw_flag = SecretSources {
            key_file: None,
            password_file: Some(f.pw1.clone()),
        };
        assert_eq!(
            password(resolve_named_with(&to_pw_flag, &TO_NAMES, "", env(&to_env)).unwrap()),
            "from-flag-file"
        );
        let both = SecretSources {
            key_file: Some(f.key1.clone()),
            password_file: Some(f.pw1.clone()),
        };
        let e = resolve_named_with(&both, &TO_NAMES, "to open the destination", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--to-key-file") && e.contains("--to-repo-password-file"),
            "{e}"
        );
        let e = resolve_named_with(&none, &TO_NAMES, "", env(&[("CBTFS_TO_REPO_PASSWORD", "")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("CBTFS_TO_REPO_PASSWORD is set but empty"), "{e}");
    }

    #[test]
    fn precedence() {
        let f = files();
        let all_env = [
            ("CBTFS_KEY_FILE", f.key2.to_str().unwrap()),
            ("CBTFS_REPO_PASSWORD_FILE", f.pw2.to_str().unwrap()),
            ("CBTFS_REPO_PASSWORD", "from-env"),
        ];
        let key_flag = SecretSources {
            key_file: Some(f.key1.clone()),
            password_file: None,
        };
        let pw_flag = SecretSources {
            key_file: None,
            password_file: Some(f.pw1.clone()),
        };
        let none = SecretSources::default();
        assert_eq!(
            key_path(resolve_with(&key_flag, "", env(&all_env)).unwrap()),
            f.key1
        );
        assert_eq!(
            password(resolve_with(&pw_flag, "", env(&all_env)).unwrap()),
            "from-flag-file"
        );
        assert_eq!(
            key_path(resolve_with(&none, "", env(&all_env)).unwrap()),
            f.key2
        );
        assert_eq!(
            password(resolve_with(&none, "", env(&all_env[1..])).unwrap()),
            "from-env-file"
        );
        assert_eq!(
            password(resolve_with(&none, "", env(&all_env[2..])).unwrap()),
            "from-env"
        );
        // Empty variables count as unset, except the password itself.
        assert_eq!(
            password(
                resolve_with(
                    &none,
                    "",
                    env(&[
                        ("CBTFS_KEY_FILE", ""),
                        ("CBTFS_REPO_PASSWORD_FILE", ""),
                        ("CBTFS_REPO_PASSWORD", "p")
                    ])
                )
                .unwrap()
            ),
            "p"
        );
        let e = resolve_with(&none, "to open x", env(&[("CBTFS_REPO_PASSWORD", "")])).unwrap_err();
        assert!(format!("{e:#}").contains("CBTFS_REPO_PASSWORD is set but empty"));
        assert!(resolve_with(&none, "", env(&[])).unwrap().is_none());
        // Both flags: refused, naming both.
        let both = SecretSources {
            key_file: Some(f.key1.clone()),
            password_file: Some(f.pw1.clone()),
        };
        let e = resolve_with(&both, "to open repository /r", env(&[])).unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.contains(&format!("--key-file {}", f.key1.display())),
            "{text}"
        );
        assert!(
            text.contains(&format!("--repo-password-file {}", f.pw1.display())),
            "{text}"
        );
        assert!(text.contains("to open repository /r"), "{text}");
    }

    #[test]
    fn password_lines() {
        assert_eq!(password_line(b"abc\n").unwrap(), "abc");
        assert_eq!(password_line(b"abc\r\n").unwrap(), "abc");
        assert_eq!(password_line(b"abc").unwrap(), "abc");
        assert_eq!(password_line(b" a b \n").unwrap(), " a b ");
        assert_eq!(password_line("pässwörd\n".as_bytes()).unwrap(), "pässwörd");
        assert!(password_line(b"\n").unwrap_err().contains("is empty"));
        assert!(password_line(b"\r\n").unwrap_err().contains("is empty"));
        assert!(password_line(b"").unwrap_err().contains("is empty"));
        assert!(password_line(&[0xff, b'\n']).unwrap_err().contains("UTF-8"));
        let long = vec![b'a'; 5000];
        assert!(
            password_line(&long)
                .unwrap_err()
                .contains("longer than 4096")
        );
    }

    #[test]
    fn password_files_first_line_and_errors_name_the_file_not_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret-value\r\nsecond line\n").unwrap();
        assert_eq!(read_password_file(&p).unwrap(), "s3cret-value");
        std::fs::write(&p, "s3cret-value").unwrap();
        assert_eq!(read_password_file(&p).unwrap(), "s3cret-value");
        std::fs::write(&p, "\ns3cret-value\n").unwrap();
        let e = read_password_file(&p).unwrap_err();
        let text = format!("{e:#}");
        assert_eq!(
            text,
            format!(
                "the password file {} is empty: its first line must be the password",
                p.display()
            )
        );
        assert!(!text.contains("s3cret"));
        let mut long = vec![b'x'; 5000];
        long.extend_from_slice(b"s3cret-value\n");
        std::fs::write(&p, &long).unwrap();
        let text = format!("{:#}", read_password_file(&p).unwrap_err());
        assert!(text.contains(&p.display().to_string()), "{text}");
        assert!(!text.contains("xxxx") && !text.contains("s3cret"), "{text}");
        let missing = dir.path().join("missing-pw");
        let text = format!("{:#}", read_password_file(&missing).unwrap_err());
        assert!(text.contains(&missing.display().to_string()), "{text}");
        let text = format!("{:#}", read_password_file(dir.path()).unwrap_err());
        assert!(text.contains("not a regular file"), "{text}");
        // Through resolve: the source is named as well.
        let sources = SecretSources {
            password_file: Some(missing.clone()),
            key_file: None,
        };
        let text = format!(
            "{:#}",
            resolve_with(&sources, "to open repository /r", env(&[])).unwrap_err()
        );
        assert!(
            text.contains("--repo-password-file to open repository /r"),
            "{text}"
        );
        assert!(text.contains(&missing.display().to_string()), "{text}");
    }

    #[test]
    fn key_file_errors_name_the_file_not_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k");
        std::fs::write(&k, "cbtfs-keyfile 1\nnot-base64-SECRETISH\n").unwrap();
        let sources = SecretSources {
            key_file: None,
            password_file: None,
        };
        let e = resolve_with(
            &sources,
            "to open x",
            env(&[("CBTFS_KEY_FILE", k.to_str().unwrap())]),
        )
        .unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("CBTFS_KEY_FILE to open x"), "{text}");
        assert!(
            text.contains(&format!("{} is not a cbtfs key file", k.display())),
            "{text}"
        );
        assert!(!text.contains("SECRETISH"), "{text}");
    }

    #[test]
    fn env_password_errors_do_not_quote_it() {
        use std::os::unix::ffi::OsStringExt;
        let bad = OsString::from_vec(vec![b's', b'e', b'c', 0xff]);
        let e = resolve_with(&SecretSources::default(), "to open x", move |k| {
            (k == "CBTFS_REPO_PASSWORD").then(|| bad.clone())
        })
        .unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("CBTFS_REPO_PASSWORD is not UTF-8"), "{text}");
        assert!(!text.contains("sec"), "{text}");
    }

    /// A pseudo-terminal: the controlling side (what a user types into) and the terminal.
    fn pty() -> (File, File) {
        use std::os::fd::FromRawFd;
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty writes two fds into the given ints; name/termios/winsize may be null.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both fds were just opened by openpty and are owned by nothing else.
        unsafe { (File::from_raw_fd(master), File::from_raw_fd(slave)) }
    }

    fn lflag(f: &File) -> libc::tcflag_t {
        // SAFETY: termios is plain data, filled by tcgetattr (checked).
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: the fd is open; `t` is a valid termios to write.
        assert_eq!(unsafe { libc::tcgetattr(f.as_raw_fd(), &mut t) }, 0);
        t.c_lflag
    }

    /// Wait (bounded) until the terminal's echo is off, as the prompt sets it before reading.
    fn wait_echo_off(master: &File) {
        for _ in 0..10_000 {
            if lflag(master) & libc::ECHO == 0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("echo was never turned off");
    }

    /// Read the terminal's output until `want` has appeared; returns all of it.
    fn read_until_seen(master: &mut File, want: &str) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&out).contains(want) {
            let n = master.read(&mut buf).unwrap();
            assert!(n > 0, "terminal closed before {want:?}");
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn prompt_reads_without_echo_and_restores_the_terminal() {
        let (mut master, mut slave) = pty();
        let before = lflag(&slave);
        assert_ne!(before & libc::ECHO, 0);
        let mut m2 = master.try_clone().unwrap();
        let typist = std::thread::spawn(move || {
            let shown = read_until_seen(&mut m2, "Password: ");
            wait_echo_off(&m2);
            m2.write_all(b"hunter2\n").unwrap();
            shown
        });
        let got = prompt_on(&mut slave, "Password: ", false).unwrap();
        let shown = typist.join().unwrap();
        assert!(matches!(&got, Secret::Password(p) if p == "hunter2"));
        assert_eq!(lflag(&slave), before, "terminal settings not restored");
        // What the terminal showed: the prompt and the newline, never the password.
        slave.write_all(b"END").unwrap();
        let rest = read_until_seen(&mut master, "END");
        let all = format!("{shown}{rest}");
        assert_eq!(all, "Password: \r\nEND");
    }

    #[test]
    fn confirm_mismatch_is_refused_and_restores_the_terminal() {
        let (master, mut slave) = pty();
        let before = lflag(&slave);
        let mut m2 = master.try_clone().unwrap();
        let typist = std::thread::spawn(move || {
            read_until_seen(&mut m2, "New password: ");
            wait_echo_off(&m2);
            m2.write_all(b"one\n").unwrap();
            read_until_seen(&mut m2, "New password (again): ");
            wait_echo_off(&m2);
            m2.write_all(b"two\r\n").unwrap();
        });
        let e = prompt_on(&mut slave, "New password: ", true).unwrap_err();
        typist.join().unwrap();
        let text = format!("{e:#}");
        assert_eq!(text, "the two passwords typed differ; nothing was changed");
        assert_eq!(lflag(&slave), before);
        drop(master);
    }

    #[test]
    fn empty_typed_password_is_refused() {
        let (master, mut slave) = pty();
        let before = lflag(&slave);
        let mut m2 = master.try_clone().unwrap();
        let typist = std::thread::spawn(move || {
            read_until_seen(&mut m2, "Password: ");
            wait_echo_off(&m2);
            m2.write_all(b"\n").unwrap();
        });
        let e = prompt_on(&mut slave, "Password: ", false).unwrap_err();
        typist.join().unwrap();
        assert!(format!("{e:#}").contains("the password is empty"), "{e:#}");
        assert_eq!(lflag(&slave), before);
    }
}
