//! Running containers with crun, and boot2container's pipeline of them.
//!
//! [`run`] turns a [`ContainerSpec`] (the `podman run` options of `b2c.container`) and the
//! pulled image's [`ImageConfig`] into an OCI bundle (`config.json`, plus the
//! `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname` it bind-mounts), runs
//! `crun run --bundle <dir> <name>` on the agent's console and returns the container's exit
//! code (a signal `n` gives `128 + n`); `crun delete --force <name>` always follows.
//! [`run_pipeline`] runs `b2c.container`s then `b2c.post_container`s with boot2container's
//! rules and `B2C_PIPELINE_*` variables; [`final_lines`] are its last console lines.
//!
//! # What the config does (podman's behaviour unless said otherwise)
//! - command: `--entrypoint` (one word, or a JSON array; `""` clears it) replaces the
//!   image's Entrypoint, arguments after the image replace its Cmd, and a non-empty
//!   `--entrypoint` also drops the image's Cmd;
//! - environment, later wins: `PATH` (podman's default), `TERM=xterm`, `container=podman`,
//!   `HOSTNAME`, then the image's `Env`, then the request's `extra_env` (`B2C_PIPELINE_*`),
//!   then `-e` (`-e K` copies the agent's own `K`, or nothing when unset; boot2container
//!   passes its variables before the user's `-e`s, so those win), then `HOME` from the
//!   user's `/etc/passwd` entry (or `/`) when still unset;
//! - `-u`/image `User`: `uid`, `name`, `uid:gid`, `name:group`…, names looked up in the
//!   rootfs's `/etc/passwd`/`/etc/group` (symlinks resolved inside the rootfs); the gid
//!   defaults to the passwd entry's (0 for an unknown uid); groups listing the user are
//!   added as supplementary groups;
//! - `-w`/image `WorkingDir`, else `/`; created in the rootfs when missing;
//! - `-t` gives a terminal only when the agent's stdin is one; without `-i` (and `-t`)
//!   the container's stdin is `/dev/null`;
//! - namespaces: mount, UTS, PID (`--pid=host` shares), IPC (`--ipc=host` shares); the
//!   network is the host's unless `--network=none|private` (a new namespace with nothing
//!   configured in it) or `--network=ns:<path>`: boot2container runs every container with
//!   `--network=host` (other modes, bridge/slirp4netns/pasta, are refused);
//! - host name: `-h`, else the agent's with the host network, else the container name;
//! - mounts: `/proc`; `/dev` as tmpfs with `devpts`, `/dev/shm` and `/dev/mqueue` (with
//!   `--privileged`: the host's `/dev`, bind-mounted, so hot-plugged devices appear);
//!   `/sys` and `/sys/fs/cgroup` read-only (read-write with `--privileged`); no `/tmp`
//!   tmpfs (podman has none either); `/etc/{resolv.conf,hosts,hostname}` from the bundle
//!   (`resolv.conf`: the host's, its nameservers replaced by `--dns` ones; none with
//!   `--dns=none`); each `-v` as a recursive bind mount (`bind` makes it non-recursive,
//!   `ro`, `nosuid`, `nodev`, `noexec` and propagation options honoured, `z`/`Z`/`copy`
//!   ignored, others warned about); named volumes come from [`RunRequest::volumes`],
//!   host paths are relative to the agent's directory and must exist, anonymous volumes
//!   are directories in the bundle; `--mount type=bind|volume|tmpfs,…`;
//! - devices: `--device host[:container][:rwm]` (a directory such as `/dev/dri` gives
//!   every node under it), with matching device cgroup rules; podman's default rules
//!   otherwise, everything allowed with `--privileged`;
//! - capabilities: podman's default set; all with `--privileged` or `--cap-add=all`;
//!   `--cap-add`/`--cap-drop` (names with or without `CAP_`, `all`); always restricted
//!   to the agent's own bounding set. A non-root user gets only the added capabilities
//!   as effective/ambient ones (podman's rule);
//! - `RLIMIT_NOFILE` soft = hard = the agent's hard limit (at most 1048576);
//! - podman's masked and read-only `/proc`/`/sys` paths, unless `--privileged`;
//! - `--security-opt no-new-privileges` honoured; `label=disable`,
//!   `seccomp=unconfined`, `apparmor=unconfined` accepted (nothing to do).
//!
//! Not done: seccomp (podman's default profile is not applied; boot2container runs
//! everything `--privileged`, which disables it anyway), AppArmor/SELinux, cgroup
//! limits (each container gets its own cgroup, `/farm-agent-<agent pid>-<name>`), user
//! namespaces, copying
//! image content into empty named volumes, `/run/.containerenv`, `--init`, exit codes
//! 125–127 for runtime errors (crun's own failures show up as exit code 1, with crun's
//! message on the console). On an initramfs root (`rootfs` file system, where
//! `pivot_root` is impossible) `crun run --no-pivot` is used, as boot2container does.
//!
//! On a host with cgroup v1 and controllers enabled in a hybrid `/sys/fs/cgroup/unified`,
//! crun 1.8 refuses to run anything ("cgroups in hybrid mode not supported"): give [`run`]
//! a wrapper that runs crun with that mount hidden (the tests do).

