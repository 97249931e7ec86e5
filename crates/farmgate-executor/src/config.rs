//! Gateway configuration, read from environment variables.
//!
//! The names and defaults are seed 001's (`FARM_NAME`, `EXECUTOR_*`, `MARS_DB_FILE`,
//! `SALAD_*`, `SERGENT_HARTMAN_*`, `BOOTS_DEFAULT_*`, ...) so a CI-tron gateway's
//! environment file works unchanged; farmgate's own additions start with `FARMGATE_`.
//! Parsing takes a map rather than reading the process environment so it can be tested,
//! and every bad value is reported with the variable's name.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A configuration value that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A mandatory variable is missing.
    #[error("{name} is not set: {hint}")]
    Missing {
        /// Variable name.
        name: &'static str,
        /// What to set it to.
        hint: &'static str,
    },
    /// A variable has a value we cannot use.
    #[error("{name}={value:?}: {why}")]
    Invalid {
        /// Variable name.
        name: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A `*_FILE` secret could not be read.
    #[error("{name}: cannot read {path}: {source}")]
    SecretFile {
        /// Variable name.
        name: String,
        /// File it points to.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// Everything the daemon needs, with seed 001's defaults.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// `FARM_NAME`: name of the farm, prefix of DUT names (mandatory).
    pub farm_name: String,
    /// `EXECUTOR_HOST`: address the REST API binds (default `0.0.0.0`).
    pub executor_host: IpAddr,
    /// `EXECUTOR_PORT`: port of the REST API (default 80).
    pub executor_port: u16,
    /// `EXECUTOR_URL`: how DUTs and local services reach the API (default `http://ci-gateway`).
    pub executor_url: String,
    /// `MARS_DB_FILE`: the MaRS DB YAML file (default `/config/mars_db.yaml`).
    pub mars_db_file: PathBuf,
    /// `FARMGATE_STATE_DIR`: SQLite database, job logs, locks (default `/var/lib/farmgate`).
    pub state_dir: PathBuf,
    /// `BOOTS_TFTP_ROOT`: what the TFTP server serves (default `/cache/boots/tftp`).
    pub boots_tftp_root: PathBuf,
    /// `BOOTS_TFTP_PORT` (farmgate's): UDP port of the TFTP server (default 69).
    pub boots_tftp_port: u16,
    /// `FARMGATE_NTP_PORT`: UDP port of the SNTP server DUTs set their clock from
    /// (`b2c.ntp_peer=ci-gateway`; default 123, 0: none).
    pub ntp_port: u16,
    /// `BOOTS_DISABLE_SERVERS`: any non-empty value turns the netboot servers off.
    pub boots_disable_servers: bool,
    /// `SALAD_URL`: where job runners find the console relay (default `http://ci-gateway:8005`).
    pub salad_url: String,
    /// `SALAD_PORT`: port of SALAD's REST API (default 8005).
    pub salad_port: u16,
    /// `SALAD_TCPCONSOLE_PORT`: where network consoles (QEMU serial ports) connect
    /// (default 8100; 0 disables them).
    pub salad_tcpconsole_port: u16,
    /// `PRIVATE_INTERFACE`: the network interface of the DUTs' network, where the DHCP
    /// server answers (default `private`; when it does not exist, no DHCP is served).
    pub private_interface: String,
    /// `SALAD_SERIAL_PORTS`: colon-separated globs of serial devices to watch
    /// (default `/dev/ttyUSB*:/dev/ttyACM*`).
    pub salad_serial_globs: Vec<String>,
    /// `SERGENT_HARTMAN_BOOT_COUNT`: training rounds; 0 = ready at registration; negative
    /// disables registration, training and quick checks (default 100).
    pub hartman_boot_count: i64,
    /// `SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT`: passing rounds needed (default 100).
    pub hartman_qualifying_boot_count: u32,
    /// `SERGENT_HARTMAN_REGISTRATION_RETRIAL_DELAY`: pause before training again after a
    /// failed training (default 120 s).
    pub hartman_retrial_delay: Duration,
    /// `SERGENT_HARTMAN_QUICK_CHECK`: boot-check DUTs after a gateway reboot or an
    /// activation (default enabled).
    pub hartman_quick_check: bool,
    /// `FARMGATE_DEFAULT_PDU_OFF_DELAY`: `pdu_off_delay` given to machines that register
    /// themselves (seconds, default 30 as in seed 001; virtual machines need none).
    pub default_pdu_off_delay: f64,
    /// `FARMGATE_PDU_POLL_INTERVAL`: seconds between two reads of every PDU's ports
    /// (default 1). A PDU failing 3 polls in a row counts as not answering.
    pub pdu_poll_interval: Duration,
    /// `FARMGATE_UI_VENDOR_DIR`: a directory with the dashboard's xterm.js and xterm.css,
    /// served instead of those built into the binary.
    pub ui_vendor_dir: Option<PathBuf>,
    /// `BOOTS_DEFAULT_*`: every default boot variable, by its full name.
    pub boots_defaults: BTreeMap<String, String>,
    /// `CONSOLE_PATTERN_DEFAULT_MACHINE_UNFIT_FOR_SERVICE_REGEX`: farm-wide unfit pattern.
    pub default_unfit_regex: Option<String>,
    /// `EXECUTOR_BOOTLOOP_JOB`: job template of training rounds and quick checks
    /// (default: the built-in one).
    pub bootloop_job: Option<PathBuf>,
    /// `FARMGATE_ADMIN_TOKEN` (or `_FILE`): bearer token of admin actions.
    pub admin_token: Option<String>,
    /// `FARMGATE_SUBMIT_TOKEN` (or `_FILE`): bearer token for job submission; the admin
    /// token works too.
    pub submit_token: Option<String>,
    /// `FARMGATE_RUNNER_EXE`: program run for each job (default: this executable).
    pub runner_exe: Option<PathBuf>,
    /// `EXECUTOR_JOB__*` variables, lower-cased without the prefix, for job templates.
    pub job_env: BTreeMap<String, String>,
    /// Storage and caches (issue 4): see [`StorageConfig`].
    pub storage: StorageConfig,
    /// `FARMGATE_DUT_NETWORKS`: networks allowed to use the DUT-facing endpoints
    /// (`a.b.c.d/n` or IPv6, comma-separated; `*`: any). `None`: the default, loopback
    /// and the subnet of `PRIVATE_INTERFACE`.
    pub dut_networks: Option<Vec<(IpAddr, u8)>>,
}

fn parse_networks(name: &str, v: &str) -> Result<Vec<(IpAddr, u8)>, ConfigError> {
    if v.trim() == "*" {
        return Ok(Vec::new());
    }
    v.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            let (addr, prefix) = n.split_once('/').unwrap_or((n, ""));
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| invalid(name, n, "expected an address/prefix like 10.42.0.0/24"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let prefix = if prefix.is_empty() {
                max
            } else {
                prefix
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= max)
                    .ok_or_else(|| invalid(name, n, "bad prefix length"))?
            };
            Ok((ip, prefix))
        })
        .collect()
}

