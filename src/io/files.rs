//! Writing what a user keeps, so that nothing is lost: every output file and folder is written
//! under a temporary name beside its destination, synced, and renamed into place; a path that holds
//! something other than a regular file (a device node, a FIFO, a folder, a link) is never replaced;
//! a folder that a long job writes into is locked for the job's lifetime; and the temporaries that a
//! killed run leaves behind are ours to clean.
//!
//! Temporary names: `.NAME.roentgen-tmp-PID` for files and folders alike (hidden, and carrying the
//! writer's process id, so a cleaner can tell a dead writer's leftovers from a live one's work).

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The infix that marks our temporaries.
const TMP_MARK: &str = ".roentgen-tmp-";

/// The folder a path's entry lives in ("." for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// The temporary name this process uses for `dest` (a file or a folder), in `dest`'s folder.
pub fn temp_path(dest: &Path) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    parent_dir(dest).join(format!(".{name}{TMP_MARK}{}", std::process::id()))
}

/// What `--overwrite`-style flags allow at an output path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// An existing regular file is an error (a run never silently replaces an earlier result).
    Refuse,
    /// An existing regular file is replaced atomically.
    Replace,
}

/// Checks, before any work, that `path` can receive an output file: nothing there, or (with
/// `Existing::Replace`) a regular file. `field` names the setting that chose the path, for the
/// message (as a `$field` reference: see `diag`).
pub fn check_output_file(path: &Path, existing: Existing, field: &str) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("${field} {}: cannot inspect the path: {e}", path.display()),
        Ok(m) if !m.file_type().is_file() => bail!(
            "${field} {}: exists and is not a regular file ({}); refusing to replace it",
            path.display(),
            kind_of(&m)
        ),
        Ok(_) if existing == Existing::Refuse => {
            bail!("${field} {}: the file exists; pass $overwrite to replace it", path.display())
        }
        Ok(_) => {}
    }
    let dir = parent_dir(path);
    if !dir.is_dir() {
        bail!("${field} {}: the folder {} does not exist", path.display(), dir.display());
    }
    Ok(())
}

/// A word for what a non-regular file is, for messages.
pub fn kind_of(m: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_dir() {
        "a folder"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a regular file"
    }
}

/// Checks that `path` is a regular file that can be read (a FIFO or `/dev/zero` would block or
/// never end; "no such file" is a different message from "not a file").
pub fn check_input_file(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("{}: no such file", path.display()),
        Err(e) => bail!("{}: cannot read: {e}", path.display()),
        Ok(m) if !m.is_file() => bail!("{}: is {}, not a regular file", path.display(), kind_of(&m)),
        Ok(_) => Ok(()),
    }
}

/// Flushes a folder's entries (a rename is durable only once its folder is synced).
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("{}: cannot sync the folder", dir.display()))
}

/// Writes `dest` atomically: `write` fills a temporary file beside it, which is synced and renamed
/// over `dest` (only if `dest` is absent or a regular file), and the folder is synced. On any error
/// the temporary is removed and `dest` is untouched.
pub fn write_atomic(dest: &Path, write: impl FnOnce(&mut BufWriter<File>) -> Result<()>) -> Result<()> {
    let tmp = temp_path(dest);
    let result = (|| -> Result<()> {
        let file = create_new(&tmp)?;
        let mut w = BufWriter::new(file);
        write(&mut w).with_context(|| format!("{}: cannot write", dest.display()))?;
        let file =
            w.into_inner().map_err(|e| e.into_error()).with_context(|| format!("{}: cannot write", dest.display()))?;
        file.sync_all().with_context(|| format!("{}: cannot write (sync)", dest.display()))?;
        rename_into_place(&tmp, dest)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Creates `path` exclusively: whatever else has that name (a FIFO, whose opening would block; a
/// folder; a link) is never opened. A regular file there is a dead writer's temporary under our
/// own (recycled) process id, and is replaced.
fn create_new(path: &Path) -> Result<File> {
    let open = || std::fs::OpenOptions::new().write(true).create_new(true).open(path);
    match open() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let m = std::fs::symlink_metadata(path).with_context(|| format!("{}: cannot create", path.display()))?;
            if !m.file_type().is_file() {
                bail!("{}: exists and is {}; refusing to use it as a temporary file", path.display(), kind_of(&m));
            }
            std::fs::remove_file(path)
                .with_context(|| format!("{}: cannot remove a stale temporary", path.display()))?;
            open().with_context(|| format!("{}: cannot create", path.display()))
        }
        r => r.with_context(|| format!("{}: cannot create", path.display())),
    }
}

/// `write_atomic` of a byte buffer.
pub fn write_bytes_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(dest, |w| Ok(w.write_all(bytes)?))
}

/// Renames a finished temporary (file or folder) over `dest` and syncs the folder. Refuses to
/// replace anything but a regular file (a folder destination must be absent: see `replace_dir`).
pub fn rename_into_place(tmp: &Path, dest: &Path) -> Result<()> {
    if let Ok(m) = std::fs::symlink_metadata(dest) {
        if !m.file_type().is_file() {
            bail!("{}: exists and is {}; refusing to replace it", dest.display(), kind_of(&m));
        }
    }
    std::fs::rename(tmp, dest).with_context(|| format!("{}: cannot rename into place", dest.display()))?;
    sync_dir(parent_dir(dest))
}

/// Moves a finished temporary folder to `dest`, replacing an existing folder there only after the
/// new one is complete (the old one is moved aside, then removed).
pub fn replace_dir(tmp: &Path, dest: &Path) -> Result<()> {
    sync_tree(tmp)?;
    match std::fs::symlink_metadata(dest) {
        Ok(m) if m.file_type().is_dir() => {
            let old = parent_dir(dest).join(format!(
                ".{}.roentgen-old-{}",
                dest.file_name().unwrap_or_default().to_string_lossy(),
                std::process::id()
            ));
            std::fs::rename(dest, &old).with_context(|| format!("{}: cannot move aside", dest.display()))?;
            std::fs::rename(tmp, dest).with_context(|| format!("{}: cannot rename into place", dest.display()))?;
            sync_dir(parent_dir(dest))?;
            std::fs::remove_dir_all(&old).ok();
        }
        Ok(m) => bail!("{}: exists and is {}; refusing to replace it", dest.display(), kind_of(&m)),
        Err(_) => {
            std::fs::rename(tmp, dest).with_context(|| format!("{}: cannot rename into place", dest.display()))?;
            sync_dir(parent_dir(dest))?;
        }
    }
    Ok(())
}

/// Syncs every file and folder under `dir` (before a folder is renamed into place, so that a crash
/// after the rename cannot leave a checkpoint whose files are empty).
pub fn sync_tree(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot read", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            sync_tree(&p)?;
        } else {
            File::open(&p).and_then(|f| f.sync_all()).with_context(|| format!("{}: cannot sync", p.display()))?;
        }
    }
    sync_dir(dir)
}

