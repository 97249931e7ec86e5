//! The agent's main line: from the kernel command line to the final console lines.
//!
//! Three modes, chosen on the command line:
//! - `farmgate.agent=register farmgate.gateway=<url>`: describe the machine
//!   ([`crate::hwtags`]), find its console by SALAD's ping/pong, bind it, register with the
//!   gateway, print `MaRS: Registration complete` (CI-tron's registration);
//! - `farmgate.agent=check`: print the machine's tags and `farm-agent: check passed`
//!   (Sergeant Hartman's boot loops and quick checks);
//! - otherwise boot2container's: the `b2c.container`s (then the `b2c.post_container`s)
//!   pulled ([`crate::oci`]) and run with crun ([`crate::run`]) as a pipeline, then the
//!   final lines `Execution is over, pipeline status: N` and
//!   `It's now safe to turn off your computer`.
//!
//! Volumes mirrored with S3 come with [`crate::volume`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cmdline::{B2cConfig, ContainerSpec, ImageTransport};
use crate::run::{PipelineResult, RunRequest};

/// Where the agent keeps its state and what it runs containers with.
#[derive(Debug, Clone)]
pub struct AgentEnv {
    /// Images, containers' root file systems, bundles and volumes go below this.
    pub storage: PathBuf,
    /// The crun binary.
    pub crun: PathBuf,
    /// Timeout of registry requests (connect, and longest pause while reading).
    pub pull_timeout: Duration,
}

impl Default for AgentEnv {
    fn default() -> Self {
        AgentEnv {
            storage: PathBuf::from("/storage"),
            crun: PathBuf::from("/usr/bin/crun"),
            pull_timeout: Duration::from_secs(60),
        }
    }
}

/// What the command line asks the agent to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Register the machine with the gateway at this URL.
    Register {
        /// The gateway's REST API (`http://host:port`).
        gateway: String,
    },
    /// Quick check for the boot loops.
    Check,
    /// boot2container's pipeline.
    Pipeline,
}

/// The mode of a kernel command line (`farmgate.agent=…`, `farmgate.gateway=…`).
pub fn mode_of(cmdline: &str) -> Result<Mode, String> {
    let params = crate::cmdline::split_kernel_cmdline(cmdline).map_err(|e| e.to_string())?;
    let get = |k: &str| {
        params
            .params
            .iter()
            .rev()
            .find(|p| p.key == k)
            .and_then(|p| p.value.clone())
    };
    match get("farmgate.agent").as_deref() {
        None | Some("pipeline") => Ok(Mode::Pipeline),
        Some("check") => Ok(Mode::Check),
        Some("register") => match get("farmgate.gateway") {
            Some(g) if g.starts_with("http://") || g.starts_with("https://") => {
                Ok(Mode::Register { gateway: g })
            }
            Some(g) => Err(format!(
                "farmgate.gateway={g}: expected the gateway's URL (http://host:port)"
            )),
            None => Err("farmgate.agent=register needs farmgate.gateway=<url>".into()),
        },
        Some(other) => Err(format!(
            "farmgate.agent={other}: expected register, check or pipeline"
        )),
    }
}

/// A name for directories and crun ids: `[A-Za-z0-9_.-]`, bounded.
fn safe_name(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(60)
        .collect();
    if out.is_empty() || out.starts_with(['-', '_']) {
        out.insert(0, 'c');
    }
    out
}

/// The image reference of `spec`, for the registries the agent can pull from.
fn image_of(spec: &ContainerSpec) -> Result<crate::oci::ImageRef, String> {
    if let ImageTransport::Other(t) = &spec.image.transport {
        return Err(format!(
            "image {}: the {t} transport is not supported (use docker:// or a plain reference)",
            spec.image
        ));
    }
    crate::oci::ImageRef::parse(&spec.image.reference).map_err(|e| e.to_string())
}

/// The crun id of a container: `<prefix>-<repository>`.
fn container_name(prefix: &str, spec: &ContainerSpec) -> Result<String, String> {
    Ok(format!(
        "{prefix}-{}",
        safe_name(&image_of(spec)?.repository)
    ))
}

