//! The `b2c.*` options of the kernel command line, boot2container-compatible.
//!
//! CI-tron jobs boot the DUT with a command line such as
//! `console=ttyS0 b2c.minio="job,http://10.42.0.1:9000,AKEY,SKEY" b2c.container="-ti docker://…"`.
//! [`parse`] splits it the way the kernel does (words separated by white space, double
//! quotes group and are dropped, `--` ends the kernel's parameters), keeps the `b2c.*`
//! parameters and turns each into a typed field of [`B2cConfig`]. Container specs
//! (`b2c.container`/`b2c.run`, …) are `podman run` arguments: they are split like a POSIX
//! shell would and the options the agent implements are decoded into [`ContainerSpec`].
//!
//! Defaults are boot2container's: no cache device, no NTP synchronisation, no power-off
//! delay, `poweroff -f`/`reboot -f` to shut down/reboot, host name `boot2container`.
//!
//! Nothing here panics: the input comes from the DUT's command line and from a URL, so every
//! problem is a [`CmdlineError`] naming the option, the offending text and what was expected.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

/// boot2container's default shutdown command.
pub const DEFAULT_SHUTDOWN_CMD: &str = "poweroff -f";
/// boot2container's default reboot command.
pub const DEFAULT_REBOOT_CMD: &str = "reboot -f";
/// boot2container's default host name (used when `b2c.hostname` is absent).
pub const DEFAULT_HOSTNAME: &str = "boot2container";

/// What went wrong while reading the command line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdlineError {
    /// A double quote opened on the kernel command line (or extra arguments) is never closed.
    #[error("unterminated double quote in the command line, opened at byte {offset}: {context:?}")]
    UnterminatedQuote {
        /// Byte offset of the opening quote.
        offset: usize,
        /// The text from the opening quote on (at most 80 characters).
        context: String,
    },
    /// An option that needs a value was given without `=value`.
    #[error("{option} needs a value ({option}=…)")]
    MissingValue {
        /// The option, e.g. `b2c.volume`.
        option: String,
    },
    /// An option's value is ill-formed.
    #[error("{option}: invalid value {value:?}: {problem}")]
    InvalidValue {
        /// The option, e.g. `b2c.volume`.
        option: String,
        /// The whole value given to the option.
        value: String,
        /// What is wrong: the offending part and what was expected.
        problem: String,
    },
}

fn invalid(option: &str, value: &str, problem: impl Into<String>) -> CmdlineError {
    CmdlineError::InvalidValue {
        option: option.to_string(),
        value: value.to_string(),
        problem: problem.into(),
    }
}

// ---------------------------------------------------------------------------------------
// Kernel command line tokenizing
// ---------------------------------------------------------------------------------------

/// One kernel parameter: `key` or `key=value` (quotes removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// The name before the first `=`.
    pub key: String,
    /// The text after the first `=`, if there was one (possibly empty).
    pub value: Option<String>,
}

/// A kernel command line split into parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCmdline {
    /// The kernel's parameters, in order.
    pub params: Vec<Param>,
    /// The words after a standalone `--` (given to init by the kernel).
    pub init_args: Vec<String>,
}

/// Splits a command line as Linux does: words separated by white space (spaces, tabs,
/// new lines), double quotes group white space into a word and are removed from it
/// (`key="a b"` → `a b`), a standalone `--` ends the kernel's parameters. An unterminated
/// double quote is an error (the kernel would silently take the rest of the line).
pub fn split_kernel_cmdline(cmdline: &str) -> Result<KernelCmdline, CmdlineError> {
    let mut out = KernelCmdline::default();
    let mut after_dashes = false;
    let mut word = String::new();
    let mut in_word = false;
    let mut quote_start: Option<usize> = None;
    // A word is pushed when white space outside quotes (or the end) is reached.
    let push = |word: &mut String, out: &mut KernelCmdline, after: &mut bool| {
        let w = std::mem::take(word);
        if *after {
            out.init_args.push(w);
        } else if w == "--" {
            *after = true;
        } else {
            let param = match w.split_once('=') {
                Some((k, v)) => Param {
                    key: k.to_string(),
                    value: Some(v.to_string()),
                },
                None => Param {
                    key: w,
                    value: None,
                },
            };
            out.params.push(param);
        }
    };
    for (i, c) in cmdline.char_indices() {
        if c == '"' {
            in_word = true;
            quote_start = match quote_start {
                Some(_) => None,
                None => Some(i),
            };
        } else if c.is_whitespace() && quote_start.is_none() {
            if in_word {
                push(&mut word, &mut out, &mut after_dashes);
                in_word = false;
            }
        } else {
            in_word = true;
            word.push(c);
        }
    }
    if let Some(offset) = quote_start {
        let context: String = cmdline[offset..].chars().take(80).collect();
        return Err(CmdlineError::UnterminatedQuote { offset, context });
    }
    if in_word {
        push(&mut word, &mut out, &mut after_dashes);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Types of the b2c options
// ---------------------------------------------------------------------------------------

/// `b2c.cache_device`: where container images and volumes are cached (mounted at /storage).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CacheDevice {
    /// `none` (boot2container's default): no cache, everything lives in RAM.
    #[default]
    None,
    /// `auto`: the first ext4 partition labelled `B2C_CACHE`, else the first disk is
    /// partitioned and formatted.
    Auto,
    /// `reset`: like `auto`, but the cache partition is reformatted.
    Reset,
    /// A block device (`/dev/sda`, `/dev/mmcblk0p2`) or the name of a `b2c.filesystem`.
    Path(String),
}

/// `b2c.ntp_peer`: how the clock is set at boot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NtpPeer {
    /// `none` (default): the clock is not set.
    #[default]
    None,
    /// `auto`: `pool.ntp.org`.
    Auto,
    /// A host name or address.
    Host(String),
}

