//! Each user job's share space in the object store: a bucket and an access key that may
//! use only that bucket, created when the job is assigned to its DUT (the job template
//! sees them as `minio_url`, `job_bucket`, `job_bucket_access_key`,
//! `job_bucket_secret_key` and `job.bucket.*`) and removed when the job is over.
//!
//! The executor does not know which object store serves them: the binary gives it a
//! [`JobStorage`] (the embedded S3 store).

/// The object store as the executor uses it.
pub trait JobStorage: Send + Sync {
    /// The store's URL as the DUTs reach it (`minio_url`).
    fn url_for_duts(&self) -> String;
    /// Creates `bucket` and a key restricted to it; returns (access key, secret key).
    fn create_space(&self, bucket: &str) -> Result<(String, String), String>;
    /// Removes the key and the bucket with everything in it.
    fn remove_space(&self, bucket: &str, access_key: &str) -> Result<(), String>;
    /// Puts the files of a `.tar.gz` archive (the client's share directory) into
    /// `bucket`, keyed by their paths in the archive; returns how many.
    fn import_archive(&self, bucket: &str, archive: &std::path::Path) -> Result<usize, String>;
    /// Writes every object of `bucket` into a `.tar.gz` archive at `archive`, for the
    /// client to take back into its share directory; returns how many.
    fn export_archive(&self, bucket: &str, archive: &std::path::Path) -> Result<usize, String>;
}

/// Where a job's share archives live: `<state>/shares/<job id>.in.tar.gz` (sent by the
/// client, put into the bucket when the job starts) and `….out.tar.gz` (the bucket at
/// the end of the job, for the client to take back).
pub fn share_archive(state_dir: &std::path::Path, job_id: &str, out: bool) -> std::path::PathBuf {
    state_dir.join("shares").join(format!(
        "{job_id}.{}.tar.gz",
        if out { "out" } else { "in" }
    ))
}

/// Deletes the result archives (`*.out.tar.gz`) of `dir` older than `kept` (clients that
/// never came back for their job's results). Archives sent with queued jobs stay.
pub fn sweep_old_archives(dir: &std::path::Path, kept: std::time::Duration) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().ends_with(".out.tar.gz") {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > kept);
        if old {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A bucket name for the job (S3 rules: 3–63 of `[a-z0-9-]`), CI-tron style:
/// `job-<dut without colons>-<job id, cleaned and cut>-<random>`.
pub fn bucket_name(dut_id: &str, job_id: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .filter_map(|c| {
                let c = c.to_ascii_lowercase();
                if c.is_ascii_alphanumeric() {
                    Some(c)
                } else if c == '-' || c == '_' || c == '.' {
                    Some('-')
                } else {
                    None
                }
            })
            .collect()
    };
    let dut: String = clean(dut_id).chars().take(17).collect();
    let job: String = clean(job_id)
        .trim_start_matches("job-")
        .chars()
        .take(28)
        .collect();
    let suffix: String = {
        use rand::Rng;
        let mut rng = rand::rng();
        (0..6)
            .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)]))
            .collect()
    };
    let name = format!("job-{dut}-{job}-{suffix}");
    // No double hyphens from cleaning, no hyphen before the suffix run-on.
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if !(c == '-' && out.ends_with('-')) {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_follow_the_s3_rules() {
        for (dut, job) in [
            ("52:54:00:11:22:01", "job-20261126002345720-0d58319a"),
            (
                "x",
                "A_very.LONG-job-id-that-goes-on-and-on-and-on-and-on-and-on-and-on",
            ),
            ("52:54:00:11:22:01", "--"),
        ] {
            let b = bucket_name(dut, job);
            assert!((3..=63).contains(&b.len()), "{b}");
            assert!(
                b.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{b}"
            );
            assert!(!b.contains("--") && !b.ends_with('-'), "{b}");
        }
        assert!(bucket_name("52:54:00:11:22:01", "job-1").starts_with("job-525400112201-1-"));
    }
}