mod config;
mod rootfs;

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::cmdline::ContainerSpec;
use crate::oci::ImageConfig;

/// Everything needed to run one container.
#[derive(Debug, Clone)]
pub struct RunRequest<'a> {
    /// The `podman run` options.
    pub spec: &'a ContainerSpec,
    /// The image's config, from [`crate::oci::pull`].
    pub image: &'a ImageConfig,
    /// The unpacked root file system (used in place, read-write).
    pub rootfs: &'a Path,
    /// Named volumes (`-v name:/path`, `--mount type=volume`) → host directory.
    pub volumes: &'a BTreeMap<String, PathBuf>,
    /// Extra environment (the `B2C_PIPELINE_*` variables); `-e` options override them.
    pub extra_env: Vec<(String, String)>,
    /// The bundle directory (created; `config.json`, `etc/`, anonymous volumes go there).
    pub bundle_dir: &'a Path,
    /// The crun container id (letters, digits, `_`, `-`, `.`; not starting with `.`/`-`).
    pub name: String,
}

/// Facts about the agent's host that go into a config (see [`HostFacts::current`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// Capabilities in the agent's bounding set (`CAP_…` names).
    pub bounding_caps: Vec<String>,
    /// The container's `RLIMIT_NOFILE`.
    pub nofile: u64,
    /// The agent's host name.
    pub hostname: String,
    /// Whether the agent's stdin is a terminal.
    pub stdin_is_tty: bool,
    /// The host's `/etc/resolv.conf`, if readable.
    pub resolv_conf: Option<String>,
    /// The host's `/etc/hosts`, if readable.
    pub hosts: Option<String>,
    /// The agent's environment (for `-e NAME`).
    pub env: BTreeMap<String, String>,
    /// The agent's working directory (relative `-v` host paths).
    pub cwd: PathBuf,
}

impl HostFacts {
    /// Reads the facts of the running agent.
    pub fn current() -> HostFacts {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let bounding_caps = status
            .lines()
            .find_map(|l| l.strip_prefix("CapBnd:"))
            .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
            .map(|mask| {
                config::ALL_CAPS
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1u64 << i) != 0)
                    .map(|(_, c)| (*c).to_owned())
                    .collect()
            })
            .unwrap_or_else(|| config::ALL_CAPS.iter().map(|c| (*c).to_owned()).collect());
        let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(_, hard)| hard.min(1_048_576))
            .unwrap_or(1024);
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_owned());
        HostFacts {
            bounding_caps,
            nofile,
            hostname,
            stdin_is_tty: std::io::stdin().is_terminal(),
            resolv_conf: std::fs::read_to_string("/etc/resolv.conf").ok(),
            hosts: std::fs::read_to_string("/etc/hosts").ok(),
            env: std::env::vars_os()
                .map(|(k, v)| {
                    (
                        k.to_string_lossy().into_owned(),
                        v.to_string_lossy().into_owned(),
                    )
                })
                .collect(),
            cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
        }
    }

    #[cfg(test)]
    pub(crate) fn for_tests() -> HostFacts {
        HostFacts {
            bounding_caps: config::ALL_CAPS.iter().map(|c| (*c).to_owned()).collect(),
            nofile: 1024,
            hostname: "dut".into(),
            stdin_is_tty: false,
            resolv_conf: Some("nameserver 10.42.0.1\n".into()),
            hosts: Some("127.0.0.1 localhost\n".into()),
            env: BTreeMap::new(),
            cwd: PathBuf::from("/"),
        }
    }
}

