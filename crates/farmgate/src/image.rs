//! `farmgate image build`: the DUT image the gateway boots by default, built from host
//! packages and published where the gateway's default boot configuration finds it.
//!
//! The image is the kernel of the host (`linux-image-*`), and an initramfs holding
//! `farm-agent` as `/init`, crun with its libraries, busybox (a shell for commands such as
//! `b2c.shutdown_cmd`), the tools of the cache partition when the host has them, and the
//! kernel modules of common network and disk controllers with their dependencies. It is
//! written to `BOOTS_TFTP_ROOT` as `default_<arch>_kernel`, `default_<arch>_initrd` and
//! `default_<arch>_cmdline`, which the gateway serves at `<EXECUTOR_URL>/boot/` and uses
//! for unknown machines whenever no `BOOTS_DEFAULT_*` variable says otherwise.
//!
//! `--arch aarch64 --sysroot DIR` builds the image of an arm64 DUT on another host: the
//! kernel, modules, crun, busybox and cache tools then come from DIR (made by
//! `scripts/arm64-sysroot.sh DIR`), the agent is the cross-built one (see
//! [`cross_agent_build_command`]), and the files are `default_aarch64_*`.

use std::path::{Path, PathBuf};

use farmgate_executor::config::built_image_files;

/// Modules of the image besides the initramfs builder's defaults: common wired NICs,
/// disk controllers and the cache partition's file system.
pub const IMAGE_MODULES: &[&str] = &[
    "e1000e",
    "igb",
    "r8169",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "ahci",
    "nvme",
    "ext4",
    // ext4's soft dependency (`modinfo ext4`: `softdep: pre: crypto-crc32c`): without
    // it the kernel cannot mount ext4 and there is no modprobe in the image to ask.
    "crc32c_generic",
];

/// Programs of the cache partition (`b2c.cache_device`, `b2c.swap`), included when the
/// host has them.
pub const CACHE_TOOLS: &[&str] = &["mkfs.ext4", "sfdisk", "partx", "mkswap", "swapon"];

/// What `farmgate image build` was asked.
#[derive(Debug, Clone, clap::Args)]
pub struct BuildArgs {
    /// Where to publish [default: BOOTS_TFTP_ROOT of the gateway's environment].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// The gateway's URL written in the registration command line [default:
    /// EXECUTOR_URL of the gateway's environment].
    #[arg(long, value_name = "URL")]
    pub gateway_url: Option<String>,
    /// Kernel image [default: the newest /boot/vmlinuz-*].
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// The agent binary [default: farm-agent beside this farmgate binary, or of the
    /// `agent` profile (`cargo build --profile agent -p farmgate-agent`), the newer].
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// The crun binary.
    #[arg(long, value_name = "PATH", default_value = "/usr/bin/crun")]
    pub crun: PathBuf,
    /// Static busybox.
    #[arg(long, value_name = "PATH", default_value = "/bin/busybox")]
    pub busybox: PathBuf,
    /// More kernel modules (with their dependencies); repeatable.
    #[arg(long = "module", value_name = "NAME")]
    pub modules: Vec<String>,
    /// More programs (with their libraries); repeatable.
    #[arg(long = "binary", value_name = "PATH")]
    pub binaries: Vec<PathBuf>,
    /// Words added to the default kernel command line (e.g. `console=ttyS0`).
    #[arg(long, value_name = "TEXT")]
    pub append: Option<String>,
    /// Architecture of the DUTs [default: this host's].
    #[arg(long, value_name = "ARCH")]
    pub arch: Option<Arch>,
    /// Take the kernel, modules, crun, busybox, cache tools and libraries from this
    /// directory (`--crun`, `--busybox`, `--binary` are then paths inside it); required
    /// when --arch is not this host's (arm64: `scripts/arm64-sysroot.sh DIR`).
    #[arg(long, value_name = "DIR")]
    pub sysroot: Option<PathBuf>,
}

/// An architecture of DUTs the image can be built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    /// x86-64 (amd64).
    #[value(name = "x86_64")]
    X86_64,
    /// AArch64 (arm64).
    #[value(name = "aarch64")]
    Aarch64,
}

