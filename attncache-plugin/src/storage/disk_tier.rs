//! [`DiskTier`]: the default cold tier — one checksummed file per entry, read through mmap.
//!
//! - writes are atomic (temp file, fsync, rename, fsync of the directory) and happen on the
//!   store's background writer; past the byte budget the least recently used files are
//!   removed;
//! - opening rebuilds the tier's index from the directory, so entries survive a restart;
//! - a truncated, corrupt or foreign file is a miss plus one warning, and is removed.
//!
//! Layout: `cold_dir/<model fingerprint>/<token count>/<token-ids hash>.attn`.

use parking_lot::Mutex;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use crate::storage::cold_tier::{decode_checked, ColdTier, ReadProbe, TierError, Written};
use crate::storage::entry::Indexed;
use crate::storage::entry::{self, Entry, HEADER_BYTES};

#[derive(Debug, Clone, Copy)]
struct FileMeta {
    bytes: u64,
    len: usize,
    last_used: u64,
}

/// Entry files of one model in one directory, within a byte budget.
pub struct DiskTier {
    /// `cold_dir/<fingerprint>`: models sharing a directory never see each other's files.
    dir: PathBuf,
    fingerprint: u64,
    budget: u64,
    files: DashMap<u64, FileMeta>,
    total: AtomicU64,
    clock: AtomicU64,
    /// What the scan at opening found: valid entries, and corrupt ones (removed).
    scanned: Mutex<(Vec<Indexed>, Vec<TierError>)>,
}

/// Entry files (`*.attn`) kept in `cold_dir` for the model `fingerprint`, without opening
/// or changing them (0 when there is no such directory).
pub fn entry_files(cold_dir: &Path, fingerprint: u64) -> usize {
    let dir = cold_dir.join(format!("{fingerprint:016x}"));
    let Ok(lens) = fs::read_dir(dir) else {
        return 0;
    };
    lens.flatten()
        .filter_map(|len_dir| fs::read_dir(len_dir.path()).ok())
        .flat_map(|files| files.flatten())
        .filter(|f| f.path().extension().is_some_and(|x| x == "attn"))
        .count()
}

impl DiskTier {
    /// Opens (creating it if needed) the tier in `cold_dir` for the model `fingerprint`,
    /// indexing its valid files and removing invalid ones.
    pub fn open(cold_dir: &Path, fingerprint: u64, budget: u64) -> std::io::Result<Self> {
        let tier = Self {
            dir: cold_dir.join(format!("{fingerprint:016x}")),
            fingerprint,
            budget,
            files: DashMap::new(),
            total: AtomicU64::new(0),
            clock: AtomicU64::new(1),
            scanned: Mutex::new((Vec::new(), Vec::new())),
        };
        tier.scan()?;
        Ok(tier)
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    fn path_of(&self, key: u64, len: usize) -> PathBuf {
        self.dir
            .join(format!("{len:05}"))
            .join(format!("{key:016x}.attn"))
    }

    fn scan(&self) -> std::io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        for len_dir in fs::read_dir(&self.dir)? {
            let len_dir = len_dir?.path();
            if !len_dir.is_dir() {
                continue;
            }
            for file in fs::read_dir(&len_dir)? {
                let path = file?.path();
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string();
                if name.starts_with(".tmp-") {
                    let _ = fs::remove_file(&path); // an interrupted write
                    continue;
                }
                let Some(key) = name
                    .strip_suffix(".attn")
                    .and_then(|k| u64::from_str_radix(k, 16).ok())
                else {
                    continue;
                };
                match self.check_file_header(&path) {
                    Ok((bytes, len, tokens, feature, feature_id)) => {
                        self.scanned.lock().0.push(Indexed {
                            key,
                            len,
                            tokens: tokens.into(),
                            feature,
                            feature_id,
                        });
                        let meta = FileMeta {
                            bytes,
                            len,
                            last_used: 0,
                        };
                        self.files.insert(key, meta);
                        self.total.fetch_add(bytes, Ordering::Relaxed);
                    }
                    Err(why) => {
                        let error = self.discard(&path, why);
                        self.scanned.lock().1.push(error);
                    }
                }
            }
        }
        tracing::info!(
            entries = self.files.len(),
            bytes = self.total.load(Ordering::Relaxed),
            "cold tier indexed"
        );
        Ok(())
    }

    /// Checks a file's header and size and reads its feature vector (the checksum is
    /// checked when the entry is used).
    #[allow(clippy::type_complexity)]
    fn check_file_header(
        &self,
        path: &Path,
    ) -> Result<(u64, usize, Vec<u32>, Vec<f32>, u32), String> {
        use std::io::Read;
        let mut file = File::open(path).map_err(|e| e.to_string())?;
        let size = file.metadata().map_err(|e| e.to_string())?.len();
        let mut head = vec![0u8; HEADER_BYTES];
        file.read_exact(&mut head)
            .map_err(|e| format!("cannot read header: {e}"))?;
        let h = entry::read_header(&head, self.fingerprint).map_err(|e| e.to_string())?;
        if size != (HEADER_BYTES + h.payload) as u64 {
            return Err(format!(
                "truncated: {size} bytes, header says {}",
                HEADER_BYTES + h.payload
            ));
        }
        head.resize(h.prefix_bytes(), 0);
        file.read_exact(&mut head[HEADER_BYTES..])
            .map_err(|e| format!("cannot read prefix: {e}"))?;
        let (tokens, feature) = entry::read_prefix(&head, &h).ok_or("short prefix")?;
        Ok((size, h.len, tokens, feature, h.feature_id))
    }

