//! The MaRS DB YAML file.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use farmgate_wire::MarsDb;

/// What can go wrong with the MaRS DB file.
#[derive(Debug, thiserror::Error)]
pub enum MarsError {
    /// The file exists but cannot be read.
    #[error("cannot read the MaRS DB file {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid YAML or does not have the MaRS DB layout.
    #[error("{}{}: {message}", .path.display(), match .line { Some(l) => format!(", line {l}"), None => String::new() })]
    Yaml {
        /// The file.
        path: PathBuf,
        /// Line of the error (from 1), when known.
        line: Option<usize>,
        /// Column of the error (from 1), when known.
        column: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// The database is well-formed but inconsistent.
    #[error("invalid MaRS DB: {}", .problems.join("; "))]
    Invalid {
        /// Every problem found, one sentence each.
        problems: Vec<String>,
    },
    /// The file could not be written.
    #[error("cannot write the MaRS DB file {}: {message}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// Identifies one version of the file on disk (inode, size, modification and change
/// times); two different stamps mean the file changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MarsStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// The MaRS DB file at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarsFile {
    path: PathBuf,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl MarsFile {
    /// The file at `path` (which need not exist yet).
    pub fn new(path: PathBuf) -> MarsFile {
        MarsFile { path }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read and parse the file; a missing or empty file is an empty database. The
    /// result is not validated (see [`MarsFile::validate`]).
    pub fn load(&self) -> Result<MarsDb, MarsError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(MarsDb::default()),
            Err(source) => {
                return Err(MarsError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        self.parse(&text)
    }

    /// Parse `text` as the content of this file (errors name the file).
    pub fn parse(&self, text: &str) -> Result<MarsDb, MarsError> {
        let yaml_err = |e: serde_yaml_ng::Error| {
            let loc = e.location();
            MarsError::Yaml {
                path: self.path.clone(),
                line: loc.as_ref().map(|l| l.line()),
                column: loc.as_ref().map(|l| l.column()),
                message: e.to_string(),
            }
        };
        // Parse as a generic value first: it catches duplicate keys, and an empty (or
        // all-comments) file is a null document.
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(yaml_err)?;
        if value.is_null() {
            return Ok(MarsDb::default());
        }
        serde_yaml_ng::from_str(text).map_err(yaml_err)
    }

    /// Check a database for consistency: every DUT names an existing PDU and a port,
    /// no two DUTs share a port, ids are unique ignoring case, values are sane.
    pub fn validate(db: &MarsDb) -> Result<(), MarsError> {
        let mut problems = Vec::new();
        for (name, pdu) in &db.pdus {
            if name.trim().is_empty() {
                problems.push("a PDU has an empty name".to_string());
            }
            if pdu.driver.trim().is_empty() {
                problems.push(format!("PDU {name} has no driver"));
            }
        }
        let mut lower_ids: BTreeMap<String, &str> = BTreeMap::new();
        let mut ports: BTreeMap<(&str, &str), &str> = BTreeMap::new();
        for (id, dut) in &db.duts {
            if id.trim().is_empty() {
                problems.push("a DUT has an empty id".to_string());
            }
            if let Some(other) = lower_ids.insert(id.to_lowercase(), id) {
                problems.push(format!(
                    "DUTs {other} and {id} are the same machine (ids are not case-sensitive)"
                ));
            }
            if !(dut.pdu_off_delay.is_finite()
                && (0.0..=farmgate_wire::MAX_PDU_OFF_DELAY).contains(&dut.pdu_off_delay))
            {
                problems.push(format!(
                    "DUT {id} has pdu_off_delay {}, expected a number of seconds from 0 to {}",
                    dut.pdu_off_delay,
                    farmgate_wire::MAX_PDU_OFF_DELAY
                ));
            }
            match (&dut.pdu, &dut.pdu_port_id) {
                (Some(pdu), Some(port)) => {
                    if !db.pdus.contains_key(pdu) {
                        problems.push(format!(
                            "DUT {id} names PDU {pdu}, which is not defined under pdus"
                        ));
                    }
                    if let Some(other) = ports.insert((pdu.as_str(), port.as_str()), id) {
                        problems.push(format!(
                            "DUTs {other} and {id} are both on port {port} of PDU {pdu}"
                        ));
                    }
                }
                (Some(pdu), None) => {
                    problems.push(format!("DUT {id} names PDU {pdu} but no pdu_port_id"));
                }
                (None, Some(port)) => {
                    problems.push(format!("DUT {id} has pdu_port_id {port} but no pdu"));
                }
                (None, None) => {}
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(MarsError::Invalid { problems })
        }
    }

    /// Write `db` to the file atomically: a temporary file in the same directory,
    /// flushed to disk, then renamed over the file.
    pub fn save(&self, db: &MarsDb) -> Result<(), MarsError> {
        let write_err = |message: String| MarsError::Write {
            path: self.path.clone(),
            message,
        };
        let text = serde_yaml_ng::to_string(db).map_err(|e| write_err(e.to_string()))?;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = self
            .path
            .file_name()
            .ok_or_else(|| write_err("the path has no file name".into()))?
            .to_string_lossy()
            .into_owned();
        let tmp = dir.join(format!(
            ".{name}.tmp.{}.{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            if let Ok(meta) = std::fs::metadata(&self.path) {
                // Keep the permissions the admin gave the file.
                f.set_permissions(meta.permissions())?;
            }
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, &self.path)?;
            if let Ok(d) = std::fs::File::open(&dir) {
                let _ = d.sync_all();
            }
            Ok(())
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(write_err(e.to_string()));
        }
        Ok(())
    }

    /// The stamp of the file's current version; `None` when it does not exist.
    pub fn stamp(&self) -> Option<MarsStamp> {
        let m = std::fs::metadata(&self.path).ok()?;
        Some(MarsStamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}