impl Arch {
    /// The name as Rust and the published file names spell it (`x86_64`, `aarch64`).
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }
}

/// What was published.
#[derive(Debug, Clone)]
pub struct Published {
    /// `default_<arch>_kernel`.
    pub kernel: PathBuf,
    /// `default_<arch>_initrd`.
    pub initrd: PathBuf,
    /// `default_<arch>_cmdline`.
    pub cmdline_file: PathBuf,
    /// The command line written.
    pub cmdline: String,
    /// The builder's own summary.
    pub summary: String,
}

/// The default command line of the image: registration with the gateway at `gateway`.
pub fn default_cmdline(gateway: &str, append: Option<&str>) -> String {
    let mut c = format!(
        "farmgate.agent=register farmgate.gateway={} b2c.ntp_peer=ci-gateway b2c.cache_device=none loglevel=6",
        gateway.trim_end_matches('/')
    );
    if let Some(a) = append.map(str::trim).filter(|a| !a.is_empty()) {
        c.push(' ');
        c.push_str(a);
    }
    c
}

/// The agent of this build: `farm-agent` beside this binary, or the one of the `agent`
/// profile (`target/agent/farm-agent`, small) beside its directory; the newer of the two.
fn sibling_agent() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let candidates = [
        dir.join("farm-agent"),
        dir.parent()?.join("agent").join("farm-agent"),
    ];
    candidates
        .into_iter()
        .filter_map(|p| {
            let modified = std::fs::metadata(&p).and_then(|m| m.modified()).ok()?;
            Some((modified, p))
        })
        .max_by_key(|(modified, _)| *modified)
        .map(|(_, p)| p)
}

/// Whether `path` is a file of the host, or of `sysroot` when given.
fn has_file(sysroot: Option<&Path>, path: &Path) -> bool {
    match sysroot {
        None => path.is_file(),
        Some(root) => farmgate_initramfs::resolve_in_sysroot(root, path).is_ok_and(|h| h.is_file()),
    }
}

/// The path of program `name` (e.g. `/sbin/mkfs.ext4`) on the host, or inside `sysroot`.
fn find_program(sysroot: Option<&Path>, name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| has_file(sysroot, p))
}

/// The command that cross-builds the agent for `arch` (Debian's gcc-<arch>-linux-gnu
/// as linker, and as C compiler for ring).
pub fn cross_agent_build_command(arch: &str) -> String {
    let triple = format!("{arch}-unknown-linux-gnu");
    let var = triple.replace('-', "_");
    format!(
        "CARGO_TARGET_{}_LINKER={arch}-linux-gnu-gcc CC_{var}={arch}-linux-gnu-gcc cargo build --profile agent --target {triple} -p farmgate-agent",
        var.to_uppercase()
    )
}

/// The cross-built agent for `arch`: `<target dir>/<arch>-unknown-linux-gnu/agent/farm-agent`,
/// the target directory being the parent of this binary's directory.
fn cross_agent(arch: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow::anyhow!("no target directory above {}", exe.display()))?;
    let agent = target
        .join(format!("{arch}-unknown-linux-gnu"))
        .join("agent")
        .join("farm-agent");
    if !agent.is_file() {
        anyhow::bail!(
            "no {arch} farm-agent at {}: build it with `{}` (needs gcc-{arch}-linux-gnu and rustup target add {arch}-unknown-linux-gnu), or give --agent PATH",
            agent.display(),
            cross_agent_build_command(arch)
        );
    }
    Ok(agent)
}