/// The object store, the artifact cache and the registry cache.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// `FARMGATE_S3_PORT`: port of the embedded S3 endpoint (default 9000, MinIO's; 0: none).
    pub s3_port: u16,
    /// `FARMGATE_S3_DIR`: its data (default `<state>/s3`).
    pub s3_dir: PathBuf,
    /// `FARMGATE_S3_URL`: the S3 URL as DUTs reach it (`minio_url` in jobs; default
    /// `EXECUTOR_URL`'s host on `FARMGATE_S3_PORT`).
    pub s3_url: String,
    /// `MINIO_ROOT_USER` / `MINIO_ROOT_PASSWORD` (MinIO's names): admin credentials of
    /// the S3 endpoint (default: generated into the state dir).
    pub s3_admin: Option<(String, String)>,
    /// `FARMGATE_CACHE_DIR`: the artifact cache (default `<state>/cache`).
    pub cache_dir: PathBuf,
    /// `FARMGATE_CACHE_MAX_SIZE`: its size bound in bytes, `K`/`M`/`G`/`T` suffixes
    /// allowed (default 20G).
    pub cache_max_bytes: u64,
    /// `FARMGATE_CACHE_TTL`: seconds before a cached artifact is checked again
    /// (default 86400).
    pub cache_ttl: Duration,
    /// `FARMGATE_CACHE_ALLOW_HOSTS`: comma-separated hosts (`*.suffix` allowed) the cache
    /// may fetch from (default: any).
    pub cache_allow_hosts: Option<Vec<String>>,
    /// `FARMGATE_REGISTRY_PORT`: port of the OCI registry cache (default 8002; 0: none).
    pub registry_port: u16,
    /// `FARMGATE_REGISTRY_DIR`: its data (default `<state>/registry`).
    pub registry_dir: PathBuf,
    /// `FARMGATE_REGISTRY_UPSTREAMS`: `prefix=url` pairs, comma-separated (default
    /// docker.io, quay.io, ghcr.io, registry.freedesktop.org).
    pub registry_upstreams: Vec<(String, String)>,
    /// `FARMGATE_REGISTRY_TAG_TTL`: seconds a tag is trusted before it is checked
    /// upstream again (default 300).
    pub registry_tag_ttl: Duration,
    /// `FARMGATE_REGISTRY_MAX_SIZE`: size bound of the registry cache's blobs (least
    /// recently used go first; `K`/`M`/`G`/`T` suffixes; default: unbounded).
    pub registry_max_bytes: Option<u64>,
    /// `MINIO_URL`: an external S3 store (MinIO, Garage, Ceph, AWS) holding the objects;
    /// the gateway's S3 endpoint checks the keys and forwards there, re-signed with
    /// `MINIO_ROOT_USER`/`MINIO_ROOT_PASSWORD` (then required). Default: local disk.
    pub s3_remote_url: Option<String>,
    /// `FARMGATE_S3_REGION`: the region of the S3 endpoint and of the external store
    /// (default us-east-1).
    pub s3_region: String,
    /// `FARMGATE_EXTRA_CA_FILE`: PEM certificates trusted, besides the usual roots, for
    /// https upstreams of the caches (a private registry or artifact server).
    pub extra_ca_file: Option<PathBuf>,
}