/// `b2c.minio="alias,url,access_key,secret_key"`: an S3 endpoint volumes mirror from/to.
#[derive(Clone, PartialEq, Eq)]
pub struct MinioAlias {
    /// Name the volumes refer to (`mirror=<alias>/<bucket>`).
    pub alias: String,
    /// Endpoint URL, e.g. `http://10.42.0.1:9000`.
    pub url: String,
    /// Access key.
    pub access_key: String,
    /// Secret key (may contain commas: everything after the third comma).
    pub secret_key: String,
}

impl fmt::Debug for MinioAlias {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MinioAlias")
            .field("alias", &self.alias)
            .field("url", &self.url)
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .finish()
    }
}

/// When a volume is pulled from or pushed to its bucket (`pull_on=`/`push_on=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Trigger {
    /// `pipeline_start`: before the first container.
    PipelineStart,
    /// `container_start`: before each container.
    ContainerStart,
    /// `container_end`: after each container.
    ContainerEnd,
    /// `pipeline_end`: after the last container.
    PipelineEnd,
    /// `changes`: continuously while the pipeline runs, plus a final sync at its end
    /// (boot2container then ignores the other triggers).
    Changes,
}

impl Trigger {
    fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "pipeline_start" => Self::PipelineStart,
            "container_start" => Self::ContainerStart,
            "container_end" => Self::ContainerEnd,
            "pipeline_end" => Self::PipelineEnd,
            "changes" => Self::Changes,
            _ => return None,
        })
    }
}

/// A location in an S3 endpoint: `<alias>/<bucket>[/<prefix>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPath {
    /// The `b2c.minio` alias.
    pub alias: String,
    /// The bucket, possibly followed by `/prefix`.
    pub path: String,
}

/// `expiration=` of a volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Expiration {
    /// `never` (default): the volume stays in the cache.
    #[default]
    Never,
    /// `pipeline_end`: the volume is deleted when the pipeline ends.
    PipelineEnd,
}

/// `b2c.volume="name,opt,opt=…"`: a podman volume, optionally mirrored with a bucket.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Volume {
    /// The volume's name (what `-v name:/path` refers to).
    pub name: String,
    /// `filesystem=`: a `b2c.filesystem` mounted as the volume's storage.
    pub filesystem: Option<String>,
    /// Where it is pulled from (`pull_from=` or `mirror=`).
    pub pull_from: Option<BucketPath>,
    /// Where it is pushed to (`push_to=` or `mirror=`).
    pub push_to: Option<BucketPath>,
    /// `pull_on=`: when it is pulled.
    pub pull_on: BTreeSet<Trigger>,
    /// `push_on=`: when it is pushed.
    pub push_on: BTreeSet<Trigger>,
    /// `overwrite`: mirroring overwrites existing files.
    pub overwrite: bool,
    /// `remove`: mirroring removes files missing from the source.
    pub remove: bool,
    /// `preserve`: mirroring preserves file attributes.
    pub preserve: bool,
    /// `exclude=`: glob patterns left out of mirroring (repeatable).
    pub exclude: Vec<String>,
    /// `encrypt_key=`: server-side encryption key for mirroring.
    pub encrypt_key: Option<String>,
    /// `fscrypt_key=`: key to encrypt the volume's directory with fscrypt.
    pub fscrypt_key: Option<String>,
    /// `fscrypt_reset_key`: reset the volume if its fscrypt key does not match.
    pub fscrypt_reset_key: bool,
    /// `expiration=`.
    pub expiration: Expiration,
    /// Parameters boot2container does not know (it warns and goes on).
    pub unknown: Vec<String>,
}

impl fmt::Debug for Volume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |k: &Option<String>| k.as_ref().map(|_| "<redacted>");
        f.debug_struct("Volume")
            .field("name", &self.name)
            .field("filesystem", &self.filesystem)
            .field("pull_from", &self.pull_from)
            .field("push_to", &self.push_to)
            .field("pull_on", &self.pull_on)
            .field("push_on", &self.push_on)
            .field("overwrite", &self.overwrite)
            .field("remove", &self.remove)
            .field("preserve", &self.preserve)
            .field("exclude", &self.exclude)
            .field("encrypt_key", &redact(&self.encrypt_key))
            .field("fscrypt_key", &redact(&self.fscrypt_key))
            .field("fscrypt_reset_key", &self.fscrypt_reset_key)
            .field("expiration", &self.expiration)
            .field("unknown", &self.unknown)
            .finish()
    }
}

/// `b2c.filesystem="name,src=…,type=…,opts=a|b"`: a file system that volumes
/// (`filesystem=name`) or `b2c.cache_device=name` mount.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filesystem {
    /// The name volumes refer to.
    pub name: String,
    /// `src=` (mandatory): what is mounted (device, `host:/export`, …).
    pub src: String,
    /// `type=`: the file system type (`mount -t`).
    pub fs_type: Option<String>,
    /// `opts=`: mount options, `|`-separated in the value.
    pub opts: Vec<String>,
    /// Parameters boot2container does not know.
    pub unknown: Vec<String>,
}

/// A static route of `b2c.iface` (`route=<destination>:<gateway>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination network, e.g. `10.0.0.0/8`.
    pub destination: String,
    /// Gateway address.
    pub via: String,
}

/// `b2c.iface="name,auto|dhcp,address=…,gateway=…,nameserver=…,route=dst:gw,forward"`:
/// a network interface's configuration (repeatable; without any, DHCP on all `eth*`/`en*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Iface {
    /// Interface name.
    pub name: String,
    /// `auto` or `dhcp`: run DHCP on it.
    pub dhcp: bool,
    /// `address=`: static address with prefix, e.g. `10.0.0.2/24`.
    pub address: Option<String>,
    /// `gateway=`: default route.
    pub gateway: Option<String>,
    /// `nameserver=` (repeatable).
    pub nameservers: Vec<String>,
    /// `route=` (repeatable).
    pub routes: Vec<Route>,
    /// `forward`: enable IPv4 forwarding.
    pub forward: bool,
    /// Parameters boot2container does not know.
    pub unknown: Vec<String>,
}

/// How the image of a container is referenced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageTransport {
    /// No transport prefix: a registry reference (`alpine`, `registry:5000/a/b:tag`).
    Plain,
    /// `docker://`: a registry reference.
    Docker,
    /// Another containers-image transport (`oci-archive`, `containers-storage`, …): the
    /// prefix without its `:`.
    Other(String),
}