/// Builds the image and publishes it (see the module documentation).
pub fn build(
    args: &BuildArgs,
    config: Option<&farmgate_executor::GatewayConfig>,
) -> anyhow::Result<Published> {
    let out = match (&args.out, config) {
        (Some(o), _) => o.clone(),
        (None, Some(c)) => c.boots_tftp_root.clone(),
        (None, None) => anyhow::bail!(
            "no --out and no gateway configuration to take BOOTS_TFTP_ROOT from (set FARM_NAME and the gateway's variables, or give --out DIR)"
        ),
    };
    let gateway = match (&args.gateway_url, config) {
        (Some(g), _) => g.clone(),
        (None, Some(c)) => c.executor_url.clone(),
        (None, None) => {
            anyhow::bail!("no --gateway-url and no gateway configuration to take EXECUTOR_URL from")
        }
    };
    if !gateway.starts_with("http://") && !gateway.starts_with("https://") {
        anyhow::bail!("gateway URL {gateway:?}: expected http://host:port");
    }
    let host_arch = std::env::consts::ARCH;
    let arch = args.arch.map_or(host_arch, Arch::as_str);
    if arch != host_arch && args.sysroot.is_none() {
        anyhow::bail!(
            "--arch {arch} is not this host's ({host_arch}): give --sysroot DIR, a sysroot of {arch} packages (for aarch64: scripts/arm64-sysroot.sh DIR)"
        );
    }
    let sysroot = args.sysroot.as_deref();
    if let Some(root) = sysroot
        && !root.is_dir()
    {
        anyhow::bail!(
            "sysroot {}: no such directory (for aarch64: scripts/arm64-sysroot.sh {})",
            root.display(),
            root.display()
        );
    }
    let agent = match &args.agent {
        Some(a) => a.clone(),
        None if arch == host_arch => sibling_agent().ok_or_else(|| {
            anyhow::anyhow!(
                "farm-agent not found beside this binary: build it (cargo build --profile agent -p farmgate-agent) or give --agent PATH"
            )
        })?,
        None => cross_agent(arch)?,
    };
    let agent = std::fs::canonicalize(&agent)
        .map_err(|e| anyhow::anyhow!("agent {}: {e}", agent.display()))?;
    if !has_file(sysroot, &args.crun) {
        match sysroot {
            None => anyhow::bail!(
                "crun {}: no such file (install Debian's crun, or give --crun PATH)",
                args.crun.display()
            ),
            Some(root) => anyhow::bail!(
                "crun {} not in sysroot {} (scripts/arm64-sysroot.sh extracts crun:arm64, or give --crun PATH inside the sysroot)",
                args.crun.display(),
                root.display()
            ),
        }
    }
    std::fs::create_dir_all(&out).map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    let work = tempfile::Builder::new()
        .prefix(".image-build.")
        .tempdir_in(&out)
        .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;

    let mut opts = farmgate_initramfs::BuildOptions::new(work.path());
    opts.arch = arch.to_string();
    opts.sysroot = sysroot.map(Path::to_path_buf);
    opts.kernel = args.kernel.clone();
    opts.busybox = args.busybox.clone();
    opts.extra_modules = IMAGE_MODULES.iter().map(|s| s.to_string()).collect();
    opts.extra_modules.extend(args.modules.iter().cloned());
    opts.extra_binaries = vec![args.crun.clone()];
    opts.extra_binaries
        .extend(CACHE_TOOLS.iter().filter_map(|t| find_program(sysroot, t)));
    opts.extra_binaries.extend(args.binaries.iter().cloned());
    opts.init = Some(agent);
    // Unpacked at every boot: LZ4 unpacks twice as fast as gzip for 15% more bytes.
    opts.compression = farmgate_initramfs::Compression::Lz4;
    let summary = farmgate_initramfs::build(&opts)?;
    publish(&out, arch, &gateway, args.append.as_deref(), summary)
}

