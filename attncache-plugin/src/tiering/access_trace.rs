//! An opt-in record of the cache's accesses, for offline hot-tier sizing
//! (`attncache size --trace FILE`): one CSV line `op,scope,key,bytes` per lookup outcome
//! and per stored entry, where `op` is `insert`, `hit` or `miss`, `key` the entry's store
//! key (hex) and `bytes` its size (0 for a miss). Input text and token ids never appear.

use parking_lot::Mutex;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::AttnCacheError;

const HEADER: &str = "op,scope,key,bytes";

/// What happened to an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceOp {
    /// Recorded maps were stored.
    Insert,
    /// A lookup used the entry's maps (exact or near hit).
    Hit,
    /// A lookup found nothing usable.
    Miss,
}

impl TraceOp {
    fn name(self) -> &'static str {
        match self {
            TraceOp::Insert => "insert",
            TraceOp::Hit => "hit",
            TraceOp::Miss => "miss",
        }
    }
}

/// One line of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceRecord {
    /// What happened.
    pub op: TraceOp,
    /// The scope.
    pub scope: usize,
    /// The entry's store key (0 for a miss).
    pub key: u64,
    /// The entry's bytes (0 for a miss).
    pub bytes: u64,
}

/// A trace being written (buffered; flushed by [`AccessTrace::flush`] and on drop).
#[derive(Debug)]
pub struct AccessTrace {
    out: Mutex<BufWriter<File>>,
    failed: AtomicBool,
}

impl AccessTrace {
    /// Creates (or truncates) the trace file and writes its header.
    pub fn create(path: &Path) -> Result<Self, AttnCacheError> {
        let io = |source| AttnCacheError::Io {
            what: "creating the access trace",
            source,
        };
        let mut out = BufWriter::new(File::create(path).map_err(io)?);
        writeln!(out, "{HEADER}").map_err(io)?;
        Ok(Self {
            out: Mutex::new(out),
            failed: AtomicBool::new(false),
        })
    }

    /// Appends one record; a write error is logged once and later records are dropped.
    pub fn record(&self, op: TraceOp, scope: usize, key: u64, bytes: u64) {
        if self.failed.load(Ordering::Relaxed) {
            return;
        }
        let mut out = self.out.lock();
        if let Err(e) = writeln!(out, "{},{scope},{key:016x},{bytes}", op.name()) {
            self.failed.store(true, Ordering::Relaxed);
            tracing::warn!("access trace stopped: {e}");
        }
    }

    /// Writes buffered records to the file.
    pub fn flush(&self) {
        let mut out = self.out.lock();
        if let Err(e) = out.flush() {
            tracing::warn!("cannot flush the access trace: {e}");
        }
    }
}

impl Drop for AccessTrace {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Reads a trace; a malformed line is an error naming it.
pub fn read(path: &Path) -> Result<Vec<TraceRecord>, AttnCacheError> {
    let io = |source| AttnCacheError::Io {
        what: "reading the access trace",
        source,
    };
    let bad = |line: usize, text: &str| AttnCacheError::InvalidSetting {
        name: "trace line",
        value: format!("line {line}: {text}"),
        expected: "`op,scope,key,bytes` with op insert|hit|miss, key in hex",
    };
    let mut records = Vec::new();
    for (i, line) in BufReader::new(File::open(path).map_err(io)?)
        .lines()
        .enumerate()
    {
        let line = line.map_err(io)?;
        if i == 0 && line == HEADER || line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').collect();
        let [op, scope, key, bytes] = fields[..] else {
            return Err(bad(i + 1, &line));
        };
        let op = match op {
            "insert" => TraceOp::Insert,
            "hit" => TraceOp::Hit,
            "miss" => TraceOp::Miss,
            _ => return Err(bad(i + 1, &line)),
        };
        let parsed = (
            scope.parse().ok(),
            u64::from_str_radix(key, 16).ok(),
            bytes.parse().ok(),
        );
        let (Some(scope), Some(key), Some(bytes)) = parsed else {
            return Err(bad(i + 1, &line));
        };
        records.push(TraceRecord {
            op,
            scope,
            key,
            bytes,
        });
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_reads_back_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.csv");
        {
            let t = AccessTrace::create(&path).unwrap();
            t.record(TraceOp::Insert, 0, 0xabc, 4096);
            t.record(TraceOp::Hit, 1, 0xabc, 4096);
            t.record(TraceOp::Miss, 0, 0, 0);
        }
        let r = read(&path).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(
            r[1],
            TraceRecord {
                op: TraceOp::Hit,
                scope: 1,
                key: 0xabc,
                bytes: 4096
            }
        );
        std::fs::write(&path, "op,scope,key,bytes\nhit,0,zz,1\n").unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains("line 2: hit,0,zz,1"), "{err}");
    }
}
