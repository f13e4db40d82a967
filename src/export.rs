//! `cbtfs export`: a restore point as a raw image, to a sparse file, a block device, a character
//! device or pipe, or stdout; or as a qcow2/VHD/VHDX/VMDK/VDI image through `qemu-img convert`.
//!
//! Only the stored parts of the point are read: zero extents become holes in a new file (or
//! zeros on a stream or device). A file is written under a temporary name and renamed when
//! complete, so a failed export never leaves a plausible-looking image behind. A conversion
//! writes a sparse raw image beside the target (private, removed on every way out, a signal
//! included once `remove_partial_files_on_signals` was called), converts it into a second
//! temporary name and renames that into place.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::mpsc;

use crate::chain::Extent;
use crate::read::{PointReader, ReadError};

/// Export work is cut into pieces of at most this many bytes.
const CHUNK: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Read(#[from] Box<ReadError>),
    #[error("{path} exists; choose another name, or pass --force to replace it")]
    Exists { path: PathBuf },
    #[error("{path} is a directory; name the image file to write (e.g. {path}/disk.raw)")]
    IsDirectory { path: PathBuf },
    #[error(
        "writing a {format} image needs qemu-img, which is not installed: install it (qemu-utils on Debian/Ubuntu, qemu-img on XCP-ng/CentOS) or name the file .raw (or pass --format raw); nothing was written"
    )]
    NoQemuImg { format: &'static str },
    #[error(
        "{path} is not a regular file: a {format} image can only be written to a file (devices and pipes get raw bytes: --format raw); nothing was written"
    )]
    NotAFile { path: PathBuf, format: &'static str },
    #[error("qemu-img could not convert the export into {format} at {path}: {detail}")]
    Convert {
        path: PathBuf,
        format: &'static str,
        detail: String,
    },
    #[error("{op} {path}: {source}")]
    Output {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ExportReport {
    /// The disk's size (the raw image's length).
    pub size: u64,
    /// Bytes read from the point and written (all of them on a stream).
    pub data_bytes: u64,
    /// Written as a stream (every byte, zeros included), not as a sparse file or device.
    pub stream: bool,
}

/// The image formats `export` writes: raw itself, the others through `qemu-img convert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
    /// VHD (qemu-img calls it vpc).
    Vpc,
    Vhdx,
    Vmdk,
    Vdi,
}

impl ImageFormat {
    /// By qemu-img's name (`raw`, `qcow2`, `vpc`, `vhdx`, `vmdk`, `vdi`).
    pub fn from_name(name: &str) -> Option<ImageFormat> {
        Some(match name {
            "raw" => ImageFormat::Raw,
            "qcow2" => ImageFormat::Qcow2,
            "vpc" => ImageFormat::Vpc,
            "vhdx" => ImageFormat::Vhdx,
            "vmdk" => ImageFormat::Vmdk,
            "vdi" => ImageFormat::Vdi,
            _ => return None,
        })
    }

    /// By the file name's extension (`.qcow2`, `.vhd`, `.vhdx`, `.vmdk`, `.vdi`, any case);
    /// anything else is raw.
    pub fn for_path(path: &Path) -> ImageFormat {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("qcow2") => ImageFormat::Qcow2,
            Some("vhd") => ImageFormat::Vpc,
            Some("vhdx") => ImageFormat::Vhdx,
            Some("vmdk") => ImageFormat::Vmdk,
            Some("vdi") => ImageFormat::Vdi,
            _ => ImageFormat::Raw,
        }
    }

    /// The format's common name (`VHD` for qemu-img's `vpc`).
    pub fn label(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vpc => "VHD",
            ImageFormat::Vhdx => "VHDX",
            ImageFormat::Vmdk => "VMDK",
            ImageFormat::Vdi => "VDI",
        }
    }

    /// qemu-img's name of the format.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vpc => "vpc",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vdi => "vdi",
        }
    }
}

/// Pieces of the point that hold data, each at most `CHUNK` long.
fn data_chunks(reader: &PointReader) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut cur: Option<(u64, u64)> = None;
    reader.map().for_each_extent(0, reader.size(), |e| {
        if let Extent::Stored { offset, len, .. } = e {
            match &mut cur {
                Some((o, l)) if *o + *l == offset => *l += len,
                _ => {
                    if let Some(c) = cur.take() {
                        out.push(c);
                    }
                    cur = Some((offset, len));
                }
            }
        }
    });
    out.extend(cur);
    out.into_iter()
        .flat_map(|(o, l)| {
            (0..l.div_ceil(CHUNK)).map(move |i| (o + i * CHUNK, (l - i * CHUNK).min(CHUNK)))
        })
        .collect()
}

