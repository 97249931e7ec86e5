//! The agent as the DUT's `/init` (PID 1): what boot2container's init does before the
//! first container, and the power-off at the end.
//!
//! In order ([`early_mounts`], [`load_modules`], [`set_hostname`], then the network, the
//! clock and the cache partition of [`crate::net`], [`crate::ntp`] and
//! [`crate::cachedev`]):
//! 1. `/proc`, `/sys`, `/dev` (devtmpfs), `/dev/pts`, `/dev/shm`, `/run` and `/tmp`
//!    mounted, and the cgroup2 hierarchy crun needs, each only when not already there;
//! 2. the kernel modules the image lists in `/etc/farmgate-modules` (network and disk
//!    drivers, in dependency order), then the `b2c.insmods` ones, by name;
//! 3. the host name (`b2c.hostname`, default `boot2container`).
//!
//! Every step that fails is reported on the console and the boot goes on: a DUT that
//! cannot load a module may still have the driver built in, and the job's output says what
//! went wrong either way. At the end, [`power_off`] runs `b2c.shutdown_cmd` /
//! `b2c.reboot_cmd` when they are not the defaults, else asks the kernel directly
//! (`reboot(2)`), so the image needs no shell for it.

use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

/// Where the image lists the modules to load at boot (one absolute path a line, in
/// dependency order), as `farmgate-mkinitramfs` writes it.
pub const MODULE_LIST: &str = "/etc/farmgate-modules";

/// Seconds since the machine booted (`CLOCK_BOOTTIME`), for the timestamps of the boot
/// phases on the console.
pub fn uptime() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
        .unwrap_or(0.0)
}

/// Whether this process is the machine's init.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// The mount points of `/proc/self/mounts` (or of `mounts` when given, for tests).
fn mount_points(mounts: &str) -> Vec<String> {
    mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(str::to_string)
        .collect()
}

/// Mounts what an init provides; returns one message per mount that failed.
pub fn early_mounts() -> Vec<String> {
    let mut problems = Vec::new();
    // /proc first: it tells what is already mounted.
    let table: [(&str, &str, &str, MsFlags, Option<&str>); 8] = [
        (
            "proc",
            "/proc",
            "proc",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        ),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("gid=5,mode=0620,ptmxmode=0666"),
        ),
        (
            "shm",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "run",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmp",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        ),
    ];
    // Read once (again right after /proc itself is mounted), then kept up to date.
    let mut mounted = mounted_now();
    for (source, target, fstype, flags, data) in table {
        if mounted.iter().any(|m| m == target) {
            continue;
        }
        match mount_at(source, target, fstype, flags, data) {
            Ok(()) if target == "/proc" => mounted = mounted_now(),
            Ok(()) => mounted.push(target.to_string()),
            Err(e) => problems.push(e),
        }
    }
    problems
}

/// The mount points of this process (none when `/proc` is not mounted).
fn mounted_now() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| mount_points(&m))
        .unwrap_or_default()
}

/// Mounts `fstype` on `target`, creating the mount point.
fn mount_at(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    std::fs::create_dir_all(target)
        .map_err(|e| format!("{target}: cannot create the mount point: {e}"))?;
    nix::mount::mount(Some(source), target, Some(fstype), flags, data)
        .map_err(|e| format!("mounting {fstype} on {target}: {e}"))
}

/// Mounts the cgroup2 hierarchy crun needs when nothing is mounted on `/sys/fs/cgroup`
/// (the agent under another init of an initramfs); a host that has its cgroups is left
/// alone. As init, [`early_mounts`] does it.
pub fn ensure_cgroup2() -> Result<(), String> {
    if mounted_now().iter().any(|m| m == "/sys/fs/cgroup") {
        return Ok(());
    }
    mount_at(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        MsFlags::empty(),
        None,
    )
}

/// The module name of a path or a `b2c.insmods` word: file stem without `.ko*`, with
/// `-` and `_` the same (as the kernel treats them).
fn module_name(s: &str) -> String {
    let base = s.rsplit('/').next().unwrap_or(s);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

/// Loads one module file; `Ok(false)` when it was already loaded.
fn load_module(path: &Path, params: &str) -> Result<bool, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let params = std::ffi::CString::new(params)
        .map_err(|_| format!("{}: parameters contain a NUL byte", path.display()))?;
    match nix::kmod::finit_module(&f, &params, nix::kmod::ModuleInitFlags::empty()) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::EEXIST) => Ok(false),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// What [`load_modules`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ModulesLoaded {
    /// Modules loaded now.
    pub loaded: Vec<String>,
    /// One message per module that could not be loaded or found.
    pub problems: Vec<String>,
}

