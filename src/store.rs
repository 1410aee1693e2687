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

    /// The journal's entries, oldest first. A torn last line (a crash while appending)
    /// is ignored; any other unreadable line is an error.
    pub fn load_journal(&self) -> Result<Vec<Value>, String> {
        let path = self.journal_path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut out = Vec::with_capacity(lines.len());
        for (i, line) in lines.iter().enumerate() {
            match serde_json::from_str(line) {
                Ok(v) => out.push(v),
                Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => break,
                Err(e) => {
                    return Err(format!(
                        "{} line {}: not valid JSON: {e}",
                        path.display(),
                        i + 1
                    ))
                }
            }
        }
        Ok(out)
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
}
