//! Persistence of the desired state: one JSON document, replaced atomically
//! (write to a temporary file, fsync, rename, fsync the directory).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Where the state lives.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    /// A store at `path` (created on first save, with its directory).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Store { path: path.into() }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the saved document, or `None` when there is none yet.
    pub fn load(&self) -> Result<Option<Value>, String> {
        self.load_text()?
            .map(|bytes| {
                serde_json::from_slice(&bytes).map_err(|e| {
                    format!("state file {} is not valid JSON: {e}", self.path.display())
                })
            })
            .transpose()
    }

    /// The saved document's text, or `None` when there is none yet.
    pub fn load_text(&self) -> Result<Option<Vec<u8>>, String> {
        match fs::read(&self.path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!(
                "cannot read state file {}: {e}",
                self.path.display()
            )),
        }
    }

    /// Replaces the saved document atomically.
    pub fn save(&self, doc: &Value) -> Result<(), String> {
        let mut text = serde_json::to_vec(doc).map_err(|e| e.to_string())?;
        text.push(b'\n');
        self.save_bytes(&text)
    }

    /// The journal beside the snapshot: one JSON change per line, appended and fsynced
    /// after each accepted change, folded into a new snapshot from time to time.
    pub fn journal_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".journal");
        PathBuf::from(p)
    }

    /// The journal's entries, oldest first. A torn last line (a crash or a full disk
    /// while appending) is ignored; any other unreadable line is an error.
    /// [`Store::recover`] removes such a tail before anything is appended again.
    pub fn load_journal(&self) -> Result<Vec<Value>, String> {
        let path = self.journal_path();
        let bytes = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let scan = scan_journal(&bytes)
            .map_err(|(line, e)| format!("{} line {line}: not valid JSON: {e}", path.display()))?;
        Ok(scan.entries)
    }

    /// Makes the files safe to start from and to append to after a crash: removes a
    /// snapshot that was being written (its temporary file), and cuts a torn last line
    /// off the journal (fsynced), so that the next entry does not land after it and
    /// make it a torn line in the middle. Returns what was done, for the log.
    pub fn recover(&self) -> Result<Vec<String>, String> {
        let mut done = Vec::new();
        match fs::remove_file(self.tmp_path()) {
            Ok(()) => done.push(format!(
                "removed {}, a snapshot left unfinished by a crash",
                self.tmp_path().display()
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove {}: {e}", self.tmp_path().display())),
        }
        let path = self.journal_path();
        let bytes = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let scan = scan_journal(&bytes)
            .map_err(|(line, e)| format!("{} line {line}: not valid JSON: {e}", path.display()))?;
        let fix = || -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new().write(true).open(&path)?;
            if scan.complete < bytes.len() {
                f.set_len(scan.complete as u64)?;
            }
            if scan.complete > 0 && bytes[scan.complete - 1] != b'\n' {
                // A whole entry whose newline did not make it: keep it, end the line.
                use std::io::{Seek, SeekFrom};
                f.seek(SeekFrom::End(0))?;
                f.write_all(b"\n")?;
            }
            f.sync_all()
        };
        if scan.complete < bytes.len() || (scan.complete > 0 && bytes[scan.complete - 1] != b'\n') {
            fix().map_err(|e| format!("cannot repair {}: {e}", path.display()))?;
            done.push(format!(
                "cut a torn last entry ({} bytes) off {}",
                bytes.len() - scan.complete,
                path.display()
            ));
        }
        Ok(done)
    }

    /// Takes the lock that makes this daemon the only one using the state file (an
    /// exclusive `flock` on `<state file>.lock`, which names the holder's PID). Held
    /// until the returned file is dropped (or the process ends, however it ends).
    pub fn lock(&self) -> Result<File, String> {
        let path = self.lock_path();
        fs::create_dir_all(self.dir())
            .map_err(|e| format!("cannot create {}: {e}", self.dir().display()))?;
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let holder = fs::read_to_string(&path).unwrap_or_default();
                return Err(format!(
                    "state file {} is in use by another nftlb (PID {}); one daemon per state file",
                    self.path.display(),
                    holder.trim()
                ));
            }
            return Err(format!("cannot lock {}: {e}", path.display()));
        }
        let write = |f: &mut File| -> std::io::Result<()> {
            f.set_len(0)?;
            f.write_all(format!("{}\n", std::process::id()).as_bytes())
        };
        write(&mut f).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(f)
    }

    /// Appends one entry (a line of JSON) to the journal and makes it durable.
    pub fn append(&self, entry: &[u8]) -> Result<(), String> {
        let path = self.journal_path();
        let new = !path.exists();
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(dir)?;
            }
            let mut f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            let mut line = entry.to_vec();
            line.push(b'\n');
            f.write_all(&line)?;
            f.sync_data()?;
            if new {
                if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    File::open(dir)?.sync_all()?;
                }
            }
            Ok(())
        };
        write().map_err(|e| format!("cannot append to {}: {e}", path.display()))
    }

    /// Replaces the saved document atomically with `text` (already JSON), then drops the
    /// journal it supersedes.
    pub fn save_bytes(&self, text: &[u8]) -> Result<(), String> {
        self.prepare(text)?;
        self.install()
    }

    /// Writes a new snapshot beside the state file (synced), without replacing it yet:
    /// [`Store::install`] does that, [`Store::discard`] drops it. Lets the snapshot be
    /// written while the kernel applies the change it records.
    pub fn prepare(&self, text: &[u8]) -> Result<(), String> {
        self.prepare_with(|w| w.write_all(text))
    }

    /// [`Store::prepare`] with the text written by `write` (straight to the file).
    pub fn prepare_with<R>(
        &self,
        write: impl FnOnce(&mut std::io::BufWriter<File>) -> std::io::Result<R>,
    ) -> Result<R, String> {
        fs::create_dir_all(self.dir())
            .map_err(|e| format!("cannot create {}: {e}", self.dir().display()))?;
        let run = || -> std::io::Result<R> {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, File::create(self.tmp_path())?);
            let r = write(&mut w)?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            Ok(r)
        };
        run().map_err(|e| {
            self.discard();
            format!("cannot write state file {}: {e}", self.path.display())
        })
    }

    /// Makes the prepared snapshot the state file and removes the journal it replaces.
    pub fn install(&self) -> Result<(), String> {
        let rename = || -> std::io::Result<()> {
            fs::rename(self.tmp_path(), &self.path)?;
            File::open(self.dir())?.sync_all()
        };
        rename().map_err(|e| {
            self.discard();
            format!("cannot write state file {}: {e}", self.path.display())
        })?;
        match fs::remove_file(self.journal_path()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("cannot remove the old journal: {e}")),
        }
    }

    /// Drops a prepared snapshot.
    pub fn discard(&self) {
        let _ = fs::remove_file(self.tmp_path());
    }

    fn lock_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".lock");
        PathBuf::from(p)
    }

    fn tmp_path(&self) -> PathBuf {
        self.path.with_extension("json.tmp")
    }

    fn dir(&self) -> &Path {
        self.path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    }
}