/// The image of a container: transport and reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The transport prefix.
    pub transport: ImageTransport,
    /// The reference without the prefix, e.g. `10.42.0.1:8002/docker.io/library/alpine:latest`.
    pub reference: String,
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.transport {
            ImageTransport::Plain => write!(f, "{}", self.reference),
            ImageTransport::Docker => write!(f, "docker://{}", self.reference),
            ImageTransport::Other(t) => write!(f, "{t}:{}", self.reference),
        }
    }
}

const OTHER_TRANSPORTS: &[&str] = &[
    "containers-storage",
    "dir",
    "docker-archive",
    "docker-daemon",
    "oci",
    "oci-archive",
    "sif",
];

/// The source of a `-v`/`--volume` mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountSource {
    /// A named volume (`job-volume:/job`), usually one of the `b2c.volume`s.
    Named(String),
    /// A host path (`/dev/dri:/dev/dri`, `./x:/x`).
    HostPath(String),
    /// No source (`-v /data`): an anonymous volume.
    Anonymous,
}

/// A `-v`/`--volume` of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    /// What is mounted.
    pub source: MountSource,
    /// Where, inside the container (absolute).
    pub target: String,
    /// Mount options (`ro`, `rw`, `z`, …), in order.
    pub options: Vec<String>,
    /// `ro` is among the options.
    pub read_only: bool,
}

/// A `-e`/`--env` of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvVar {
    /// `K=V`.
    Set {
        /// Name.
        key: String,
        /// Value (may be empty).
        value: String,
    },
    /// `K`: the agent's own value of `K` is passed, if it has one.
    Inherit(String),
}

/// One container of the pipeline: the `podman run` arguments of `b2c.container`/`b2c.run`,
/// `b2c.post_container`, `b2c.service`/`b2c.run_service`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    /// The option's value, as given.
    pub raw: String,
    /// The image (first word that is not an option).
    pub image: ImageRef,
    /// Command and arguments after the image (empty: the image's default).
    pub args: Vec<String>,
    /// `-v`/`--volume`, in order.
    pub volumes: Vec<VolumeMount>,
    /// `-e`/`--env`, in order.
    pub env: Vec<EnvVar>,
    /// `-w`/`--workdir`.
    pub workdir: Option<String>,
    /// `--entrypoint` (a command, or a JSON array as podman accepts).
    pub entrypoint: Option<String>,
    /// `-u`/`--user`.
    pub user: Option<String>,
    /// `-t`/`--tty`.
    pub tty: bool,
    /// `-i`/`--interactive`.
    pub interactive: bool,
    /// `--privileged`.
    pub privileged: bool,
    /// `--rm`.
    pub rm: bool,
    /// `--tls-verify[=true|false]` (None: not given; podman verifies by default).
    pub tls_verify: Option<bool>,
    /// `--network`/`--net`.
    pub network: Option<String>,
    /// `--pull` (`always`, `missing`, `never`, `newer`).
    pub pull: Option<String>,
    /// `--name`.
    pub name: Option<String>,
    /// `-h`/`--hostname`.
    pub hostname: Option<String>,
    /// `--ipc`.
    pub ipc: Option<String>,
    /// `--pid`.
    pub pid: Option<String>,
    /// `--device` (repeatable).
    pub devices: Vec<String>,
    /// `--cap-add` (repeatable).
    pub cap_add: Vec<String>,
    /// `--cap-drop` (repeatable).
    pub cap_drop: Vec<String>,
    /// `--security-opt` (repeatable).
    pub security_opt: Vec<String>,
    /// `--dns` (repeatable; `none` disables DNS configuration).
    pub dns: Vec<String>,
    /// `--mount` (repeatable, podman's `type=…,src=…,dst=…` syntax, kept as given).
    pub mounts: Vec<String>,
    /// Options the agent does not implement, normalised to `--opt` or `--opt=value`
    /// (the agent warns and goes on).
    pub unsupported: Vec<String>,
}

/// Everything the `b2c.*` options say. [`Default`] is boot2container's default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct B2cConfig {
    /// `b2c.container` and its newer name `b2c.run` (repeatable, run in order).
    pub containers: Vec<ContainerSpec>,
    /// `b2c.post_container` (also accepted as `b2c.run_post`): run after the pipeline,
    /// whatever its status.
    pub post_containers: Vec<ContainerSpec>,
    /// `b2c.service` and its newer name `b2c.run_service`: run in the background for the
    /// pipeline's duration.
    pub services: Vec<ContainerSpec>,
    /// `b2c.pipefail`: stop the pipeline at the first failing container.
    pub pipefail: bool,
    /// `b2c.cache_device` (default: none).
    pub cache_device: CacheDevice,
    /// `b2c.swap`: size of a swap file in the cache (`fallocate -l` syntax, e.g. `4G`).
    pub swap: Option<String>,
    /// `b2c.ntp_peer` (default: none).
    pub ntp_peer: NtpPeer,
    /// `b2c.minio` (repeatable).
    pub minio: Vec<MinioAlias>,
    /// `b2c.volume` (repeatable).
    pub volumes: Vec<Volume>,
    /// `b2c.filesystem` (repeatable).
    pub filesystems: Vec<Filesystem>,
    /// `b2c.iface` (repeatable).
    pub ifaces: Vec<Iface>,
    /// `b2c.poweroff_delay`: seconds between the end of the pipeline and power-off (default 0).
    pub poweroff_delay: Duration,
    /// `b2c.shutdown_cmd` (default `poweroff -f`).
    pub shutdown_cmd: String,
    /// `b2c.reboot_cmd` (default `reboot -f`).
    pub reboot_cmd: String,
    /// `b2c.extra_args_url`: more options, in this syntax, to fetch and [merge](Self::merge_extra).
    pub extra_args_url: Option<String>,
    /// `b2c.hostname` (None: [`DEFAULT_HOSTNAME`]).
    pub hostname: Option<String>,
    /// `b2c.keymap`: console keymap name.
    pub keymap: Option<String>,
    /// `b2c.insmods`: kernel modules to load, comma-separated in the value.
    pub insmods: Vec<String>,
    /// An `ip=` kernel parameter is present: the kernel configured the network.
    pub kernel_ip: bool,
    /// `b2c.*` parameters this parser does not know, as given (the agent warns).
    pub unknown: Vec<String>,
    /// Words after `--` (for init).
    pub init_args: Vec<String>,
}

