//! `cbtfs export`: a restore point as a raw image, to a sparse file, a block device or stdout.
//!
//! Only the stored parts of the point are read: zero extents become holes in a new file (or
//! zeros on a stream or device). A file is written under a temporary name and renamed when
//! complete, so a failed export never leaves a plausible-looking image behind.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    pub size: u64,
    pub data_bytes: u64,
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

/// Export to a path: a new sparse file (renamed into place when complete), or a block device.
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
            });
        }
        Ok(_) if !force => return Err(ExportError::Exists { path: path.into() }),
        _ => {}
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "export".into());
    let tmp = path.with_file_name(format!(".{name}.cbtfs-partial"));
    let _ = fs::remove_file(&tmp);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| out_err("create", e))?;
    let result = (|| {
        file.set_len(size).map_err(|e| out_err("size", e))?;
        let data = export_positioned(reader, &file, &shown, progress)?;
        fs::rename(&tmp, path).map_err(|e| out_err("rename into", e))?;
        Ok(ExportReport {
            size,
            data_bytes: data,
        })
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Export as a stream (stdout): reads run one chunk ahead of writes.
pub fn export_to_writer(
    reader: &PointReader,
    out: &mut dyn Write,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ExportReport, ExportError> {
    let size = reader.size();
    let out_err = |source| ExportError::Output {
        op: "write",
        path: "standard output".into(),
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
    Ok(ExportReport { size, data_bytes })
}