/// What can go wrong running a container; every message names the container and the step.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The options, the image or the rootfs do not make a valid config.
    #[error("container {container}: building its OCI config: {why}")]
    Config {
        /// The container name.
        container: String,
        /// What is wrong.
        why: String,
    },
    /// Writing the bundle, starting or waiting for crun, or deleting the container failed.
    #[error("container {container}: {step}: {why}")]
    Step {
        /// The container name.
        container: String,
        /// The step (`writing …`, `starting crun run`, `crun delete`…).
        step: String,
        /// The error.
        why: String,
    },
}

/// The OCI runtime config (`config.json`, ociVersion 1.0.2) for `req` on this host.
pub fn oci_runtime_config(req: &RunRequest<'_>) -> Result<serde_json::Value, RunError> {
    oci_runtime_config_with(req, &HostFacts::current())
}

/// The OCI runtime config for `req`, given the host's facts.
pub fn oci_runtime_config_with(
    req: &RunRequest<'_>,
    facts: &HostFacts,
) -> Result<serde_json::Value, RunError> {
    config::prepare(req, facts)
        .map(|p| p.config)
        .map_err(|why| RunError::Config {
            container: req.name.clone(),
            why,
        })
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && name.len() <= 255
}

/// Whether `/` is an initramfs (`rootfs`/`ramfs`), where `pivot_root` cannot work.
fn root_is_initramfs() -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .ok()
        .and_then(|m| {
            m.lines()
                .rev()
                .find_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.get(1) == Some(&"/")).then(|| f.get(2).map(|t| t.to_string()))
                })
                .flatten()
        })
        .is_some_and(|t| t == "rootfs" || t == "ramfs")
}

/// Deletes the container when dropped (the run was cancelled or failed half-way).
struct DeleteGuard<'a> {
    crun: &'a Path,
    name: &'a str,
    armed: bool,
}

impl Drop for DeleteGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::process::Command::new(self.crun)
                .args(["delete", "--force", self.name])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Writes the bundle of `req`, runs it with `crun run` on the agent's stdin/stdout/stderr,