/// Default upstreams of the registry cache.
pub const DEFAULT_REGISTRY_UPSTREAMS: &str = "docker.io=https://registry-1.docker.io,quay.io=https://quay.io,ghcr.io=https://ghcr.io,registry.freedesktop.org=https://registry.freedesktop.org";

/// A size with an optional `K`, `M`, `G` or `T` suffix (powers of 1024).
fn parse_size(name: &str, v: &str) -> Result<u64, ConfigError> {
    let t = v.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some('T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| invalid(name, v, "expected a size in bytes, e.g. 500M or 20G"))
}

impl StorageConfig {
    fn from_env(
        env: &BTreeMap<String, String>,
        state_dir: &std::path::Path,
        executor_url: &str,
    ) -> Result<StorageConfig, ConfigError> {
        let get = |name: &str| env.get(name).filter(|v| !v.is_empty()).cloned();
        let s3_port = parse_or(env, "FARMGATE_S3_PORT", 9000)?;
        let host = executor_url
            .split("://")
            .nth(1)
            .unwrap_or(executor_url)
            .split(['/', ':'])
            .next()
            .unwrap_or("ci-gateway")
            .to_string();
        let s3_admin = match (get("MINIO_ROOT_USER"), get("MINIO_ROOT_PASSWORD")) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "MINIO_ROOT_USER",
                    "",
                    "MINIO_ROOT_USER and MINIO_ROOT_PASSWORD go together",
                ));
            }
        };
        let s3_remote_url = get("MINIO_URL");
        if let Some(url) = &s3_remote_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid(
                    "MINIO_URL",
                    url,
                    "expected an http:// or https:// URL",
                ));
            }
            if s3_admin.is_none() {
                return Err(invalid(
                    "MINIO_URL",
                    url,
                    "an external store needs its credentials in MINIO_ROOT_USER and MINIO_ROOT_PASSWORD",
                ));
            }
        }
        let registry_upstreams = get("FARMGATE_REGISTRY_UPSTREAMS")
            .unwrap_or_else(|| DEFAULT_REGISTRY_UPSTREAMS.into())
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|pair| match pair.split_once('=') {
                Some((prefix, url))
                    if !prefix.trim().is_empty()
                        && (url.starts_with("http://") || url.starts_with("https://")) =>
                {
                    Ok((prefix.trim().to_string(), url.trim().to_string()))
                }
                _ => Err(invalid(
                    "FARMGATE_REGISTRY_UPSTREAMS",
                    pair,
                    "expected prefix=http(s)://url pairs, comma-separated",
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(StorageConfig {
            s3_port,
            s3_dir: get("FARMGATE_S3_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| state_dir.join("s3")),
            s3_url: get("FARMGATE_S3_URL").unwrap_or_else(|| format!("http://{host}:{s3_port}")),
            s3_admin,
            cache_dir: get("FARMGATE_CACHE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| state_dir.join("cache")),
            cache_max_bytes: match get("FARMGATE_CACHE_MAX_SIZE") {
                Some(v) => parse_size("FARMGATE_CACHE_MAX_SIZE", &v)?,
                None => 20 << 30,
            },
            cache_ttl: Duration::from_secs(parse_or(env, "FARMGATE_CACHE_TTL", 86_400)?),
            cache_allow_hosts: get("FARMGATE_CACHE_ALLOW_HOSTS").map(|v| {
                v.split(',')
                    .map(|h| h.trim().to_string())
                    .filter(|h| !h.is_empty())
                    .collect()
            }),
            registry_port: parse_or(env, "FARMGATE_REGISTRY_PORT", 8002)?,
            registry_dir: get("FARMGATE_REGISTRY_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| state_dir.join("registry")),
            registry_upstreams,
            registry_tag_ttl: Duration::from_secs(parse_or(env, "FARMGATE_REGISTRY_TAG_TTL", 300)?),
            registry_max_bytes: match get("FARMGATE_REGISTRY_MAX_SIZE") {
                Some(v) => match parse_size("FARMGATE_REGISTRY_MAX_SIZE", &v)? {
                    0 => {
                        return Err(invalid(
                            "FARMGATE_REGISTRY_MAX_SIZE",
                            &v,
                            "must be more than 0 (leave it unset for no bound)",
                        ));
                    }
                    n => Some(n),
                },
                None => None,
            },
            s3_remote_url,
            s3_region: get("FARMGATE_S3_REGION").unwrap_or_else(|| "us-east-1".into()),
            extra_ca_file: get("FARMGATE_EXTRA_CA_FILE").map(PathBuf::from),
        })
    }
}

/// The files `farmgate image build` publishes in `BOOTS_TFTP_ROOT` for an architecture
/// (`x86_64`, `aarch64`): kernel, initramfs and kernel command line, in that order.
pub fn built_image_files(arch: &str) -> [String; 3] {
    let arch = arch.to_ascii_lowercase();
    [
        format!("default_{arch}_kernel"),
        format!("default_{arch}_initrd"),
        format!("default_{arch}_cmdline"),
    ]
}

/// Default of `BOOTS_DEFAULT_CMDLINE`, as seed 001 gives it.
pub const DEFAULT_BOOT_CMDLINE: &str = "b2c.container=\"-ti --tls-verify=false docker://ci-gateway:8002/gfx-ci/ci-tron/machine-registration:latest register\" b2c.ntp_peer=\"ci-gateway\" b2c.cache_device=none loglevel=6";

impl GatewayConfig {
    /// Read the configuration of this process's environment.
    pub fn from_process_env() -> Result<GatewayConfig, ConfigError> {
        GatewayConfig::from_env(&std::env::vars().collect())
    }

    /// Read the configuration from a map of variables.
    pub fn from_env(env: &BTreeMap<String, String>) -> Result<GatewayConfig, ConfigError> {
        let get = |name: &str| env.get(name).filter(|v| !v.is_empty()).cloned();
        let farm_name = get("FARM_NAME").ok_or(ConfigError::Missing {
            name: "FARM_NAME",
            hint: "give your farm a name, e.g. FARM_NAME=myfarm",
        })?;
        if !farm_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "FARM_NAME",
                &farm_name,
                "use letters, digits, '-' and '_' only",
            ));
        }
        let mut boots_defaults = BTreeMap::new();
        let mut job_env = BTreeMap::new();
        for (k, v) in env {
            if k.starts_with("BOOTS_DEFAULT_") {
                boots_defaults.insert(k.clone(), v.clone());
            }
            if let Some(rest) = k.strip_prefix("EXECUTOR_JOB__") {
                job_env.insert(rest.to_lowercase(), v.clone());
            }
        }
        let default_unfit_regex = get("CONSOLE_PATTERN_DEFAULT_MACHINE_UNFIT_FOR_SERVICE_REGEX");
        if let Some(re) = &default_unfit_regex {
            regex::bytes::Regex::new(re).map_err(|e| {
                invalid(
                    "CONSOLE_PATTERN_DEFAULT_MACHINE_UNFIT_FOR_SERVICE_REGEX",
                    re,
                    &e.to_string(),
                )
            })?;
        }
        let state_dir: PathBuf = get("FARMGATE_STATE_DIR")
            .unwrap_or_else(|| "/var/lib/farmgate".into())
            .into();
        let executor_url = get("EXECUTOR_URL").unwrap_or_else(|| "http://ci-gateway".into());
        let storage = StorageConfig::from_env(env, &state_dir, &executor_url)?;
        Ok(GatewayConfig {
            farm_name,
            executor_host: parse_or(env, "EXECUTOR_HOST", "0.0.0.0".parse().expect("valid"))?,
            executor_port: parse_or(env, "EXECUTOR_PORT", 80)?,
            executor_url,
            mars_db_file: get("MARS_DB_FILE")
                .unwrap_or_else(|| "/config/mars_db.yaml".into())
                .into(),
            state_dir,
            boots_tftp_root: get("BOOTS_TFTP_ROOT")
                .unwrap_or_else(|| "/cache/boots/tftp".into())
                .into(),
            boots_tftp_port: parse_or(env, "BOOTS_TFTP_PORT", 69)?,
            ntp_port: parse_or(env, "FARMGATE_NTP_PORT", 123)?,
            boots_disable_servers: get("BOOTS_DISABLE_SERVERS").is_some_and(|v| !v.is_empty()),
            salad_url: get("SALAD_URL").unwrap_or_else(|| "http://ci-gateway:8005".into()),
            salad_port: parse_or(env, "SALAD_PORT", 8005)?,
            salad_tcpconsole_port: parse_or(env, "SALAD_TCPCONSOLE_PORT", 8100)?,
            private_interface: get("PRIVATE_INTERFACE").unwrap_or_else(|| "private".into()),
            salad_serial_globs: get("SALAD_SERIAL_PORTS")
                .unwrap_or_else(|| "/dev/ttyUSB*:/dev/ttyACM*".into())
                .split(':')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            hartman_boot_count: parse_or(env, "SERGENT_HARTMAN_BOOT_COUNT", 100)?,
            hartman_qualifying_boot_count: parse_or(
                env,
                "SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT",
                100,
            )?,
            hartman_retrial_delay: {
                let d: f64 = parse_or(env, "SERGENT_HARTMAN_REGISTRATION_RETRIAL_DELAY", 120.0)?;
                Duration::try_from_secs_f64(d).map_err(|_| ConfigError::Invalid {
                    name: "SERGENT_HARTMAN_REGISTRATION_RETRIAL_DELAY".into(),
                    value: d.to_string(),
                    why: "expected a number of seconds >= 0".into(),
                })?
            },
            hartman_quick_check: parse_bool(env, "SERGENT_HARTMAN_QUICK_CHECK", true)?,
            default_pdu_off_delay: {
                let d: f64 = parse_or(env, "FARMGATE_DEFAULT_PDU_OFF_DELAY", 30.0)?;
                if !(d.is_finite() && d >= 0.0) {
                    return Err(ConfigError::Invalid {
                        name: "FARMGATE_DEFAULT_PDU_OFF_DELAY".into(),
                        value: d.to_string(),
                        why: "expected a number of seconds >= 0".into(),
                    });
                }
                d
            },
            pdu_poll_interval: {
                let d: f64 = parse_or(env, "FARMGATE_PDU_POLL_INTERVAL", 1.0)?;
                if !(d.is_finite() && (0.05..=3600.0).contains(&d)) {
                    return Err(ConfigError::Invalid {
                        name: "FARMGATE_PDU_POLL_INTERVAL".into(),
                        value: d.to_string(),
                        why: "expected a number of seconds between 0.05 and 3600".into(),
                    });
                }
                Duration::from_secs_f64(d)
            },
            ui_vendor_dir: get("FARMGATE_UI_VENDOR_DIR").map(PathBuf::from),
            boots_defaults,
            default_unfit_regex,
            bootloop_job: get("EXECUTOR_BOOTLOOP_JOB").map(PathBuf::from),
            admin_token: secret(env, "FARMGATE_ADMIN_TOKEN")?,
            submit_token: secret(env, "FARMGATE_SUBMIT_TOKEN")?,
            runner_exe: get("FARMGATE_RUNNER_EXE").map(PathBuf::from),
            job_env,
            storage,
            dut_networks: get("FARMGATE_DUT_NETWORKS")
                .map(|v| parse_networks("FARMGATE_DUT_NETWORKS", &v))
                .transpose()?,
        })
    }

    /// The SQLite database file.
    pub fn database_path(&self) -> PathBuf {
        self.state_dir.join("farmgate.sqlite")
    }

    /// Directory of the per-DUT lock files held by job runners.
    pub fn locks_dir(&self) -> PathBuf {
        self.state_dir.join("locks")
    }

    /// Directory of the PDU locks: one file per PDU, held by whichever process (the
    /// daemon or a job runner) is talking to that PDU.
    pub fn pdu_locks_dir(&self) -> PathBuf {
        self.state_dir.join("pdu-locks")
    }

    /// Directory of the job runners' own logs.
    pub fn runner_logs_dir(&self) -> PathBuf {
        self.state_dir.join("runners")
    }

    /// Resolve one `BOOTS_DEFAULT_*` value (`KERNEL`, `INITRD` or `CMDLINE`) with seed 001's
    /// chain: bootloader+arch+platform, arch+platform, bootloader+arch, arch, bootloader,
    /// then the plain variable, then the built-in default.
    pub fn boot_default(
        &self,
        what: &str,
        bootloader: Option<&str>,
        arch: Option<&str>,
        platform: Option<&str>,
    ) -> Option<String> {
        let mut candidates = Vec::new();
        let parts: [(bool, bool, bool); 6] = [
            (true, true, true),
            (false, true, true),
            (true, true, false),
            (false, true, false),
            (true, false, false),
            (false, false, false),
        ];
        for (use_bl, use_arch, use_platform) in parts {
            let mut name = String::from("BOOTS_DEFAULT_");
            if use_bl {
                match bootloader {
                    Some(b) => name.push_str(&format!("{}_", b.to_uppercase())),
                    None => continue,
                }
            }
            if use_arch {
                match arch {
                    Some(a) => name.push_str(&format!("{}_", a.to_uppercase())),
                    None => continue,
                }
            }
            if use_platform {
                match platform {
                    Some(p) => name.push_str(&format!("{}_", p.to_uppercase())),
                    None => continue,
                }
            }
            name.push_str(what);
            candidates.push(name);
        }
        for name in candidates {
            if let Some(v) = self.boots_defaults.get(&name) {
                return Some(v.clone());
            }
        }
        if let Some(v) = self.built_image_default(what, arch) {
            return Some(v);
        }
        match what {
            "KERNEL" => Some("http://ci-gateway:9000/boot/default_kernel".into()),
            "INITRD" => Some("http://ci-gateway:9000/boot/default_boot2container.cpio.xz".into()),
            "CMDLINE" => Some(DEFAULT_BOOT_CMDLINE.into()),
            _ => None,
        }
    }
}

impl GatewayConfig {
    /// `KERNEL`, `INITRD` or `CMDLINE` of the image `farmgate image build` published in
    /// `BOOTS_TFTP_ROOT` for `arch` (else for the gateway's own architecture), served at
    /// `<EXECUTOR_URL>/boot/`; `None` when there is no such image.
    fn built_image_default(&self, what: &str, arch: Option<&str>) -> Option<String> {
        let mut arches: Vec<String> = arch.map(|a| a.to_ascii_lowercase()).into_iter().collect();
        arches.push(std::env::consts::ARCH.to_string());
        for a in arches {
            let [kernel, initrd, cmdline] = built_image_files(&a);
            if !self.boots_tftp_root.join(&kernel).is_file() {
                continue;
            }
            let url = |f: &str| format!("{}/boot/{f}", self.executor_url.trim_end_matches('/'));
            return match what {
                "KERNEL" => Some(url(&kernel)),
                "INITRD" => Some(url(&initrd)),
                "CMDLINE" => std::fs::read_to_string(self.boots_tftp_root.join(&cmdline))
                    .ok()
                    .map(|t| t.trim().to_string()),
                _ => None,
            };
        }
        None
    }
}

fn invalid(name: &str, value: &str, why: &str) -> ConfigError {
    ConfigError::Invalid {
        name: name.into(),
        value: value.into(),
        why: why.into(),
    }
}

fn parse_or<T: std::str::FromStr>(
    env: &BTreeMap<String, String>,
    name: &str,
    default: T,
) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match env.get(name).filter(|v| !v.is_empty()) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|e: T::Err| invalid(name, v, &e.to_string())),
    }
}