/// Moves the built files to their published names for `arch`.
fn publish(
    out: &Path,
    arch: &str,
    gateway: &str,
    append: Option<&str>,
    summary: farmgate_initramfs::BuildSummary,
) -> anyhow::Result<Published> {
    let [kernel_name, initrd_name, cmdline_name] = built_image_files(arch);
    let (kernel, initrd, cmdline_file) = (
        out.join(kernel_name),
        out.join(initrd_name),
        out.join(cmdline_name),
    );
    let cmdline = default_cmdline(gateway, append);
    // Each file replaced atomically; the kernel last, as it is what makes the gateway
    // use the image.
    std::fs::rename(&summary.initramfs, &initrd)
        .map_err(|e| anyhow::anyhow!("{}: {e}", initrd.display()))?;
    farmgate_initramfs::write_atomic(&cmdline_file, format!("{cmdline}\n").as_bytes())?;
    std::fs::rename(&summary.vmlinuz, &kernel)
        .map_err(|e| anyhow::anyhow!("{}: {e}", kernel.display()))?;
    Ok(Published {
        kernel,
        initrd,
        cmdline_file,
        cmdline,
        summary: summary.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_command_line_registers_with_the_gateway() {
        assert_eq!(
            default_cmdline("http://10.42.0.1:8000/", Some(" console=ttyS0 ")),
            "farmgate.agent=register farmgate.gateway=http://10.42.0.1:8000 b2c.ntp_peer=ci-gateway b2c.cache_device=none loglevel=6 console=ttyS0"
        );
        assert!(!default_cmdline("http://g", None).ends_with(' '));
    }

    #[test]
    fn missing_inputs_are_named() {
        let d = tempfile::tempdir().unwrap();
        let args = BuildArgs {
            out: Some(d.path().to_path_buf()),
            gateway_url: Some("http://g:8000".into()),
            kernel: None,
            agent: Some(d.path().join("no-agent")),
            crun: PathBuf::from("/usr/bin/crun"),
            busybox: PathBuf::from("/bin/busybox"),
            modules: vec![],
            binaries: vec![],
            append: None,
            arch: None,
            sysroot: None,
        };
        let e = build(&args, None).unwrap_err().to_string();
        assert!(e.contains("no-agent"), "{e}");
        let e = build(
            &BuildArgs {
                out: None,
                ..args.clone()
            },
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--out"), "{e}");
        let e = build(
            &BuildArgs {
                gateway_url: Some("g:8000".into()),
                ..args
            },
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("http://"), "{e}");
    }

    #[test]
    fn a_foreign_architecture_needs_a_sysroot_and_a_cross_built_agent() {
        let d = tempfile::tempdir().unwrap();
        let (other, other_arch) = if std::env::consts::ARCH == "aarch64" {
            ("x86_64", Arch::X86_64)
        } else {
            ("aarch64", Arch::Aarch64)
        };
        let args = BuildArgs {
            out: Some(d.path().join("out")),
            gateway_url: Some("http://g:8000".into()),
            kernel: None,
            agent: None,
            crun: PathBuf::from("/usr/bin/crun"),
            busybox: PathBuf::from("/bin/busybox"),
            modules: vec![],
            binaries: vec![],
            append: None,
            arch: Some(other_arch),
            sysroot: None,
        };
        let e = build(&args, None).unwrap_err().to_string();
        assert!(e.contains("--sysroot"), "{e}");
        let sysroot = d.path().join("sysroot");
        let e = build(
            &BuildArgs {
                sysroot: Some(sysroot.clone()),
                ..args.clone()
            },
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("arm64-sysroot.sh"), "{e}");
        std::fs::create_dir(&sysroot).unwrap();
        // The test binary's target directory has no cross-built agent: the error
        // says how to build one.
        let e = build(
            &BuildArgs {
                sysroot: Some(sysroot.clone()),
                ..args.clone()
            },
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&cross_agent_build_command(other)) && e.contains("--agent"),
            "{e}"
        );
        // With an agent, the sysroot's missing crun is named.
        let agent = d.path().join("farm-agent");
        std::fs::write(&agent, b"\x7fELF").unwrap();
        let e = build(
            &BuildArgs {
                sysroot: Some(sysroot.clone()),
                agent: Some(agent),
                ..args
            },
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/usr/bin/crun") && e.contains(&sysroot.display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn the_cross_build_command_names_linker_and_c_compiler() {
        assert_eq!(
            cross_agent_build_command("aarch64"),
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc cargo build --profile agent --target aarch64-unknown-linux-gnu -p farmgate-agent"
        );
    }
}