/// waits, and returns the container's exit code (`128 + n` for a signal `n`); the
/// container is always deleted afterwards (`crun delete --force`), also when the future
/// is dropped.
pub async fn run(req: &RunRequest<'_>, crun: &Path) -> Result<i32, RunError> {
    let name = req.name.as_str();
    let step = |step: String, why: String| RunError::Step {
        container: name.to_owned(),
        step,
        why,
    };
    if !valid_name(name) {
        return Err(RunError::Config {
            container: name.to_owned(),
            why: "invalid container name (letters, digits, '_', '-', '.')".to_owned(),
        });
    }
    let facts = HostFacts::current();
    let mut prepared = config::prepare(req, &facts).map_err(|why| RunError::Config {
        container: name.to_owned(),
        why,
    })?;
    // crun's default cgroup is named after the container alone: two agents on one host
    // (tests, or an agent under another init) would share it, and deleting one
    // container would kill the other's processes.
    if let Some(linux) = prepared
        .config
        .get_mut("linux")
        .and_then(|l| l.as_object_mut())
    {
        linux.insert(
            "cgroupsPath".to_owned(),
            serde_json::Value::String(format!("/farm-agent-{}-{name}", std::process::id())),
        );
    }
    for w in &prepared.warnings {
        tracing::warn!(container = name, "{w}");
    }
    let io = |what: &str, p: &Path| {
        let what = format!("{what} {}", p.display());
        move |e: std::io::Error| step(what, e.to_string())
    };
    tokio::fs::create_dir_all(req.bundle_dir)
        .await
        .map_err(io("creating the bundle directory", req.bundle_dir))?;
    for d in &prepared.dirs {
        tokio::fs::create_dir_all(d)
            .await
            .map_err(io("creating the directory", d))?;
    }
    for (p, text) in &prepared.files {
        if let Some(parent) = p.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io("creating the directory", parent))?;
        }
        tokio::fs::write(p, text).await.map_err(io("writing", p))?;
    }
    let cfg_path = req.bundle_dir.join("config.json");
    let text = serde_json::to_vec_pretty(&prepared.config)
        .map_err(|e| step("serialising config.json".to_owned(), e.to_string()))?;
    tokio::fs::write(&cfg_path, text)
        .await
        .map_err(io("writing", &cfg_path))?;

    // A container of the same name left by an earlier run (crash, power cut) would make
    // `crun run` fail: remove it first.
    let _ = tokio::process::Command::new(crun)
        .args(["delete", "--force", name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;

    let spec = req.spec;
    let terminal = prepared.config["process"]["terminal"] == serde_json::Value::Bool(true);
    let mut cmd = tokio::process::Command::new(crun);
    cmd.arg("run");
    if root_is_initramfs() {
        cmd.arg("--no-pivot");
    }
    cmd.arg("--bundle")
        .arg(req.bundle_dir)
        .arg(name)
        .stdin(if spec.interactive || terminal {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut guard = DeleteGuard {
        crun,
        name,
        armed: true,
    };
    tracing::info!(container = name, bundle = %req.bundle_dir.display(), "crun run");
    let mut child = cmd
        .spawn()
        .map_err(|e| step(format!("starting {} run", crun.display()), e.to_string()))?;
    let status = child
        .wait()
        .await
        .map_err(|e| step(format!("waiting for {} run", crun.display()), e.to_string()))?;
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 255,
    };

    let out = tokio::process::Command::new(crun)
        .args(["delete", "--force", name])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| step(format!("starting {} delete", crun.display()), e.to_string()))?;
    guard.armed = false;
    if !out.status.success() {
        // `crun run` already removes an exited container: only a container that is
        // still known after a failed delete is an error.
        let still = tokio::process::Command::new(crun)
            .args(["state", name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .map(|s| s.success())
            .unwrap_or(false);
        if still {
            return Err(step(
                "crun delete --force".to_owned(),
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
    }
    Ok(code)
}

/// What a pipeline asks the machine to do once it is over (exit codes 129 and 130 of a
/// container: what the kernel reports when the container calls `reboot(2)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShutdownMode {
    /// Nothing asked: power off (`b2c.shutdown_cmd`).
    #[default]
    Default,
    /// A container exited with 129: reboot (`b2c.reboot_cmd`).
    Reboot,
    /// A container exited with 130: power off.
    Poweroff,
}

impl ShutdownMode {
    /// The value of `B2C_PIPELINE_SHUTDOWN_MODE`: `default`, `reboot` or `poweroff`.
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownMode::Default => "default",
            ShutdownMode::Reboot => "reboot",
            ShutdownMode::Poweroff => "poweroff",
        }
    }
}

/// What happened to one container of a pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerOutcome {
    /// The container's option value ([`ContainerSpec::raw`]).
    pub container: String,
    /// A `b2c.post_container`.
    pub post: bool,
    /// Its exit code, or why it could not be run (counted as exit code 1).
    pub result: Result<i32, String>,
}

/// The outcome of [`run_pipeline`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineResult {
    /// The first non-zero exit code of a `b2c.container` (0 if none failed).
    pub status: i32,
    /// The [`ContainerSpec::raw`] of the first failing container.
    pub failed_by: Option<String>,
    /// Reboot or power off, as asked by the last container exiting with 129/130.
    pub shutdown: ShutdownMode,
    /// Every container started, in order.
    pub outcomes: Vec<ContainerOutcome>,
}

/// boot2container's pipeline. `b2c.container`s (`containers`) run in order; each is given
/// (by `run_one`, as [`RunRequest::extra_env`]) `B2C_PIPELINE_STATUS` (0 until one fails,
/// then the first failure's exit code), `B2C_PIPELINE_FAILED_BY` (the
/// [`ContainerSpec::raw`] of the first failing one, else empty),
/// `B2C_PIPELINE_PREV_CONTAINER` and `B2C_PIPELINE_PREV_CONTAINER_EXIT_CODE` (the last
/// container that ran, its options and exit code; empty at first) and
/// `B2C_PIPELINE_SHUTDOWN_MODE`. With `pipefail` the first failure stops the
/// `b2c.container`s; without it every one runs. The `post_containers` then always run,
/// with the same variables; their failures do not change the status. `run_one` failing
/// (pull error, bad options…) counts as exit code 1, without updating the `PREV`
/// variables (as boot2container does when it cannot create a container). A container
/// (post containers included) exiting with 129 asks for a reboot, 130 for a power off.
pub async fn run_pipeline<E: std::fmt::Display>(
    containers: &[ContainerSpec],
    post_containers: &[ContainerSpec],
    pipefail: bool,
    mut run_one: impl AsyncFnMut(&ContainerSpec, Vec<(String, String)>) -> Result<i32, E>,
) -> PipelineResult {
    let mut res = PipelineResult {
        status: 0,
        failed_by: None,
        shutdown: ShutdownMode::Default,
        outcomes: Vec::new(),
    };
    let mut prev: Option<(String, i32)> = None;
    let all = containers
        .iter()
        .map(|c| (c, false))
        .chain(post_containers.iter().map(|c| (c, true)));
    let mut stopped = false;
    for (spec, post) in all {
        if stopped && !post {
            continue;
        }
        let env = vec![
            ("B2C_PIPELINE_STATUS".to_owned(), res.status.to_string()),
            (
                "B2C_PIPELINE_FAILED_BY".to_owned(),
                res.failed_by.clone().unwrap_or_default(),
            ),
            (
                "B2C_PIPELINE_PREV_CONTAINER".to_owned(),
                prev.as_ref().map(|p| p.0.clone()).unwrap_or_default(),
            ),
            (
                "B2C_PIPELINE_PREV_CONTAINER_EXIT_CODE".to_owned(),
                prev.as_ref().map(|p| p.1.to_string()).unwrap_or_default(),
            ),
            (
                "B2C_PIPELINE_SHUTDOWN_MODE".to_owned(),
                res.shutdown.as_str().to_owned(),
            ),
        ];
        let outcome = run_one(spec, env).await.map_err(|e| e.to_string());
        let code = match &outcome {
            Ok(code) => {
                prev = Some((spec.raw.clone(), *code));
                match code {
                    129 => res.shutdown = ShutdownMode::Reboot,
                    130 => res.shutdown = ShutdownMode::Poweroff,
                    _ => {}
                }
                *code
            }
            Err(e) => {
                tracing::error!(container = %spec.raw, "could not run the container: {e}");
                1
            }
        };
        res.outcomes.push(ContainerOutcome {
            container: spec.raw.clone(),
            post,
            result: outcome,
        });
        if !post && code != 0 {
            if res.status == 0 {
                res.status = code;
                res.failed_by = Some(spec.raw.clone());
            }
            if pipefail {
                stopped = true;
            }
        }
    }
    res
}

/// boot2container's last two console lines for a pipeline status (boot2container
/// prints "Rebooting the computer" instead of the second one when a reboot was asked).
pub fn final_lines(status: i32) -> [String; 2] {
    [
        format!("Execution is over, pipeline status: {status}"),
        "It's now safe to turn off your computer".to_owned(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("b2c-0.post_1"));
        assert!(!valid_name("-x"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(""));
    }

    #[test]
    fn lines() {
        assert_eq!(
            final_lines(3),
            [
                "Execution is over, pipeline status: 3".to_string(),
                "It's now safe to turn off your computer".to_string()
            ]
        );
    }
}