fn parse_bool(
    env: &BTreeMap<String, String>,
    name: &str,
    default: bool,
) -> Result<bool, ConfigError> {
    match env.get(name).map(|v| v.trim().to_lowercase()) {
        None => Ok(default),
        Some(v) => match v.as_str() {
            "" => Ok(default),
            "1" | "true" | "yes" | "on" | "enabled" | "enable" => Ok(true),
            "0" | "false" | "no" | "off" | "disabled" | "disable" => Ok(false),
            _ => Err(invalid(
                name,
                &v,
                "expected enabled/disabled, true/false, yes/no or 1/0",
            )),
        },
    }
}

/// A secret from `NAME` or from the file named by `NAME_FILE`.
fn secret(env: &BTreeMap<String, String>, name: &str) -> Result<Option<String>, ConfigError> {
    if let Some(v) = env.get(name).filter(|v| !v.is_empty()) {
        return Ok(Some(v.clone()));
    }
    let file_var = format!("{name}_FILE");
    match env.get(&file_var).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(path) => std::fs::read_to_string(path)
            .map(|s| Some(s.trim().to_string()))
            .map_err(|source| ConfigError::SecretFile {
                name: file_var,
                path: path.clone(),
                source,
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn seed_defaults_apply() {
        let c = GatewayConfig::from_env(&env(&[("FARM_NAME", "farm")])).expect("valid");
        assert_eq!(c.executor_port, 80);
        assert_eq!(c.salad_port, 8005);
        assert_eq!(c.mars_db_file, PathBuf::from("/config/mars_db.yaml"));
        assert_eq!(c.hartman_boot_count, 100);
        assert_eq!(c.hartman_qualifying_boot_count, 100);
        assert_eq!(c.hartman_retrial_delay, Duration::from_secs(120));
        assert!(c.hartman_quick_check);
        assert_eq!(
            c.boot_default("CMDLINE", None, None, None).as_deref(),
            Some(DEFAULT_BOOT_CMDLINE)
        );
        assert_eq!(c.boots_tftp_root, PathBuf::from("/cache/boots/tftp"));
        assert_eq!(c.boots_tftp_port, 69);
        assert_eq!(c.ntp_port, 123);
        assert!(!c.boots_disable_servers);
        assert_eq!(c.default_pdu_off_delay, 30.0);
    }

    #[test]
    fn netboot_servers_can_be_moved_or_disabled() {
        let c = GatewayConfig::from_env(&env(&[
            ("FARM_NAME", "farm"),
            ("BOOTS_TFTP_PORT", "6969"),
            ("BOOTS_DISABLE_SERVERS", "1"),
        ]))
        .expect("valid");
        assert_eq!(c.boots_tftp_port, 6969);
        assert!(c.boots_disable_servers);
        let e =
            GatewayConfig::from_env(&env(&[("FARM_NAME", "farm"), ("BOOTS_TFTP_PORT", "70000")]))
                .expect_err("out of range");
        assert!(e.to_string().contains("BOOTS_TFTP_PORT"), "{e}");
    }

    #[test]
    fn missing_farm_name_is_named() {
        let e = GatewayConfig::from_env(&env(&[])).expect_err("must fail");
        assert!(e.to_string().starts_with("FARM_NAME is not set"), "{e}");
    }

    #[test]
    fn bad_numbers_name_the_variable() {
        let e = GatewayConfig::from_env(&env(&[("FARM_NAME", "f"), ("EXECUTOR_PORT", "eighty")]))
            .expect_err("must fail");
        assert_eq!(
            e.to_string(),
            "EXECUTOR_PORT=\"eighty\": invalid digit found in string"
        );
        let e = GatewayConfig::from_env(&env(&[
            ("FARM_NAME", "f"),
            ("SERGENT_HARTMAN_QUICK_CHECK", "maybe"),
        ]))
        .expect_err("must fail");
        assert!(e.to_string().contains("SERGENT_HARTMAN_QUICK_CHECK"), "{e}");
    }

    #[test]
    fn a_built_image_is_the_default_unless_a_variable_says_otherwise() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path().to_string_lossy().to_string();
        let base = [
            ("FARM_NAME", "f"),
            ("BOOTS_TFTP_ROOT", r.as_str()),
            ("EXECUTOR_URL", "http://10.42.0.1:8000/"),
        ];
        let c = GatewayConfig::from_env(&env(&base)).expect("valid");
        // No image yet: seed 001's built-in defaults.
        assert_eq!(
            c.boot_default("KERNEL", Some("IPXE"), None, None)
                .as_deref(),
            Some("http://ci-gateway:9000/boot/default_kernel")
        );
        let [k, i, cmd] = built_image_files("AARCH64");
        assert_eq!(k, "default_aarch64_kernel");
        for f in [&k, &i] {
            std::fs::write(root.path().join(f), b"x").unwrap();
        }
        std::fs::write(root.path().join(&cmd), "farmgate.agent=register x=1\n").unwrap();
        assert_eq!(
            c.boot_default("KERNEL", Some("IPXE"), Some("aarch64"), None)
                .as_deref(),
            Some("http://10.42.0.1:8000/boot/default_aarch64_kernel")
        );
        assert_eq!(
            c.boot_default("INITRD", Some("IPXE"), Some("AARCH64"), None)
                .as_deref(),
            Some("http://10.42.0.1:8000/boot/default_aarch64_initrd")
        );
        assert_eq!(
            c.boot_default("CMDLINE", None, Some("aarch64"), None)
                .as_deref(),
            Some("farmgate.agent=register x=1")
        );
        // Another architecture without an image of its own, and no image of the
        // gateway's architecture: the seed's defaults again.
        if std::env::consts::ARCH != "aarch64" {
            assert_eq!(
                c.boot_default("KERNEL", None, Some("riscv64"), None)
                    .as_deref(),
                Some("http://ci-gateway:9000/boot/default_kernel")
            );
        }
        // A variable still wins over the image.
        let mut vars = base.to_vec();
        vars.push(("BOOTS_DEFAULT_KERNEL", "http://elsewhere/k"));
        let c = GatewayConfig::from_env(&env(&vars)).expect("valid");
        assert_eq!(
            c.boot_default("KERNEL", None, Some("aarch64"), None)
                .as_deref(),
            Some("http://elsewhere/k")
        );
    }

    #[test]
    fn boot_default_chain_follows_seed_order() {
        let c = GatewayConfig::from_env(&env(&[
            ("FARM_NAME", "f"),
            ("BOOTS_DEFAULT_X86_64_KERNEL", "x86"),
            ("BOOTS_DEFAULT_ARM64_EFI_KERNEL", "arm-efi"),
            ("BOOTS_DEFAULT_IPXE_ARM64_EFI_KERNEL", "ipxe-arm-efi"),
            ("BOOTS_DEFAULT_KERNEL", "generic"),
            ("BOOTS_DEFAULT_IPXE_CMDLINE", "ipxe-cmdline"),
        ]))
        .expect("valid");
        let k = |bl, a, p| c.boot_default("KERNEL", bl, a, p);
        assert_eq!(
            k(Some("IPXE"), Some("ARM64"), Some("EFI")).as_deref(),
            Some("ipxe-arm-efi")
        );
        assert_eq!(
            k(None, Some("ARM64"), Some("EFI")).as_deref(),
            Some("arm-efi")
        );
        assert_eq!(
            k(Some("IPXE"), Some("ARM64"), Some("PCBIOS")).as_deref(),
            Some("generic")
        );
        assert_eq!(
            k(Some("IPXE"), Some("X86_64"), Some("EFI")).as_deref(),
            Some("x86")
        );
        assert_eq!(
            c.boot_default("CMDLINE", Some("IPXE"), Some("X86_64"), None)
                .as_deref(),
            Some("ipxe-cmdline")
        );
    }

    #[test]
    fn secrets_come_from_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tok");
        std::fs::write(&path, "s3cret\n").expect("write");
        let c = GatewayConfig::from_env(&env(&[
            ("FARM_NAME", "f"),
            ("FARMGATE_ADMIN_TOKEN_FILE", path.to_str().expect("utf8")),
        ]))
        .expect("valid");
        assert_eq!(c.admin_token.as_deref(), Some("s3cret"));
    }

    #[test]
    fn storage_defaults_and_errors() {
        let c = GatewayConfig::from_env(&env(&[
            ("FARM_NAME", "f"),
            ("EXECUTOR_URL", "http://10.42.0.1:8000"),
            ("FARMGATE_STATE_DIR", "/srv/fg"),
        ]))
        .expect("valid");
        assert_eq!(c.storage.s3_url, "http://10.42.0.1:9000");
        assert_eq!(c.storage.s3_dir, PathBuf::from("/srv/fg/s3"));
        assert_eq!(c.storage.cache_max_bytes, 20 << 30);
        assert_eq!(c.storage.registry_port, 8002);
        assert_eq!(c.storage.registry_upstreams[0].0, "docker.io");
        let c = GatewayConfig::from_env(&env(&[
            ("FARM_NAME", "f"),
            ("FARMGATE_CACHE_MAX_SIZE", "512M"),
            ("FARMGATE_REGISTRY_UPSTREAMS", "local=http://127.0.0.1:5000"),
        ]))
        .expect("valid");
        assert_eq!(c.storage.cache_max_bytes, 512 << 20);
        assert_eq!(
            c.storage.registry_upstreams,
            vec![("local".to_string(), "http://127.0.0.1:5000".to_string())]
        );
        assert_eq!(
            c.dut_networks, None,
            "default: loopback + PRIVATE_INTERFACE"
        );
        let c = GatewayConfig::from_env(&env(&[
            ("FARM_NAME", "f"),
            (
                "FARMGATE_DUT_NETWORKS",
                "10.42.0.0/24, fd00::/8,192.168.1.5",
            ),
        ]))
        .expect("valid");
        assert_eq!(
            c.dut_networks,
            Some(vec![
                ("10.42.0.0".parse().expect("ip"), 24),
                ("fd00::".parse().expect("ip"), 8),
                ("192.168.1.5".parse().expect("ip"), 32)
            ])
        );
        let c =
            GatewayConfig::from_env(&env(&[("FARM_NAME", "f"), ("FARMGATE_DUT_NETWORKS", "*")]))
                .expect("valid");
        assert_eq!(c.dut_networks, Some(vec![]), "any");
        for (k, v) in [
            ("FARMGATE_CACHE_MAX_SIZE", "lots"),
            ("FARMGATE_REGISTRY_UPSTREAMS", "docker.io"),
            ("MINIO_ROOT_USER", "admin"),
            ("FARMGATE_DUT_NETWORKS", "10.42.0.0/33"),
            ("FARMGATE_DUT_NETWORKS", "somewhere"),
        ] {
            let e = GatewayConfig::from_env(&env(&[("FARM_NAME", "f"), (k, v)]))
                .expect_err("must fail");
            assert!(e.to_string().contains(k), "{k}: {e}");
        }
    }
}