impl Default for B2cConfig {
    fn default() -> Self {
        Self {
            containers: Vec::new(),
            post_containers: Vec::new(),
            services: Vec::new(),
            pipefail: false,
            cache_device: CacheDevice::None,
            swap: None,
            ntp_peer: NtpPeer::None,
            minio: Vec::new(),
            volumes: Vec::new(),
            filesystems: Vec::new(),
            ifaces: Vec::new(),
            poweroff_delay: Duration::ZERO,
            shutdown_cmd: DEFAULT_SHUTDOWN_CMD.to_string(),
            reboot_cmd: DEFAULT_REBOOT_CMD.to_string(),
            extra_args_url: None,
            hostname: None,
            keymap: None,
            insmods: Vec::new(),
            kernel_ip: false,
            unknown: Vec::new(),
            init_args: Vec::new(),
        }
    }
}

/// Parses a kernel command line (e.g. `/proc/cmdline`) into the `b2c.*` configuration.
/// Parameters that are not `b2c.*` are ignored (except `ip=`, see [`B2cConfig::kernel_ip`]).
pub fn parse(cmdline: &str) -> Result<B2cConfig, CmdlineError> {
    let mut config = B2cConfig::default();
    config.merge_extra(cmdline)?;
    Ok(config)
}

impl B2cConfig {
    /// Applies more options in the command line syntax (what `b2c.extra_args_url` serves;
    /// it may span lines): as boot2container does, repeatable options (containers, services,
    /// volumes, minio aliases, file systems, interfaces) are appended, the others replace
    /// the current value. A `b2c.extra_args_url` in `text` is recorded but not fetched again
    /// by boot2container. On error, `self` is left unchanged.
    pub fn merge_extra(&mut self, text: &str) -> Result<(), CmdlineError> {
        let split = split_kernel_cmdline(text)?;
        let mut next = self.clone();
        for param in &split.params {
            next.apply(param)?;
        }
        next.init_args.extend(split.init_args);
        *self = next;
        Ok(())
    }

    /// The host name to set: `b2c.hostname` or [`DEFAULT_HOSTNAME`].
    pub fn hostname_or_default(&self) -> &str {
        self.hostname.as_deref().unwrap_or(DEFAULT_HOSTNAME)
    }

    /// The `b2c.minio` alias named `alias` (the last one given wins, as with `mcli alias set`).
    pub fn minio_alias(&self, alias: &str) -> Option<&MinioAlias> {
        self.minio.iter().rev().find(|m| m.alias == alias)
    }

    fn apply(&mut self, param: &Param) -> Result<(), CmdlineError> {
        let key = param.key.as_str();
        if key == "ip" {
            self.kernel_ip = true;
            return Ok(());
        }
        if !key.starts_with("b2c.") {
            return Ok(());
        }
        let value = param.value.as_deref();
        let need = || {
            value.ok_or_else(|| CmdlineError::MissingValue {
                option: key.to_string(),
            })
        };
        match key {
            "b2c.container" | "b2c.run" => self.containers.push(parse_container(key, need()?)?),
            "b2c.post_container" | "b2c.run_post" => {
                self.post_containers.push(parse_container(key, need()?)?)
            }
            "b2c.service" | "b2c.run_service" => self.services.push(parse_container(key, need()?)?),
            "b2c.pipefail" => {
                self.pipefail = match value {
                    None => true,
                    Some(v) => parse_bool(v).ok_or_else(|| {
                        invalid(
                            key,
                            v,
                            "expected no value, or one of 1/0, true/false, yes/no",
                        )
                    })?,
                }
            }
            "b2c.cache_device" => {
                let v = non_empty(
                    key,
                    need()?,
                    "none, auto, reset, a /dev path or a b2c.filesystem name",
                )?;
                self.cache_device = match v {
                    "none" => CacheDevice::None,
                    "auto" => CacheDevice::Auto,
                    "reset" => CacheDevice::Reset,
                    other => CacheDevice::Path(other.to_string()),
                };
            }
            "b2c.swap" => {
                let v = need()?;
                if !v.starts_with(|c: char| c.is_ascii_digit())
                    || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')
                {
                    return Err(invalid(key, v, "expected a size such as 512M or 4G"));
                }
                self.swap = Some(v.to_string());
            }
            "b2c.ntp_peer" => {
                let v = non_empty(
                    key,
                    need()?,
                    "none, auto or an NTP server's host name/address",
                )?;
                if v.contains(char::is_whitespace) {
                    return Err(invalid(key, v, "a host name has no white space"));
                }
                self.ntp_peer = match v {
                    "none" => NtpPeer::None,
                    "auto" => NtpPeer::Auto,
                    other => NtpPeer::Host(other.to_string()),
                };
            }
            "b2c.minio" => self.minio.push(parse_minio(key, need()?)?),
            "b2c.volume" => self.volumes.push(parse_volume(key, need()?)?),
            "b2c.filesystem" => self.filesystems.push(parse_filesystem(key, need()?)?),
            "b2c.iface" => self.ifaces.push(parse_iface(key, need()?)?),
            "b2c.poweroff_delay" => self.poweroff_delay = parse_seconds(key, need()?)?,
            "b2c.shutdown_cmd" => {
                self.shutdown_cmd = non_empty(key, need()?, "a command")?.to_string()
            }
            "b2c.reboot_cmd" => self.reboot_cmd = non_empty(key, need()?, "a command")?.to_string(),
            "b2c.extra_args_url" => {
                let v = need()?;
                match v.split_once("://") {
                    Some((scheme, rest))
                        if !scheme.is_empty()
                            && scheme
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
                            && !rest.is_empty()
                            && !v.contains(char::is_whitespace) => {}
                    _ => return Err(invalid(key, v, "expected a URL such as http://host/path")),
                }
                self.extra_args_url = Some(v.to_string());
            }
            "b2c.hostname" => {
                let v = non_empty(key, need()?, "a host name")?;
                if v.len() > 64
                    || !v
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
                {
                    return Err(invalid(
                        key,
                        v,
                        "expected a host name: at most 64 of a-z, A-Z, 0-9, '-' and '.'",
                    ));
                }
                self.hostname = Some(v.to_string());
            }
            "b2c.keymap" => {
                let v = non_empty(key, need()?, "a keymap name such as fr or de")?;
                if v.contains(['/', ' ']) {
                    return Err(invalid(key, v, "a keymap name has no '/' or space"));
                }
                self.keymap = Some(v.to_string());
            }
            "b2c.insmods" => {
                let v = need()?;
                let mut mods = Vec::new();
                for m in v.split(',').filter(|m| !m.is_empty()) {
                    if m.contains(char::is_whitespace) {
                        return Err(invalid(
                            key,
                            v,
                            format!("module {m:?} contains white space"),
                        ));
                    }
                    mods.push(m.to_string());
                }
                self.insmods = mods;
            }
            _ => self.unknown.push(match value {
                Some(v) => format!("{key}={v}"),
                None => key.to_string(),
            }),
        }
        Ok(())
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn non_empty<'a>(option: &str, v: &'a str, expected: &str) -> Result<&'a str, CmdlineError> {
    if v.is_empty() {
        Err(invalid(option, v, format!("empty; expected {expected}")))
    } else {
        Ok(v)
    }
}