/// The readable part of a journal.
struct Scan {
    entries: Vec<Value>,
    /// Bytes up to the end of the last whole entry (its newline included if present).
    complete: usize,
}

/// Reads journal bytes: every line must be JSON, except a last line without its
/// newline (torn by a crash), which is left out. A torn line in the middle is an error
/// (line number, parse error).
fn scan_journal(bytes: &[u8]) -> Result<Scan, (usize, String)> {
    let mut entries = Vec::new();
    let mut complete = 0;
    let mut start = 0;
    let mut line_no = 0;
    while start < bytes.len() {
        let end = bytes[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| start + i);
        let line = &bytes[start..end.unwrap_or(bytes.len())];
        line_no += 1;
        if !line.iter().all(u8::is_ascii_whitespace) {
            match serde_json::from_slice::<Value>(line) {
                Ok(v) => entries.push(v),
                Err(_) if end.is_none() => break,
                Err(e) => return Err((line_no, e.to_string())),
            }
        }
        match end {
            Some(e) => {
                start = e + 1;
                complete = start;
            }
            None => {
                complete = bytes.len();
                break;
            }
        }
    }
    Ok(Scan { entries, complete })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_load() {
        let dir = std::env::temp_dir().join(format!("nftlb-store-{}", std::process::id()));
        let s = Store::new(dir.join("sub/state.json"));
        assert_eq!(s.load().unwrap(), None);
        let v = serde_json::json!({"farms":[{"name":"a"}]});
        s.save(&v).unwrap();
        assert_eq!(s.load().unwrap(), Some(v));
        assert!(!dir.join("sub/state.json.tmp").exists());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn journal_torn_at_every_byte_recovers() {
        let dir = std::env::temp_dir().join(format!("nftlb-journal-{}", std::process::id()));
        let s = Store::new(dir.join("state.json"));
        let entries: Vec<String> = (1..=5)
            .map(|i| format!("{{\"seq\":{i},\"farms\":[{{\"name\":\"f{i}\"}}]}}"))
            .collect();
        let full: String = entries.iter().map(|e| format!("{e}\n")).collect();
        for cut in 0..=full.len() {
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            fs::write(s.journal_path(), &full.as_bytes()[..cut]).unwrap();
            fs::write(s.tmp_path(), b"{\"farms\":[").unwrap();
            let before = s.load_journal().unwrap();
            s.recover().unwrap();
            assert!(!s.tmp_path().exists(), "cut {cut}: temporary snapshot left");
            let after = s.load_journal().unwrap();
            assert_eq!(before, after, "cut {cut}: recovery changed the entries");
            // Whole entries survive; appending after recovery gives a readable journal.
            let whole = full.as_bytes()[..cut]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            assert!(
                after.len() == whole || after.len() == whole + 1,
                "cut {cut}"
            );
            s.append(b"{\"seq\":6}").unwrap();
            let again = s.load_journal().unwrap();
            assert_eq!(again.len(), after.len() + 1, "cut {cut}");
            assert_eq!(again.last().unwrap()["seq"], 6);
        }
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn torn_line_in_the_middle_is_an_error() {
        let dir = std::env::temp_dir().join(format!("nftlb-journal-mid-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let s = Store::new(dir.join("state.json"));
        fs::write(s.journal_path(), b"{\"seq\":1}\n{\"seq\":\n{\"seq\":3}\n").unwrap();
        let e = s.load_journal().unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        assert!(s.recover().is_err());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn second_lock_is_refused_with_the_holder() {
        let dir = std::env::temp_dir().join(format!("nftlb-lock-{}", std::process::id()));
        let s = Store::new(dir.join("state.json"));
        let held = s.lock().unwrap();
        let e = s.lock().unwrap_err();
        assert!(e.contains(&format!("PID {}", std::process::id())), "{e}");
        drop(held);
        s.lock().unwrap();
        fs::remove_dir_all(dir).unwrap();
    }
}