/// Loads the modules listed in `list` (dependency order; missing list: nothing), then the
/// `insmods` by name, found among the listed files or under `modules_dir`.
pub fn load_modules(list: &Path, modules_dir: &Path, insmods: &[String]) -> ModulesLoaded {
    let mut out = ModulesLoaded::default();
    let listed = read_module_list(list);
    for p in &listed {
        match load_module(p, "") {
            Ok(true) => out.loaded.push(module_name(&p.to_string_lossy())),
            Ok(false) => {}
            Err(e) => out.problems.push(e),
        }
    }
    if insmods.is_empty() {
        return out;
    }
    let mut available = listed.clone();
    collect_module_files(modules_dir, &mut available, 0);
    for wanted in insmods {
        let name = module_name(wanted);
        let found = available
            .iter()
            .find(|p| module_name(&p.to_string_lossy()) == name);
        match found {
            Some(p) => match load_module(p, "") {
                Ok(true) => out.loaded.push(name),
                Ok(false) => {}
                Err(e) => out.problems.push(format!("b2c.insmods {wanted}: {e}")),
            },
            None => out.problems.push(format!(
                "b2c.insmods {wanted}: no such module in the image (under {})",
                modules_dir.display()
            )),
        }
    }
    out
}

/// Where the image lists the `modules.alias` patterns of its modules (`<pattern>
/// <module>` a line) and their dependencies (`<module>: <dependency> …`).
pub const MODULE_ALIASES: &str = "/etc/farmgate-modules.alias";
/// See [`MODULE_ALIASES`].
pub const MODULE_DEPS: &str = "/etc/farmgate-modules.dep";

/// The `modalias` of every device under `<sys>/bus/*/devices/*`.
fn device_modaliases(sys: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(buses) = std::fs::read_dir(sys.join("bus")) else {
        return out;
    };
    for bus in buses.flatten() {
        let Ok(devices) = std::fs::read_dir(bus.path().join("devices")) else {
            continue;
        };
        for d in devices.flatten() {
            if let Ok(a) = std::fs::read_to_string(d.path().join("modalias")) {
                let a = a.trim();
                if !a.is_empty() {
                    out.push(a.to_string());
                }
            }
        }
    }
    out
}

/// The image's module aliases (compiled) and dependencies, read once per boot.
pub struct HardwareIndex {
    aliases: Vec<(glob::Pattern, String)>,
    deps: std::collections::HashMap<String, Vec<String>>,
}

impl HardwareIndex {
    /// From the image's alias list (`<pattern> <module>` a line; malformed lines and
    /// patterns are skipped) and dependency list (`<module>: <dependency> …`). `None`
    /// when the image has no alias list (then every listed module is loaded).
    pub fn parse(aliases_text: Option<&str>, deps_text: &str) -> Option<HardwareIndex> {
        let aliases = aliases_text?
            .lines()
            .filter_map(|line| {
                let mut w = line.split_whitespace();
                let (pattern, module) = (w.next()?, w.next()?);
                Some((glob::Pattern::new(pattern).ok()?, module_name(module)))
            })
            .collect();
        let deps = deps_text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(m, d)| {
                (
                    module_name(m.trim()),
                    d.split_whitespace().map(module_name).collect(),
                )
            })
            .collect();
        Some(HardwareIndex { aliases, deps })
    }

    /// The modules to load for devices of these `modalias`es: those whose alias matches
    /// one, with their dependencies.
    pub fn wanted(&self, modaliases: &[String]) -> std::collections::BTreeSet<String> {
        let mut wanted: std::collections::BTreeSet<String> = self
            .aliases
            .iter()
            .filter(|(p, _)| modaliases.iter().any(|a| p.matches(a)))
            .map(|(_, m)| m.clone())
            .collect();
        let mut stack: Vec<String> = wanted.iter().cloned().collect();
        while let Some(m) = stack.pop() {
            for d in self.deps.get(&m).into_iter().flatten() {
                if wanted.insert(d.clone()) {
                    stack.push(d.clone());
                }
            }
        }
        wanted
    }
}