/// Whether a process id belongs to a running process (Linux: /proc; elsewhere assumed alive, so
/// nothing of a possibly live writer is removed).
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc = Path::new("/proc");
    if !proc.is_dir() {
        return true;
    }
    proc.join(pid.to_string()).exists()
}

/// The writer's pid of one of our temporaries, by name: today's `.NAME.roentgen-tmp-PID` and
/// `.NAME.roentgen-old-PID`, and the names earlier versions used (`.tmp-NAME-PID` and
/// `.old-NAME-PID` checkpoint folders, `NAME.png.tmp`, `NAME.safetensors.tmp`, `NAME.export-tmp`,
/// `NAME.tmpPID`), whose writer is unknown (None: treated as dead once no lock is held).
fn leftover(name: &str) -> Option<Option<u32>> {
    let pid_after = |s: &str| s.parse::<u32>().ok();
    for mark in [TMP_MARK, ".roentgen-old-"] {
        if let Some(i) = name.find(mark) {
            if name.starts_with('.') {
                return Some(pid_after(&name[i + mark.len()..]));
            }
        }
    }
    for prefix in [".tmp-checkpoint-", ".old-checkpoint-"] {
        if let Some(rest) = name.strip_prefix(prefix) {
            return Some(rest.rsplit_once('-').and_then(|(_, p)| pid_after(p)));
        }
    }
    if name.ends_with(".png.tmp") || name.ends_with(".safetensors.tmp") || name.ends_with(".export-tmp") {
        return Some(None);
    }
    None
}

/// Removes the temporaries that dead writers left in `dir` (a killed run, a full disk) and returns
/// what was removed. Live writers' temporaries are kept; anything not named like ours is never
/// touched. Callers that hold the folder's lock may pass `exclusive` to also remove temporaries of
/// unknown writers.
pub fn clean_leftovers(dir: &Path, exclusive: bool) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(removed) };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = leftover(&name) else { continue };
        let dead = match pid {
            Some(p) => !process_alive(p) || (exclusive && p != std::process::id()),
            None => exclusive,
        };
        if !dead {
            continue;
        }
        let p = e.path();
        let r = match e.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p),
            _ => std::fs::remove_file(&p),
        };
        r.with_context(|| format!("{}: cannot remove a leftover temporary", p.display()))?;
        removed.push(p);
    }
    Ok(removed)
}

/// An exclusive lock on a folder that a job writes into (`.roentgen.lock` inside it), held until
/// dropped. The lock is the operating system's (flock), so a killed holder releases it; the file's
/// text says who holds it, for the message another run gets.
pub struct FolderLock {
    _file: File,
    pub path: PathBuf,
}

impl FolderLock {
    pub const FILE: &'static str = ".roentgen.lock";

    /// Locks `dir` (which must exist) or fails naming the holder.
    pub fn acquire(dir: &Path, job: &str) -> Result<FolderLock> {
        let path = dir.join(Self::FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("{}: cannot open the folder's lock file", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                bail!(
                    "{}: the folder is in use by another roentgen run ({}); wait for it to finish or choose another folder",
                    dir.display(),
                    if holder.is_empty() { "holder unknown".to_string() } else { holder.to_string() }
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("{}: cannot lock", path.display()));
            }
        }
        let started =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let text = format!(
            "pid {} on {}, `roentgen {job}`, started at unix time {started}\n",
            std::process::id(),
            if host.trim().is_empty() { "this machine" } else { host.trim() }
        );
        file.set_len(0).and_then(|_| file.write_all(text.as_bytes())).and_then(|_| file.flush()).ok();
        Ok(FolderLock { _file: file, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftover_names_are_recognised_and_others_are_not() {
        assert_eq!(leftover(".a.png.roentgen-tmp-12"), Some(Some(12)));
        assert_eq!(leftover(".checkpoint-3.roentgen-old-7"), Some(Some(7)));
        assert_eq!(leftover(".tmp-checkpoint-30-4711"), Some(Some(4711)));
        assert_eq!(leftover("x.png.tmp"), Some(None));
        assert_eq!(leftover("checkpoint-30"), None);
        assert_eq!(leftover("train_log.jsonl"), None);
        assert_eq!(leftover("a.roentgen-tmp-3"), None, "not hidden: not ours");
    }
}