fn parse_seconds(option: &str, v: &str) -> Result<Duration, CmdlineError> {
    let bad = || invalid(option, v, "expected a number of seconds such as 5 or 0.5");
    if v.is_empty() || !v.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(bad());
    }
    let secs: f64 = v.parse().map_err(|_| bad())?;
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

fn parse_minio(option: &str, v: &str) -> Result<MinioAlias, CmdlineError> {
    let fields: Vec<&str> = v.splitn(4, ',').collect();
    let [alias, url, access_key, secret_key] = fields[..] else {
        return Err(invalid(
            option,
            v,
            format!(
                "{} comma-separated field(s); expected alias,url,access_key,secret_key",
                fields.len()
            ),
        ));
    };
    if alias.is_empty() || alias.contains(['/', ' ']) {
        return Err(invalid(
            option,
            v,
            format!("alias {alias:?}: expected a non-empty name without '/'"),
        ));
    }
    let host = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or_default();
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(invalid(
            option,
            v,
            format!("url {url:?}: expected http://host[:port] or https://…"),
        ));
    }
    Ok(MinioAlias {
        alias: alias.to_string(),
        url: url.to_string(),
        access_key: access_key.to_string(),
        secret_key: secret_key.to_string(),
    })
}

fn parse_bucket_path(
    option: &str,
    v: &str,
    what: &str,
    s: &str,
) -> Result<BucketPath, CmdlineError> {
    match s.split_once('/') {
        Some((alias, path)) if !alias.is_empty() && !path.is_empty() => Ok(BucketPath {
            alias: alias.to_string(),
            path: path.to_string(),
        }),
        _ => Err(invalid(
            option,
            v,
            format!("{what}={s:?}: expected <minio alias>/<bucket>"),
        )),
    }
}

fn parse_triggers(
    option: &str,
    v: &str,
    what: &str,
    s: &str,
) -> Result<BTreeSet<Trigger>, CmdlineError> {
    let mut set = BTreeSet::new();
    for t in s.split('|') {
        let trigger = Trigger::from_name(t).ok_or_else(|| {
            invalid(
                option,
                v,
                format!(
                    "{what}: unknown trigger {t:?}; expected |-separated pipeline_start, \
                     container_start, container_end, pipeline_end, changes"
                ),
            )
        })?;
        set.insert(trigger);
    }
    Ok(set)
}

/// Splits `name,spec,spec` (b2c's volume/filesystem/iface syntax): the name and the specs.
fn name_and_specs<'a>(option: &str, v: &'a str) -> Result<(&'a str, Vec<&'a str>), CmdlineError> {
    let mut parts = v.split(',');
    let name = parts.next().unwrap_or_default();
    if name.is_empty() || name.contains(char::is_whitespace) || name.contains(['=', '/']) {
        return Err(invalid(
            option,
            v,
            format!("name {name:?}: expected a non-empty name first (no '=', '/' or space)"),
        ));
    }
    Ok((name, parts.filter(|p| !p.is_empty()).collect()))
}

