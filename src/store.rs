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
        match fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("state file {} is not valid JSON: {e}", self.path.display())),
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

    /// Replaces the saved document atomically with `text` (already JSON).
    pub fn save_bytes(&self, text: &[u8]) -> Result<(), String> {
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let tmp = self.path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(text)?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            format!("cannot write state file {}: {e}", self.path.display())
        })
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
