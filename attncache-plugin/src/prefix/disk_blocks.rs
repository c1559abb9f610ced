//! [`DiskBlocks`]: prefix blocks as files in a directory (`<key>.kvb`), within a byte
//! budget, least recently used removed first; they survive restarts.
//!
//! The directory is scanned once at start (names and sizes only; contents are checked when
//! read). A write goes to a temporary file renamed into place, so a crash leaves either the
//! old file, the new one or a temporary file that the next start removes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use super::cold::{BlockTier, BlockTierError};

const SUFFIX: &str = ".kvb";
const TMP_SUFFIX: &str = ".kvb.tmp";

/// Files held and their order of last use.
#[derive(Default)]
struct Index {
    /// key → (bytes, last-use tick)
    files: HashMap<u64, (u64, u64)>,
    /// last-use tick → key
    order: BTreeMap<u64, u64>,
    total: u64,
    tick: u64,
}

impl Index {
    fn touch(&mut self, key: u64, bytes: Option<u64>) {
        self.tick += 1;
        let tick = self.tick;
        let old = self.files.get(&key).copied();
        if let Some((old_bytes, old_tick)) = old {
            self.order.remove(&old_tick);
            self.total -= old_bytes;
        }
        let Some(bytes) = bytes.or(old.map(|(b, _)| b)) else {
            return;
        };
        self.files.insert(key, (bytes, tick));
        self.order.insert(tick, key);
        self.total += bytes;
    }

    fn forget(&mut self, key: u64) {
        if let Some((bytes, tick)) = self.files.remove(&key) {
            self.order.remove(&tick);
            self.total -= bytes;
        }
    }

    /// The least recently used key, taken out of the index.
    fn pop_oldest(&mut self) -> Option<u64> {
        let (_, key) = self.order.pop_first()?;
        if let Some((bytes, _)) = self.files.remove(&key) {
            self.total -= bytes;
        }
        Some(key)
    }
}

/// A directory of prefix blocks.
pub struct DiskBlocks {
    dir: PathBuf,
    budget: u64,
    index: Mutex<Index>,
}

impl DiskBlocks {
    /// Opens (creating it) the directory `dir` with a budget of `budget` bytes: indexes the
    /// block files there, oldest first by modification time, and removes leftover
    /// temporary files and whatever is over the budget.
    pub fn open(dir: &Path, budget: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(TMP_SUFFIX) {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let Some(key) = name
                .strip_suffix(SUFFIX)
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            else {
                continue;
            };
            let meta = entry.metadata()?;
            found.push((meta.modified().ok(), key, meta.len()));
        }
        found.sort();
        let mut index = Index::default();
        for (_, key, bytes) in found {
            index.touch(key, Some(bytes));
        }
        let tier = Self {
            dir: dir.to_path_buf(),
            budget,
            index: Mutex::new(index),
        };
        let evicted = tier.evict();
        let (blocks, bytes) = tier.usage();
        tracing::info!(dir = %dir.display(), blocks, bytes, evicted,
            "prefix blocks on disk");
        Ok(tier)
    }

    fn path(&self, key: u64) -> PathBuf {
        self.dir.join(format!("{key:016x}{SUFFIX}"))
    }

    /// Removes the least recently used files while over the budget; returns how many.
    fn evict(&self) -> u64 {
        let mut evicted = 0;
        loop {
            let victim = {
                let mut index = self.index.lock();
                if index.total <= self.budget {
                    break;
                }
                index.pop_oldest()
            };
            let Some(key) = victim else { break };
            let _ = std::fs::remove_file(self.path(key));
            evicted += 1;
        }
        evicted
    }
}

impl BlockTier for DiskBlocks {
    fn kind(&self) -> &'static str {
        "disk"
    }

    fn contains(&self, key: u64) -> bool {
        self.index.lock().files.contains_key(&key)
    }

    fn read(&self, key: u64) -> Result<Option<Vec<u8>>, BlockTierError> {
        let path = self.path(key);
        match std::fs::read(&path) {
            Ok(bytes) => {
                self.index.lock().touch(key, None);
                Ok(Some(bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.index.lock().forget(key);
                Ok(None)
            }
            Err(e) => Err(BlockTierError::Failed {
                place: path.display().to_string(),
                why: e.to_string(),
            }),
        }
    }

    fn write(&self, key: u64, bytes: &[u8]) -> Result<u64, BlockTierError> {
        let path = self.path(key);
        let tmp = self.dir.join(format!("{key:016x}{TMP_SUFFIX}"));
        let failed = |e: std::io::Error| BlockTierError::Failed {
            place: path.display().to_string(),
            why: e.to_string(),
        };
        std::fs::write(&tmp, bytes).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            failed(e)
        })?;
        std::fs::rename(&tmp, &path).map_err(failed)?;
        self.index.lock().touch(key, Some(bytes.len() as u64));
        Ok(self.evict())
    }

    fn remove(&self, key: u64) {
        self.index.lock().forget(key);
        let _ = std::fs::remove_file(self.path(key));
    }

    fn place(&self, key: u64) -> String {
        self.path(key).display().to_string()
    }

    fn usage(&self) -> (u64, u64) {
        let index = self.index.lock();
        (index.files.len() as u64, index.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_survive_reopening_and_the_budget_removes_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let tier = DiskBlocks::open(dir.path(), 300).unwrap();
        for key in 1..=3u64 {
            assert_eq!(tier.write(key, &[key as u8; 100]).unwrap(), 0);
        }
        // reading 1 makes 2 the least recently used: a fourth block removes it
        assert_eq!(tier.read(1).unwrap(), Some(vec![1u8; 100]));
        assert_eq!(tier.write(4, &[4u8; 100]).unwrap(), 1);
        assert!(!tier.contains(2) && tier.read(2).unwrap().is_none());
        assert_eq!(tier.usage(), (3, 300));
        // a leftover temporary file is removed at start, other files are left alone
        std::fs::write(dir.path().join(format!("{:016x}{TMP_SUFFIX}", 9)), b"x").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"keep").unwrap();
        drop(tier);
        let again = DiskBlocks::open(dir.path(), 300).unwrap();
        assert_eq!(again.usage(), (3, 300));
        assert_eq!(again.read(4).unwrap(), Some(vec![4u8; 100]));
        assert!(!dir.path().join(format!("{:016x}{TMP_SUFFIX}", 9)).exists());
        assert!(dir.path().join("notes.txt").exists());
        // a smaller budget at start trims the directory
        drop(again);
        let small = DiskBlocks::open(dir.path(), 150).unwrap();
        assert_eq!(small.usage(), (1, 100));
    }
}