fn parse_volume(option: &str, v: &str) -> Result<Volume, CmdlineError> {
    let (name, specs) = name_and_specs(option, v)?;
    let mut vol = Volume {
        name: name.to_string(),
        ..Volume::default()
    };
    let need_value = |k: &str, val: &str| {
        if val.is_empty() {
            Err(invalid(option, v, format!("{k}= needs a value")))
        } else {
            Ok(())
        }
    };
    for spec in specs {
        let (k, val) = match spec.split_once('=') {
            Some((k, val)) => (k, Some(val)),
            None => (spec, None),
        };
        match (k, val) {
            ("mirror", Some(s)) => {
                let p = parse_bucket_path(option, v, k, s)?;
                vol.pull_from = Some(p.clone());
                vol.push_to = Some(p);
            }
            ("pull_from", Some(s)) => vol.pull_from = Some(parse_bucket_path(option, v, k, s)?),
            ("push_to", Some(s)) => vol.push_to = Some(parse_bucket_path(option, v, k, s)?),
            ("pull_on", Some(s)) => vol.pull_on = parse_triggers(option, v, k, s)?,
            ("push_on", Some(s)) => vol.push_on = parse_triggers(option, v, k, s)?,
            ("overwrite", None) => vol.overwrite = true,
            ("remove", None) => vol.remove = true,
            ("preserve", None) => vol.preserve = true,
            ("fscrypt_reset_key", None) => vol.fscrypt_reset_key = true,
            ("exclude", Some(s)) => {
                need_value(k, s)?;
                vol.exclude.push(s.to_string());
            }
            ("encrypt_key", Some(s)) => {
                need_value(k, s)?;
                vol.encrypt_key = Some(s.to_string());
            }
            ("fscrypt_key", Some(s)) => {
                need_value(k, s)?;
                vol.fscrypt_key = Some(s.to_string());
            }
            ("filesystem", Some(s)) => {
                need_value(k, s)?;
                vol.filesystem = Some(s.to_string());
            }
            ("expiration", Some(s)) => {
                vol.expiration = match s {
                    "never" => Expiration::Never,
                    "pipeline_end" => Expiration::PipelineEnd,
                    _ => {
                        return Err(invalid(
                            option,
                            v,
                            format!("expiration={s:?}: expected never or pipeline_end"),
                        ));
                    }
                }
            }
            (
                "mirror" | "pull_from" | "push_to" | "pull_on" | "push_on" | "exclude"
                | "encrypt_key" | "fscrypt_key" | "filesystem" | "expiration",
                None,
            ) => return Err(invalid(option, v, format!("{k} needs a value ({k}=…)"))),
            ("overwrite" | "remove" | "preserve" | "fscrypt_reset_key", Some(_)) => {
                return Err(invalid(option, v, format!("{spec:?}: {k} takes no value")));
            }
            _ => vol.unknown.push(spec.to_string()),
        }
    }
    Ok(vol)
}

fn parse_filesystem(option: &str, v: &str) -> Result<Filesystem, CmdlineError> {
    let (name, specs) = name_and_specs(option, v)?;
    let mut fs = Filesystem {
        name: name.to_string(),
        ..Filesystem::default()
    };
    for spec in specs {
        match spec.split_once('=') {
            Some(("src", s)) => fs.src = s.to_string(),
            Some(("type", s)) if !s.is_empty() => fs.fs_type = Some(s.to_string()),
            Some(("opts", s)) => {
                fs.opts = s
                    .split('|')
                    .filter(|o| !o.is_empty())
                    .map(String::from)
                    .collect()
            }
            Some(("type", _)) => return Err(invalid(option, v, "type= needs a value")),
            _ => fs.unknown.push(spec.to_string()),
        }
    }
    if fs.src.is_empty() {
        return Err(invalid(
            option,
            v,
            "missing the mandatory src=<what to mount>",
        ));
    }
    Ok(fs)
}

fn parse_iface(option: &str, v: &str) -> Result<Iface, CmdlineError> {
    let mut parts = v.split(',');
    let name = parts.next().unwrap_or_default();
    if name.is_empty()
        || name.len() > 15
        || name.contains(|c: char| c.is_whitespace() || c == '/' || c == '=')
    {
        return Err(invalid(
            option,
            v,
            format!("interface name {name:?}: expected 1 to 15 characters, no '/', '=' or space"),
        ));
    }
    let mut iface = Iface {
        name: name.to_string(),
        ..Iface::default()
    };
    for spec in parts.filter(|p| !p.is_empty()) {
        match spec.split_once('=') {
            None if spec == "auto" || spec == "dhcp" => iface.dhcp = true,
            None if spec == "forward" => iface.forward = true,
            Some((k @ ("address" | "gateway" | "nameserver" | "route"), "")) => {
                return Err(invalid(option, v, format!("{k}= needs a value")));
            }
            Some(("address", s)) => iface.address = Some(s.to_string()),
            Some(("gateway", s)) => iface.gateway = Some(s.to_string()),
            Some(("nameserver", s)) => iface.nameservers.push(s.to_string()),
            Some(("route", s)) => match s.split_once(':') {
                Some((d, g)) if !d.is_empty() && !g.is_empty() => iface.routes.push(Route {
                    destination: d.to_string(),
                    via: g.to_string(),
                }),
                _ => {
                    return Err(invalid(
                        option,
                        v,
                        format!("route={s:?}: expected <destination>:<gateway>"),
                    ));
                }
            },
            _ => iface.unknown.push(spec.to_string()),
        }
    }
    Ok(iface)
}

// ---------------------------------------------------------------------------------------
// Container specs (podman run arguments)
// ---------------------------------------------------------------------------------------

/// Splits `text` into words like a POSIX shell, without expansions: white space separates
/// words, `'…'` is literal, `"…"` groups and honours `\"`, `\\`, `\$`, `` \` `` and
/// backslash-newline, an unquoted backslash escapes the next character (backslash-newline
/// joins lines). Errors (`Err(problem)`) on unterminated quotes and a trailing backslash.
pub fn shell_split(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some((_, '\'')) => break,
                        Some((_, ch)) => word.push(ch),
                        None => {
                            return Err(format!("unterminated single quote opened at byte {i}"));
                        }
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some((_, '"')) => break,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, '\n')) => {}
                            Some((_, ch @ ('"' | '\\' | '$' | '`'))) => word.push(ch),
                            Some((_, ch)) => {
                                word.push('\\');
                                word.push(ch);
                            }
                            None => {
                                return Err(format!(
                                    "unterminated double quote opened at byte {i}"
                                ));
                            }
                        },
                        Some((_, ch)) => word.push(ch),
                        None => {
                            return Err(format!("unterminated double quote opened at byte {i}"));
                        }
                    }
                }
            }
            '\\' => match chars.next() {
                Some((_, '\n')) => {}
                Some((_, ch)) => {
                    in_word = true;
                    word.push(ch);
                }
                None => return Err("trailing backslash escapes nothing".to_string()),
            },
            c if c == ' ' || c == '\t' || c == '\n' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// Long options of `podman run` that take a value but that the agent does not implement:
