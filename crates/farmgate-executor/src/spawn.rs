//! The one place that starts child processes.
//!
//! Every child (job runners today, QEMU later) is started here so that all get the same
//! treatment: their own process group (a signal to the daemon, even SIGKILL, does not
//! reach them, so jobs survive a daemon restart), a working directory, a log file for
//! their stdout and stderr, and a closed stdin.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// How to start one child process.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    /// Program to run.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Variables added to the inherited environment.
    pub env: Vec<(String, String)>,
    /// File receiving stdout and stderr (appended).
    pub log_file: PathBuf,
}

/// Start the child in a new process group. The caller owns the returned handle and must
/// wait on it (to reap it); dropping the handle does not kill the child.
pub fn spawn_detached(spec: &ChildSpec) -> std::io::Result<tokio::process::Child> {
    if let Some(dir) = spec.log_file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log_file)?;
    let log2 = log.try_clone()?;
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .current_dir(existing_dir(&spec.cwd))
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .process_group(0)
        .kill_on_drop(false);
    cmd.spawn()
}

fn existing_dir(dir: &Path) -> &Path {
    if dir.is_dir() { dir } else { Path::new("/") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn child_gets_its_own_process_group_and_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = ChildSpec {
            program: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                "echo pgid=$(ps -o pgid= -p $$ | tr -d ' ') pid=$$ v=$FARMGATE_TEST_VAR".into(),
            ],
            cwd: dir.path().into(),
            env: vec![("FARMGATE_TEST_VAR".into(), "42".into())],
            log_file: dir.path().join("logs/child.log"),
        };
        let mut child = spawn_detached(&spec).expect("spawn");
        let status = child.wait().await.expect("wait");
        assert!(status.success());
        let out = std::fs::read_to_string(dir.path().join("logs/child.log")).expect("log");
        let pgid = out
            .split_whitespace()
            .find_map(|w| w.strip_prefix("pgid="))
            .expect("pgid printed");
        let pid = out
            .split_whitespace()
            .find_map(|w| w.strip_prefix("pid="))
            .expect("pid printed");
        assert_eq!(pgid, pid, "child leads its own process group: {out}");
        assert!(out.contains("v=42"), "{out}");
    }
}