/// Write the point into `out` (positioned writes), using every core.
fn export_positioned(
    reader: &PointReader,
    out: &File,
    path: &str,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64, ExportError> {
    let chunks = data_chunks(reader);
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<ExportError>> = Mutex::new(None);
    let done = std::sync::atomic::AtomicU64::new(0);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let mut buf = vec![0u8; CHUNK as usize];
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(off, len)) = chunks.get(i) else {
                        break;
                    };
                    let b = &mut buf[..len as usize];
                    let r = reader
                        .read_at(b, off)
                        .map_err(ExportError::from)
                        .and_then(|_| {
                            out.write_all_at(b, off)
                                .map_err(|source| ExportError::Output {
                                    op: "write",
                                    path: path.to_string(),
                                    source,
                                })
                        });
                    match r {
                        Ok(()) => progress(done.fetch_add(len, Ordering::Relaxed) + len),
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            if let Ok(mut slot) = first_error.lock() {
                                slot.get_or_insert(e);
                            }
                        }
                    }
                }
            });
        }
    });
    match first_error.into_inner() {
        Ok(Some(e)) => Err(e),
        _ => Ok(done.into_inner()),
    }
}

/// Export to a path: a new sparse file (renamed into place when complete), a block device, or a
/// character device or pipe (written as a stream, like standard output).
pub fn export_to_path(
    reader: &PointReader,
    path: &Path,
    force: bool,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ExportReport, ExportError> {
    let shown = path.display().to_string();
    let out_err = |op, source| ExportError::Output {
        op,
        path: shown.clone(),
        source,
    };
    let size = reader.size();
    match fs::metadata(path) {
        Ok(md) if md.file_type().is_block_device() => {
            let dev = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| out_err("open", e))?;
            let data = export_positioned(reader, &dev, &shown, progress)?;
            // A device keeps old bytes: write the zero extents too.
            let zeros = vec![0u8; CHUNK as usize];
            for e in reader.map().extents(0, size) {
                if let Extent::Zero { offset, len } = e {
                    let mut pos = offset;
                    while pos < offset + len {
                        let n = (offset + len - pos).min(CHUNK);
                        dev.write_all_at(&zeros[..n as usize], pos)
                            .map_err(|e| out_err("write", e))?;
                        pos += n;
                    }
                }
            }
            dev.sync_all().map_err(|e| out_err("flush", e))?;
            return Ok(ExportReport {
                size,
                data_bytes: data,
                stream: false,
            });
        }
        Ok(md) if md.file_type().is_char_device() || md.file_type().is_fifo() => {
            // /dev/null, a tape, a named pipe read by another program: a stream of every byte.
            let mut dev = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| out_err("open", e))?;
            return export_to_stream(reader, &mut dev, &shown, progress);
        }
        Ok(md) if md.is_dir() => return Err(ExportError::IsDirectory { path: path.into() }),
        Ok(_) if !force => return Err(ExportError::Exists { path: path.into() }),
        _ => {}
    }
    let tmp = Partial::new(path, "cbtfs-partial");
    let _ = fs::remove_file(&tmp.0);
    let report = write_sparse(reader, &tmp.0, &shown, progress)?;
    fs::rename(&tmp.0, path).map_err(|e| out_err("rename into", e))?;
    tmp.done();
    Ok(report)
}

/// Write the point as a new sparse raw file at `tmp` (which must not exist), mode 0600.
fn write_sparse(
    reader: &PointReader,
    tmp: &Path,
    shown: &str,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ExportReport, ExportError> {
    let out_err = |op, source| ExportError::Output {
        op,
        path: shown.to_string(),
        source,
    };
    let size = reader.size();
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(|e| out_err("create", e))?;
    file.set_len(size).map_err(|e| out_err("size", e))?;
    let data = export_positioned(reader, &file, shown, progress)?;
    Ok(ExportReport {
        size,
        data_bytes: data,
        stream: false,
    })
}

/// Temporary files of exports in progress, removed if a signal ends the process.
static PARTIAL_FILES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// The running `qemu-img` (0: none), killed if a signal ends the process.
static CONVERTER: AtomicI32 = AtomicI32::new(0);
/// Set by the signal watcher before it stops qemu-img: the export must then leave the exit to
/// the watcher (128 + the signal), not report qemu-img's death as a failure (exit 1).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// A temporary file beside an export's target: `.<name>.<tag>`, removed when dropped unless
/// `done` (renamed into place).
struct Partial(PathBuf);

impl Partial {
    fn new(target: &Path, tag: &str) -> Partial {
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "export".into());
        let p = target.with_file_name(format!(".{name}.{tag}"));
        if let Ok(mut v) = PARTIAL_FILES.lock() {
            v.push(p.clone());
        }
        Partial(p)
    }

    fn forget(&self) {
        if let Ok(mut v) = PARTIAL_FILES.lock() {
            v.retain(|x| x != &self.0);
        }
    }

    /// The file was renamed into place: nothing to remove.
    fn done(self) {
        self.forget();
        std::mem::forget(self);
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
        self.forget();
    }
}