/// recorded in `unsupported` with their value.
const UNSUPPORTED_WITH_VALUE: &[&str] = &[
    "add-host",
    "annotation",
    "arch",
    "attach",
    "authfile",
    "blkio-weight",
    "blkio-weight-device",
    "cert-dir",
    "cgroup-conf",
    "cgroup-parent",
    "cgroupns",
    "cgroups",
    "chrootdirs",
    "cidfile",
    "conmon-pidfile",
    "cpu-period",
    "cpu-quota",
    "cpu-rt-period",
    "cpu-rt-runtime",
    "cpu-shares",
    "cpus",
    "cpuset-cpus",
    "cpuset-mems",
    "creds",
    "decryption-key",
    "detach-keys",
    "device-cgroup-rule",
    "device-read-bps",
    "device-read-iops",
    "device-write-bps",
    "device-write-iops",
    "dns-option",
    "dns-search",
    "env-file",
    "env-merge",
    "expose",
    "gidmap",
    "gpus",
    "group-add",
    "group-entry",
    "health-cmd",
    "health-interval",
    "health-on-failure",
    "health-retries",
    "health-start-period",
    "health-startup-cmd",
    "health-startup-interval",
    "health-startup-retries",
    "health-startup-success",
    "health-startup-timeout",
    "health-timeout",
    "hostuser",
    "image-volume",
    "init-path",
    "ip",
    "ip6",
    "label",
    "label-file",
    "log-driver",
    "log-opt",
    "mac-address",
    "memory",
    "memory-reservation",
    "memory-swap",
    "memory-swappiness",
    "os",
    "passwd-entry",
    "personality",
    "pidfile",
    "platform",
    "pod",
    "pod-id-file",
    "preserve-fds",
    "publish",
    "rdt-class",
    "requires",
    "restart",
    "retry",
    "retry-delay",
    "sdnotify",
    "seccomp-policy",
    "secret",
    "shm-size",
    "shm-size-systemd",
    "stop-signal",
    "stop-timeout",
    "subgidname",
    "subuidname",
    "sysctl",
    "systemd",
    "timeout",
    "tmpfs",
    "tz",
    "uidmap",
    "ulimit",
    "umask",
    "unsetenv",
    "userns",
    "uts",
    "variant",
    "volumes-from",
    "oom-score-adj",
    "pids-limit",
    "kernel-memory",
    "cpu-rt-runtime",
];

/// Short options of `podman run` that take a value, and their long names.
fn short_with_value(c: char) -> Option<&'static str> {
    Some(match c {
        'v' => "volume",
        'e' => "env",
        'w' => "workdir",
        'u' => "user",
        'h' => "hostname",
        'p' => "publish",
        'l' => "label",
        'm' => "memory",
        'c' => "cpu-shares",
        'a' => "attach",
        _ => return None,
    })
}

/// Short boolean options of `podman run`, and their long names.
fn short_bool(c: char) -> Option<&'static str> {
    Some(match c {
        't' => "tty",
        'i' => "interactive",
        'd' => "detach",
        'q' => "quiet",
        'P' => "publish-all",
        _ => return None,
    })
}

/// Long options the agent implements that take a value.
const IMPLEMENTED_WITH_VALUE: &[&str] = &[
    "volume",
    "env",
    "workdir",
    "entrypoint",
    "user",
    "network",
    "net",
    "pull",
    "name",
    "hostname",
    "ipc",
    "pid",
    "device",
    "cap-add",
    "cap-drop",
    "security-opt",
    "dns",
    "mount",
];

fn takes_value(long: &str) -> bool {
    IMPLEMENTED_WITH_VALUE.contains(&long) || UNSUPPORTED_WITH_VALUE.contains(&long)
}

struct SpecBuilder<'a> {
    option: &'a str,
    raw: &'a str,
    spec: ContainerSpec,
}

impl SpecBuilder<'_> {
    fn err(&self, problem: String) -> CmdlineError {
        invalid(self.option, self.raw, problem)
    }

    fn set_bool(&mut self, long: &str, value: Option<&str>) -> Result<(), CmdlineError> {
        let b = match value {
            None => true,
            Some(v) => parse_bool(v)
                .ok_or_else(|| self.err(format!("--{long}={v}: expected true or false")))?,
        };
        match long {
            "tty" => self.spec.tty = b,
            "interactive" => self.spec.interactive = b,
            "privileged" => self.spec.privileged = b,
            "rm" => self.spec.rm = b,
            "tls-verify" => self.spec.tls_verify = Some(b),
            _ => self.spec.unsupported.push(match value {
                Some(v) => format!("--{long}={v}"),
                None => format!("--{long}"),
            }),
        }
        Ok(())
    }

    fn set_value(&mut self, long: &str, v: &str) -> Result<(), CmdlineError> {
        let nonempty = |s: &Self| {
            if v.is_empty() {
                Err(s.err(format!("--{long} needs a non-empty value")))
            } else {
                Ok(v.to_string())
            }
        };
        match long {
            "volume" => {
                let mount = self.parse_mount(v)?;
                self.spec.volumes.push(mount);
            }
            "env" => {
                let env = match v.split_once('=') {
                    Some(("", _)) => {
                        return Err(self.err(format!("--env {v:?}: expected KEY=VALUE or KEY")));
                    }
                    Some((k, val)) => EnvVar::Set {
                        key: k.to_string(),
                        value: val.to_string(),
                    },
                    None if v.is_empty() => {
                        return Err(self.err("--env needs KEY=VALUE or KEY".to_string()));
                    }
                    None => EnvVar::Inherit(v.to_string()),
                };
                self.spec.env.push(env);
            }
            "workdir" => {
                let w = nonempty(self)?;
                if !w.starts_with('/') {
                    return Err(self.err(format!("--workdir {w:?}: expected an absolute path")));
                }
                self.spec.workdir = Some(w);
            }
            "entrypoint" => self.spec.entrypoint = Some(v.to_string()),
            "user" => self.spec.user = Some(nonempty(self)?),
            "network" | "net" => self.spec.network = Some(nonempty(self)?),
            "pull" => match v {
                "always" | "missing" | "never" | "newer" => self.spec.pull = Some(v.to_string()),
                _ => {
                    return Err(self.err(format!(
                        "--pull={v}: expected always, missing, never or newer"
                    )));
                }
            },
            "name" => self.spec.name = Some(nonempty(self)?),
            "hostname" => self.spec.hostname = Some(nonempty(self)?),
            "ipc" => self.spec.ipc = Some(nonempty(self)?),
            "pid" => self.spec.pid = Some(nonempty(self)?),
            "device" => {
                let d = nonempty(self)?;
                self.spec.devices.push(d);
            }
            "cap-add" => {
                let c = nonempty(self)?;
                self.spec.cap_add.push(c);
            }
            "cap-drop" => {
                let c = nonempty(self)?;
                self.spec.cap_drop.push(c);
            }
            "security-opt" => {
                let s = nonempty(self)?;
                self.spec.security_opt.push(s);
            }
            "dns" => {
                let d = nonempty(self)?;
                self.spec.dns.push(d);
            }
            "mount" => {
                let m = nonempty(self)?;
                self.spec.mounts.push(m);
            }
            _ => self.spec.unsupported.push(format!("--{long}={v}")),
        }
        Ok(())
    }

    fn parse_mount(&self, v: &str) -> Result<VolumeMount, CmdlineError> {
        let bad = |why: &str| {
            self.err(format!(
                "--volume {v:?}: {why}; expected [SOURCE:]/TARGET[:OPTIONS]"
            ))
        };
        let parts: Vec<&str> = v.split(':').collect();
        let (source, target, opts) = match parts[..] {
            [target] => (MountSource::Anonymous, target, ""),
            [src, target] => (mount_source(src), target, ""),
            [src, target, opts] => (mount_source(src), target, opts),
            _ => return Err(bad("too many ':'")),
        };
        match &source {
            MountSource::Named(n) | MountSource::HostPath(n) if n.is_empty() => {
                return Err(bad("empty source"));
            }
            _ => {}
        }
        if !target.starts_with('/') {
            return Err(bad("the target is not an absolute path"));
        }
        let options: Vec<String> = opts
            .split(',')
            .filter(|o| !o.is_empty())
            .map(String::from)
            .collect();
        let read_only = options.iter().any(|o| o == "ro");
        Ok(VolumeMount {
            source,
            target: target.to_string(),
            options,
            read_only,
        })
    }
}