    /// Removes a corrupt file; the error says what was wrong.
    fn discard(&self, path: &Path, why: String) -> TierError {
        let _ = fs::remove_file(path);
        TierError::Corrupt {
            place: path.display().to_string(),
            why,
        }
    }

    fn forget(&self, key: u64) {
        if let Some((_, meta)) = self.files.remove(&key) {
            self.total.fetch_sub(meta.bytes, Ordering::Relaxed);
        }
    }

    fn write_file(&self, path: &Path, entry: &Entry) -> std::io::Result<u64> {
        let bytes = entry::encode(entry, self.fingerprint).map_err(std::io::Error::other)?;
        let dir = path
            .parent()
            .ok_or_else(|| std::io::Error::other("entry path has no parent"))?;
        fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".tmp-{}-{:x}", std::process::id(), self.tick()));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, path)?;
            File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map(|()| bytes.len() as u64)
    }

    /// Removes the least recently used files past the budget; returns how many.
    fn evict(&self) -> u64 {
        let mut evicted = 0;
        while self.total.load(Ordering::Relaxed) > self.budget {
            let victim = self
                .files
                .iter()
                .min_by_key(|e| e.value().last_used)
                .map(|e| *e.key());
            let Some(key) = victim else { break };
            if let Some((_, meta)) = self.files.remove(&key) {
                self.total.fetch_sub(meta.bytes, Ordering::Relaxed);
                evicted += 1;
                let _ = fs::remove_file(self.path_of(key, meta.len));
            }
        }
        evicted
    }
}

/// Names of read probes ([`time_file_reads`]); a probe left by a killed process is removed
/// by the next one.
const PROBE_PREFIX: &str = ".tier-cost-probe-";

/// [`ColdTier::time_reads`] for entry files in `dir`: writes `bytes` to a probe file there
/// (never an entry's name), maps and reads it `reps` times, removes it.
pub fn time_file_reads(
    dir: &Path,
    bytes: &[u8],
    reps: usize,
    then: &mut ReadProbe<'_>,
) -> Result<Vec<f64>, String> {
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    for stale in fs::read_dir(dir).into_iter().flatten().flatten() {
        if stale
            .file_name()
            .to_string_lossy()
            .starts_with(PROBE_PREFIX)
        {
            let _ = fs::remove_file(stale.path());
        }
    }
    let path = dir.join(format!("{PROBE_PREFIX}{}", std::process::id()));
    let result = fs::write(&path, bytes)
        .map_err(|e| format!("writing {}: {e}", path.display()))
        .and_then(|()| {
            (0..reps.max(1))
                .map(|_| {
                    let started = std::time::Instant::now();
                    let file = File::open(&path).map_err(|e| e.to_string())?;
                    // SAFETY: the probe file is ours and not modified while mapped.
                    let mapped = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| e.to_string())?;
                    then(&mapped)?;
                    Ok(started.elapsed().as_nanos() as f64)
                })
                .collect()
        });
    let _ = fs::remove_file(&path);
    result
}

impl ColdTier for DiskTier {
    fn kind(&self) -> &'static str {
        "disk"
    }

    fn take_scanned(&self) -> (Vec<Indexed>, Vec<TierError>) {
        std::mem::take(&mut *self.scanned.lock())
    }

    fn read(&self, key: u64, len: usize) -> Result<Option<Entry>, TierError> {
        let path = self.path_of(key, len);
        let now = self.tick();
        match self.files.get_mut(&key) {
            Some(mut meta) => meta.last_used = now,
            None => return Ok(None),
        }
        let decoded = File::open(&path)
            .map_err(|e| e.to_string())
            // SAFETY: entries are only ever replaced by rename, never written in place, so
            // the mapped file does not change under us; a removed file stays mapped.
            .and_then(|f| unsafe { memmap2::Mmap::map(&f) }.map_err(|e| e.to_string()))
            .and_then(|m| decode_checked(&m, self.fingerprint, key));
        decoded.map(Some).map_err(|why| {
            self.forget(key);
            self.discard(&path, why)
        })
    }

    fn time_reads(
        &self,
        bytes: &[u8],
        reps: usize,
        then: &mut ReadProbe<'_>,
    ) -> Result<Vec<f64>, String> {
        // beside the length directories: the scan only looks inside those
        time_file_reads(&self.dir, bytes, reps, then)
    }

    fn write(&self, key: u64, entry: &Entry) -> Result<Written, TierError> {
        let len = entry.len();
        let path = self.path_of(key, len);
        match self.write_file(&path, entry) {
            Ok(bytes) => {
                let meta = FileMeta {
                    bytes,
                    len,
                    last_used: self.tick(),
                };
                if let Some(old) = self.files.insert(key, meta) {
                    self.total.fetch_sub(old.bytes, Ordering::Relaxed);
                }
                self.total.fetch_add(bytes, Ordering::Relaxed);
                Ok(Written {
                    evicted: self.evict(),
                })
            }
            Err(e) => Err(TierError::WriteFailed {
                place: path.display().to_string(),
                why: e.to_string(),
            }),
        }
    }

    fn usage(&self) -> (u64, u64) {
        (self.files.len() as u64, self.total.load(Ordering::Relaxed))
    }

    fn legacy_entries(&self, legacy: u64) -> Option<u64> {
        // `dir` is `cold_dir/<fingerprint>`; the legacy files sit beside it
        let cold_dir = self.dir.parent()?;
        Some(entry_files(cold_dir, legacy) as u64)
    }
}