/// Pulls the image of `spec` into a fresh root file system and runs it as `name`.
async fn run_container(
    env: &AgentEnv,
    name: String,
    spec: &ContainerSpec,
    volumes: &BTreeMap<String, PathBuf>,
    extra_env: Vec<(String, String)>,
) -> Result<i32, String> {
    let image = image_of(spec)?;
    let dir = env.storage.join("containers").join(&name);
    // A container changes its root file system: every run starts from the image.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let rootfs = dir.join("rootfs");
    let opts = crate::oci::PullOptions {
        insecure: spec.tls_verify == Some(false),
        blob_cache: Some(env.storage.join("blobs")),
        timeout: env.pull_timeout,
        ..Default::default()
    };
    println!(
        "farm-agent: [{:.2} s] pulling {}",
        crate::boot::uptime(),
        spec.image
    );
    let config = crate::oci::pull(&image, &rootfs, &opts)
        .await
        .map_err(|e| e.to_string())?;
    let bundle = dir.join("bundle");
    let req = RunRequest {
        spec,
        image: &config,
        rootfs: &rootfs,
        volumes,
        extra_env,
        bundle_dir: &bundle,
        name,
    };
    println!(
        "farm-agent: [{:.2} s] image ready, starting {}",
        crate::boot::uptime(),
        req.name
    );
    crate::run::run(&req, &env.crun)
        .await
        .map_err(|e| e.to_string())
}