/// Loads the image's modules for the hardware present, as udev's cold plug does: the
/// listed modules whose aliases match a device (with their dependencies), again while
/// loading them makes new devices appear (a virtio NIC appears once `virtio_pci` is
/// loaded); then the `insmods`. With `all`, or an image without alias list, every listed
/// module is loaded (file systems, such as the cache's ext4, match no device).
pub fn load_modules_for_hardware(
    list: &Path,
    sys: &Path,
    modules_dir: &Path,
    insmods: &[String],
    all: bool,
) -> ModulesLoaded {
    let index = HardwareIndex::parse(
        std::fs::read_to_string(MODULE_ALIASES).ok().as_deref(),
        &std::fs::read_to_string(MODULE_DEPS).unwrap_or_default(),
    );
    let Some(index) = index.filter(|_| !all) else {
        return load_modules(list, modules_dir, insmods);
    };
    let listed = read_module_list(list);
    let mut out = ModulesLoaded::default();
    let mut tried = std::collections::BTreeSet::new();
    for _round in 0..6 {
        let wanted = index.wanted(&device_modaliases(sys));
        let mut progress = false;
        for p in &listed {
            let name = module_name(&p.to_string_lossy());
            if !wanted.contains(&name) || !tried.insert(name.clone()) {
                continue;
            }
            progress = true;
            match load_module(p, "") {
                Ok(true) => out.loaded.push(name),
                Ok(false) => {}
                Err(e) => out.problems.push(e),
            }
        }
        if !progress {
            break;
        }
    }
    let extra = load_modules(Path::new("/nonexistent"), modules_dir, insmods);
    out.loaded.extend(extra.loaded);
    out.problems.extend(extra.problems);
    out
}