fn mount_source(src: &str) -> MountSource {
    if src.starts_with('/') || src.starts_with('.') {
        MountSource::HostPath(src.to_string())
    } else {
        MountSource::Named(src.to_string())
    }
}

fn parse_image(word: &str) -> Option<ImageRef> {
    let (transport, reference) = if let Some(r) = word.strip_prefix("docker://") {
        (ImageTransport::Docker, r)
    } else if let Some((t, r)) = word
        .split_once(':')
        .filter(|(t, _)| OTHER_TRANSPORTS.contains(t))
    {
        (ImageTransport::Other(t.to_string()), r)
    } else {
        (ImageTransport::Plain, word)
    };
    if reference.is_empty() || reference.contains(char::is_whitespace) {
        return None;
    }
    Some(ImageRef {
        transport,
        reference: reference.to_string(),
    })
}

/// Parses `podman run` arguments (the value of `b2c.container` and friends; `option` names
/// the option in errors).
pub fn parse_container(option: &str, value: &str) -> Result<ContainerSpec, CmdlineError> {
    let words = shell_split(value).map_err(|p| invalid(option, value, p))?;
    let mut b = SpecBuilder {
        option,
        raw: value,
        spec: ContainerSpec {
            raw: value.to_string(),
            image: ImageRef {
                transport: ImageTransport::Plain,
                reference: String::new(),
            },
            args: Vec::new(),
            volumes: Vec::new(),
            env: Vec::new(),
            workdir: None,
            entrypoint: None,
            user: None,
            tty: false,
            interactive: false,
            privileged: false,
            rm: false,
            tls_verify: None,
            network: None,
            pull: None,
            name: None,
            hostname: None,
            ipc: None,
            pid: None,
            devices: Vec::new(),
            cap_add: Vec::new(),
            cap_drop: Vec::new(),
            security_opt: Vec::new(),
            dns: Vec::new(),
            mounts: Vec::new(),
            unsupported: Vec::new(),
        },
    };
    let mut i = 0;
    let mut image_at = None;
    while i < words.len() {
        let w = words[i].as_str();
        i += 1;
        if w == "--" {
            image_at = (i < words.len()).then_some(i);
            break;
        } else if let Some(long) = w.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (long, None),
            };
            if name.is_empty() {
                return Err(b.err(format!("{w:?}: option without a name")));
            }
            if takes_value(name) {
                let v = match inline {
                    Some(v) => v,
                    None => {
                        let v = words
                            .get(i)
                            .ok_or_else(|| b.err(format!("--{name} needs a value")))?;
                        i += 1;
                        v.as_str()
                    }
                };
                b.set_value(name, v)?;
            } else {
                b.set_bool(name, inline)?;
            }
        } else if let Some(shorts) = w.strip_prefix('-').filter(|s| !s.is_empty()) {
            let mut rest = shorts;
            while let Some(c) = rest.chars().next() {
                rest = &rest[c.len_utf8()..];
                if let Some(long) = short_with_value(c) {
                    let v = if !rest.is_empty() {
                        let v = rest.strip_prefix('=').unwrap_or(rest);
                        rest = "";
                        v
                    } else {
                        let v = words
                            .get(i)
                            .ok_or_else(|| b.err(format!("-{c} needs a value")))?;
                        i += 1;
                        v.as_str()
                    };
                    b.set_value(long, v)?;
                } else if let Some(long) = short_bool(c) {
                    b.set_bool(long, None)?;
                } else {
                    b.spec.unsupported.push(format!("-{c}"));
                }
            }
        } else {
            image_at = Some(i - 1);
            break;
        }
    }
    let Some(at) = image_at else {
        return Err(b.err("no image: expected podman run options, then an image such as docker://registry/name:tag".to_string()));
    };
    let image = parse_image(&words[at]).ok_or_else(|| {
        b.err(format!(
            "image {:?}: expected a reference such as docker://registry/name:tag",
            words[at]
        ))
    })?;
    b.spec.image = image;
    b.spec.args = words[at + 1..].to_vec();
    Ok(b.spec)
}