/// On SIGINT, SIGTERM or SIGHUP, remove the temporary files of exports in progress (and stop a
/// running qemu-img) before exiting with 128 + the signal, so an interrupted export leaves
/// nothing behind. Call from the main thread before other threads start.
pub fn remove_partial_files_on_signals() {
    let set = crate::mount::signal_set();
    // SAFETY: blocks the signals in this thread; threads started later inherit the mask, so only
    // the watcher below receives them (std resets the mask of the programs it starts).
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: waits for one of the blocked signals with a valid set and output pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            return;
        }
        INTERRUPTED.store(true, Ordering::SeqCst);
        let pid = CONVERTER.load(Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill(2) of our own child's pid; at worst it has exited (ESRCH), never
            // reused before we reap it, which only this process does.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let files = PARTIAL_FILES.lock().map(|v| v.clone()).unwrap_or_default();
        for f in files {
            let _ = fs::remove_file(f);
        }
        std::process::exit(128 + sig);
    });
}

/// Where qemu-img is, if it is on PATH.
fn find_qemu_img() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-img"))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Export as an image of `format` (not raw) at `path`: a sparse raw export beside it, converted
/// by `qemu-img convert`. Fails before writing anything when qemu-img is missing, when `path`
/// exists and `force` is not given, or when `path` is not a regular file.
pub fn export_converted(
    reader: &PointReader,
    path: &Path,
    format: ImageFormat,
    force: bool,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ExportReport, ExportError> {
    let fname = format.name();
    let qemu_img = find_qemu_img().ok_or(ExportError::NoQemuImg { format: fname })?;
    match fs::metadata(path) {
        Ok(md) if md.is_dir() => return Err(ExportError::IsDirectory { path: path.into() }),
        Ok(md) if !md.is_file() => {
            return Err(ExportError::NotAFile {
                path: path.into(),
                format: fname,
            });
        }
        Ok(_) if !force => return Err(ExportError::Exists { path: path.into() }),
        _ => {}
    }
    let shown = path.display().to_string();
    let raw = Partial::new(path, "cbtfs-raw-partial");
    let out = Partial::new(path, "cbtfs-partial");
    let _ = fs::remove_file(&raw.0);
    let _ = fs::remove_file(&out.0);
    let report = write_sparse(reader, &raw.0, &shown, progress)?;
    let convert_err = |detail: String| ExportError::Convert {
        path: path.into(),
        format: fname,
        detail,
    };
    let mut cmd = std::process::Command::new(&qemu_img);
    cmd.args(["convert", "-q", "-f", "raw", "-O", fname]);
    if format == ImageFormat::Vpc {
        // VHD sizes otherwise round up to a CHS geometry: the image would be larger than the
        // disk, and a restore of it refused for its size.
        cmd.args(["-o", "force_size=on"]);
    }
    let child = cmd
        .arg(&raw.0)
        .arg(&out.0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| convert_err(format!("cannot run {}: {e}", qemu_img.display())))?;
    CONVERTER.store(child.id() as i32, Ordering::SeqCst);
    let waited = child.wait_with_output();
    CONVERTER.store(0, Ordering::SeqCst);
    if INTERRUPTED.load(Ordering::SeqCst) {
        // qemu-img was stopped by the signal watcher, which is removing the temporary files
        // and then exits the process with 128 + the signal: wait for it.
        loop {
            std::thread::park();
        }
    }
    let output = waited.map_err(|e| convert_err(format!("waiting for qemu-img: {e}")))?;
    if !output.status.success() {
        let text = String::from_utf8_lossy(&output.stderr);
        return Err(convert_err(format!(
            "{} ({})",
            text.trim().replace('\n', "; "),
            output.status
        )));
    }
    drop(raw);
    let out_err = |op, source| ExportError::Output {
        op,
        path: shown.clone(),
        source,
    };
    // Private like a raw export: a disk image holds the guest's secrets.
    fs::set_permissions(&out.0, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| out_err("set the mode of", e))?;
    fs::rename(&out.0, path).map_err(|e| out_err("rename into", e))?;
    out.done();
    Ok(report)
}

/// Export as a stream to standard output: reads run one chunk ahead of writes.
pub fn export_to_writer(
    reader: &PointReader,
    out: &mut dyn Write,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ExportReport, ExportError> {
    export_to_stream(reader, out, "standard output", progress)
}

/// Export as a stream to `out` (named `name` in errors): reads run one chunk ahead of writes.
fn export_to_stream(
    reader: &PointReader,
    out: &mut dyn Write,
    name: &str,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ExportReport, ExportError> {
    let size = reader.size();
    let out_err = |source| ExportError::Output {
        op: "write",
        path: name.into(),
        source,
    };
    let (tx, rx) = mpsc::sync_channel::<Result<Vec<u8>, Box<ReadError>>>(2);
    let mut data_bytes = 0;
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut pos = 0;
            while pos < size {
                let len = (size - pos).min(CHUNK);
                let mut buf = vec![0u8; len as usize];
                let r = reader.read_at(&mut buf, pos).map(|_| buf);
                let failed = r.is_err();
                if tx.send(r).is_err() || failed {
                    return;
                }
                pos += len;
            }
        });
        let mut done = 0;
        for r in rx {
            let buf = r?;
            out.write_all(&buf).map_err(out_err)?;
            done += buf.len() as u64;
            progress(done);
        }
        data_bytes = done;
        out.flush().map_err(out_err)?;
        Ok::<(), ExportError>(())
    })?;
    Ok(ExportReport {
        size,
        data_bytes,
        stream: true,
    })
}