/// The module files the image lists (one path a line, dependency order); none when the
/// list is missing.
fn read_module_list(list: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string(list)
        .map(|t| {
            t.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Every uncompressed `*.ko` below `dir` (bounded depth).
fn collect_module_files(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) {
    if depth > 8 {
        return;
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => collect_module_files(&p, out, depth + 1),
            Ok(t) if t.is_file() && p.extension().is_some_and(|x| x == "ko") => out.push(p),
            _ => {}
        }
    }
}

/// The running kernel's modules directory (`/lib/modules/<release>`).
pub fn running_modules_dir() -> PathBuf {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    Path::new("/lib/modules").join(release)
}

/// Sets the host name (`b2c.hostname`, else boot2container's default).
pub fn set_hostname(name: Option<&str>) -> Result<String, String> {
    let name = name.unwrap_or(crate::cmdline::DEFAULT_HOSTNAME);
    nix::unistd::sethostname(name).map_err(|e| format!("setting the host name {name:?}: {e}"))?;
    Ok(name.to_string())
}

/// How the machine ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    /// Power off (`b2c.shutdown_cmd`).
    PowerOff,
    /// Reboot (`b2c.reboot_cmd`; a container exited with 129).
    Reboot,
}

/// Powers the machine off or reboots it. A command other than boot2container's
/// default (`poweroff -f` / `reboot -f`) runs with `/bin/sh -c`; the default, or a command
/// that returns, ends with `reboot(2)`. Never returns when it worked.
pub fn power_off(action: PowerAction, command: &str) -> String {
    let default = match action {
        PowerAction::PowerOff => crate::cmdline::DEFAULT_SHUTDOWN_CMD,
        PowerAction::Reboot => crate::cmdline::DEFAULT_REBOOT_CMD,
    };
    if command.trim() != default {
        match std::process::Command::new("/bin/sh")
            .args(["-c", command])
            .status()
        {
            Ok(s) => println!("farm-agent: {command:?} returned ({s}); asking the kernel"),
            Err(e) => println!("farm-agent: cannot run {command:?}: {e}; asking the kernel"),
        }
    }
    for p in release_storage() {
        println!("farm-agent: {p}");
    }
    nix::unistd::sync();
    let mode = match action {
        PowerAction::PowerOff => nix::sys::reboot::RebootMode::RB_POWER_OFF,
        PowerAction::Reboot => nix::sys::reboot::RebootMode::RB_AUTOBOOT,
    };
    match nix::sys::reboot::reboot(mode) {
        Ok(never) => match never {},
        Err(e) => format!("reboot(2) failed: {e}"),
    }
}

/// Before the power goes: swap files off and the file systems mounted by the set-up
/// (the cache at `/storage`, `b2c.filesystem`s) unmounted, deepest first, so the next
/// boot finds a clean file system. Returns one message per step that failed.
pub fn release_storage() -> Vec<String> {
    let mut problems = Vec::new();
    if let Ok(swaps) = std::fs::read_to_string("/proc/swaps") {
        for path in swaps
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
        {
            let swapoff = ["/sbin/swapoff", "/usr/sbin/swapoff", "/bin/busybox"]
                .into_iter()
                .find(|p| Path::new(p).is_file());
            let Some(prog) = swapoff else {
                problems.push(format!("swap {path}: no swapoff program in the image"));
                continue;
            };
            let mut cmd = std::process::Command::new(prog);
            if prog.ends_with("busybox") {
                cmd.arg("swapoff");
            }
            match cmd.arg(path).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => problems.push(format!(
                    "swapoff {path}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => problems.push(format!("swapoff {path}: {e}")),
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut ours: Vec<String> = mount_points(&mounts)
        .into_iter()
        .filter(|m| m == "/storage" || m.starts_with("/storage/") || m.starts_with("/mnt/"))
        .collect();
    ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in ours {
        if let Err(e) = nix::mount::umount(m.as_str()) {
            problems.push(format!("unmounting {m}: {e}"));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names() {
        assert_eq!(
            module_name("/lib/modules/6.1/kernel/drivers/net/virtio_net.ko"),
            "virtio_net"
        );
        assert_eq!(module_name("virtio-net"), "virtio_net");
        assert_eq!(module_name("e1000e.ko.xz"), "e1000e");
        assert_eq!(module_name("ext4"), "ext4");
    }

    #[test]
    fn modules_for_the_hardware_present_with_their_dependencies() {
        let aliases = "pci:v00001AF4d00001000sv*sd*bc*sc*i* virtio_pci\n\
                       virtio:d00000001v* virtio_net\n\
                       pci:v00008086d000010D3sv*sd*bc*sc*i* e1000e\n\
                       fs-ext4 ext4\n\
                       [broken\n";
        let deps = "virtio_pci: virtio_pci_modern_dev virtio_ring\nvirtio_net: net_failover virtio_ring\n\
                    net_failover: failover\ne1000e:\n";
        let present = vec!["pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00".to_string()];
        let index = HardwareIndex::parse(Some(aliases), deps).unwrap();
        let w = index.wanted(&present);
        let w: Vec<&str> = w.iter().map(String::as_str).collect();
        assert_eq!(
            w,
            vec!["virtio_pci", "virtio_pci_modern_dev", "virtio_ring"]
        );
        // Once virtio_pci is loaded, the virtio NIC appears and its driver is wanted.
        let mut present = present;
        present.push("virtio:d00000001v00001AF4".to_string());
        let w = index.wanted(&present);
        assert!(w.contains("virtio_net") && w.contains("failover"), "{w:?}");
        assert!(!w.contains("e1000e") && !w.contains("ext4"), "{w:?}");
        // No alias list in the image: no choice made.
        assert!(HardwareIndex::parse(None, deps).is_none());
    }

    #[test]
    fn mount_points_of_a_table() {
        let t = "proc /proc proc rw 0 0\nsysfs /sys sysfs rw 0 0\nbroken\n";
        assert_eq!(mount_points(t), vec!["/proc", "/sys"]);
    }

    #[test]
    fn unknown_insmods_are_reported_by_name() {
        let d = tempfile::tempdir().unwrap();
        let r = load_modules(
            &d.path().join("no-list"),
            d.path(),
            &["no_such_module".to_string()],
        );
        assert!(r.loaded.is_empty());
        assert_eq!(r.problems.len(), 1);
        assert!(r.problems[0].contains("no_such_module"), "{:?}", r.problems);
        assert!(r.problems[0].contains("no such module"), "{:?}", r.problems);
    }

    #[test]
    fn a_listed_file_that_is_not_a_module_is_a_problem_not_a_panic() {
        let d = tempfile::tempdir().unwrap();
        let bogus = d.path().join("bogus.ko");
        std::fs::write(&bogus, b"not an ELF module").unwrap();
        let list = d.path().join("list");
        std::fs::write(&list, format!("{}\n\n", bogus.display())).unwrap();
        let r = load_modules(&list, d.path(), &[]);
        assert!(r.loaded.is_empty());
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert!(r.problems[0].contains("bogus.ko"), "{:?}", r.problems);
    }
}