/// The named volumes the containers use, as directories under the storage (created).
pub fn volume_dirs(cfg: &B2cConfig, env: &AgentEnv) -> Result<BTreeMap<String, PathBuf>, String> {
    let mut names: Vec<String> = cfg.volumes.iter().map(|v| v.name.clone()).collect();
    for c in cfg.containers.iter().chain(&cfg.post_containers) {
        for m in &c.volumes {
            if let crate::cmdline::MountSource::Named(n) = &m.source {
                names.push(n.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    for n in names {
        let dir = env.storage.join("volumes").join(safe_name(&n));
        std::fs::create_dir_all(&dir).map_err(|e| format!("volume {n}: {}: {e}", dir.display()))?;
        out.insert(n, dir);
    }
    Ok(out)
}

/// boot2container's pipeline for `cfg`: every container pulled and run, in order; what
/// it printed goes to the console (the agent's stdout). Returns the pipeline's result;
/// the caller prints [`crate::run::final_lines`] and powers off.
pub async fn run_b2c(cfg: &B2cConfig, env: &AgentEnv) -> PipelineResult {
    use crate::cmdline::Trigger;
    let volumes = match volume_dirs(cfg, env) {
        Ok(v) => v,
        Err(e) => {
            println!("farm-agent: {e}");
            BTreeMap::new()
        }
    };
    // The volumes mirrored with S3 (`b2c.volume` with mirror/pull_from/push_to).
    let mut mirrors = Vec::new();
    for v in &cfg.volumes {
        let Some(dir) = volumes.get(&v.name) else {
            continue;
        };
        match crate::volume::VolumeMirror::new(v, &cfg.minio, dir.clone()) {
            Ok(m) => mirrors.push(m),
            Err(e) => println!("farm-agent: volume {}: {e}", v.name),
        }
    }
    async fn trigger_all(mirrors: &mut [crate::volume::VolumeMirror], t: Trigger) {
        for m in mirrors.iter_mut() {
            if let Err(e) = m.on(t).await {
                println!("farm-agent: volume {}: {e}", m.dir().display());
            }
        }
    }
    trigger_all(&mut mirrors, Trigger::PipelineStart).await;
    let services = start_services(cfg, env, &volumes);
    let mut index = 0usize;
    let volumes_ref = &volumes;
    let mirrors_ref = &mut mirrors;
    let result = crate::run::run_pipeline(
        &cfg.containers,
        &cfg.post_containers,
        cfg.pipefail,
        async |spec: &ContainerSpec, extra: Vec<(String, String)>| {
            index += 1;
            trigger_all(mirrors_ref, Trigger::ContainerStart).await;
            let r = match container_name(&format!("b2c-{index}"), spec) {
                Ok(name) => run_container(env, name, spec, volumes_ref, extra).await,
                Err(e) => Err(e),
            };
            if let Err(e) = &r {
                println!("farm-agent: container {}: {e}", spec.image);
            }
            trigger_all(mirrors_ref, Trigger::ContainerEnd).await;
            r
        },
    )
    .await;
    stop_services(services, &env.crun).await;
    trigger_all(&mut mirrors, Trigger::PipelineEnd).await;
    result
}

/// A `b2c.service` container running in the background.
struct Service {
    name: String,
    image: String,
    task: tokio::task::JoinHandle<Result<i32, String>>,
}

/// Starts the `b2c.service` containers, each pulled and run in the background for the
/// pipeline's duration (their output goes to the console like the others').
fn start_services(
    cfg: &B2cConfig,
    env: &AgentEnv,
    volumes: &BTreeMap<String, PathBuf>,
) -> Vec<Service> {
    let mut out = Vec::new();
    for (i, spec) in cfg.services.iter().enumerate() {
        let name = match container_name(&format!("svc-{}", i + 1), spec) {
            Ok(n) => n,
            Err(e) => {
                println!("farm-agent: service {}: {e}", spec.image);
                continue;
            }
        };
        println!("farm-agent: starting service {} ({name})", spec.image);
        let (env, spec_c, volumes, task_name) =
            (env.clone(), spec.clone(), volumes.clone(), name.clone());
        let task = tokio::spawn(async move {
            run_container(&env, task_name, &spec_c, &volumes, Vec::new()).await
        });
        out.push(Service {
            name,
            image: spec.image.to_string(),
            task,
        });
    }
    out
}

/// Stops the services: SIGTERM, then SIGKILL after [`SERVICE_STOP_GRACE`].
async fn stop_services(services: Vec<Service>, crun: &Path) {
    for mut svc in services {
        let mut result = None;
        if svc.task.is_finished() {
            result = Some((&mut svc.task).await);
        } else {
            for signal in ["TERM", "KILL"] {
                let _ = tokio::process::Command::new(crun)
                    .args(["kill", svc.name.as_str(), signal])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .await;
                if let Ok(r) = tokio::time::timeout(SERVICE_STOP_GRACE, &mut svc.task).await {
                    result = Some(r);
                    break;
                }
            }
        }
        match result {
            None => {
                svc.task.abort();
                println!("farm-agent: service {} did not stop", svc.image);
            }
            Some(Ok(Ok(code))) => println!("farm-agent: service {} ended ({code})", svc.image),
            Some(Ok(Err(e))) => println!("farm-agent: service {}: {e}", svc.image),
            Some(Err(e)) => println!("farm-agent: service {}: {e}", svc.image),
        }
    }
}

/// How long a service has to stop after SIGTERM (then SIGKILL) at the pipeline's end.
pub const SERVICE_STOP_GRACE: Duration = Duration::from_secs(5);

/// The storage directory the agent uses when `/storage` is not there.
pub fn default_storage() -> PathBuf {
    let s = Path::new("/storage");
    if s.is_dir() {
        s.to_path_buf()
    } else {
        std::env::temp_dir().join("farm-agent")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_from_the_command_line() {
        assert_eq!(
            mode_of("console=ttyS0 b2c.container=x").unwrap(),
            Mode::Pipeline
        );
        assert_eq!(mode_of("farmgate.agent=check").unwrap(), Mode::Check);
        assert_eq!(
            mode_of("farmgate.agent=register farmgate.gateway=http://10.42.0.1:8000").unwrap(),
            Mode::Register {
                gateway: "http://10.42.0.1:8000".into()
            }
        );
        assert!(
            mode_of("farmgate.agent=register")
                .unwrap_err()
                .contains("farmgate.gateway")
        );
        assert!(mode_of("farmgate.agent=register farmgate.gateway=10.0.0.1").is_err());
        assert!(
            mode_of("farmgate.agent=dance")
                .unwrap_err()
                .contains("dance")
        );
    }

    #[test]
    fn safe_names() {
        assert_eq!(
            safe_name("docker.io/library/alpine"),
            "docker_io_library_alpine"
        );
        assert_eq!(safe_name(""), "c");
        assert_eq!(safe_name("-x"), "c-x");
        assert!(safe_name(&"a".repeat(500)).len() <= 61);
    }
}
