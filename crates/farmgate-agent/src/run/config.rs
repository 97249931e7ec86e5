//! The OCI runtime `config.json` of a container, built the way podman would for the same
//! `podman run` options (see the module documentation of [`crate::run`]).

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::rootfs;
use super::{HostFacts, RunRequest};
use crate::cmdline::{EnvVar, MountSource};

/// podman's default `PATH`.
pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// podman's default capabilities (containers.conf, podman ≥ 4).
pub(crate) const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
];

/// Every capability, by number.
pub(crate) const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// podman's masked paths (not applied with `--privileged`).
const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/fs/selinux",
    "/sys/dev/block",
];

/// podman's read-only paths (not applied with `--privileged`).
const READONLY_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Device cgroup rules podman allows in every container (besides `--device`s).
const DEFAULT_DEVICE_RULES: &[(&str, i64, i64, &str)] = &[
    ("c", -1, -1, "m"),
    ("b", -1, -1, "m"),
    ("c", 1, 3, "rwm"),
    ("c", 1, 5, "rwm"),
    ("c", 1, 7, "rwm"),
    ("c", 1, 8, "rwm"),
    ("c", 1, 9, "rwm"),
    ("c", 5, 0, "rwm"),
    ("c", 5, 1, "rwm"),
    ("c", 5, 2, "rwm"),
    ("c", 136, -1, "rwm"),
    ("c", 10, 200, "rwm"),
];

/// Mount options of `-v` passed on to the runtime as they are.
const PASSTHROUGH_OPTS: &[&str] = &[
    "nosuid",
    "suid",
    "nodev",
    "dev",
    "noexec",
    "exec",
    "private",
    "rprivate",
    "shared",
    "rshared",
    "slave",
    "rslave",
    "unbindable",
    "runbindable",
];

/// Mount options of `-v` that only mean something to podman (SELinux relabelling, volume
/// copy-up): ignored.
const IGNORED_OPTS: &[&str] = &["z", "Z", "copy", "nocopy"];

/// What [`prepare`] produces: the config and the files the bundle must hold.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub config: Value,
    /// Files to write in the bundle before starting (absolute paths, contents).
    pub files: Vec<(PathBuf, String)>,
    /// Directories to create before starting (anonymous volumes, the working directory
    /// inside the rootfs).
    pub dirs: Vec<PathBuf>,
    /// Things that are accepted but not honoured (printed by the caller).
    pub warnings: Vec<String>,
}

/// How the namespaces are set up for a `--network`/`--pid`/`--ipc` value.
enum Ns {
    Host,
    Private,
    Path(String),
}

fn ns_mode(option: &str, value: Option<&str>, default_host: bool) -> Result<Ns, String> {
    match value {
        None if default_host => Ok(Ns::Host),
        None => Ok(Ns::Private),
        Some("host") => Ok(Ns::Host),
        Some("private" | "none") => Ok(Ns::Private),
        Some(v) if v.starts_with("ns:") && v.len() > 3 => Ok(Ns::Path(v[3..].to_owned())),
        Some(v) if option == "--ipc" && v == "shareable" => Ok(Ns::Private),
        Some(v) => Err(format!(
            "{option}={v} is not supported (host, private, none or ns:<path>)"
        )),
    }
}

/// Builds the config and the list of bundle files for `req`.
pub(crate) fn prepare(req: &RunRequest<'_>, facts: &HostFacts) -> Result<Prepared, String> {
    let spec = req.spec;
    let image = req.image;
    let mut warnings: Vec<String> = spec
        .unsupported
        .iter()
        .map(|o| format!("option {o} is not supported; ignored"))
        .collect();
    let mut files = Vec::new();
    let mut dirs = Vec::new();

    // ---- command
    let args = command(spec.entrypoint.as_deref(), &spec.args, image)?;

    // ---- user
    let user = spec.user.as_deref().or(image.user.as_deref());
    let id = rootfs::resolve_user(req.rootfs, user)?;

    // ---- namespaces and host name
    let net = ns_mode("--network", spec.network.as_deref(), true)?;
    let pid = ns_mode("--pid", spec.pid.as_deref(), false)?;
    let ipc = ns_mode("--ipc", spec.ipc.as_deref(), false)?;
    let hostname = match (&spec.hostname, &net) {
        (Some(h), _) => h.clone(),
        (None, Ns::Host) => facts.hostname.clone(),
        (None, _) => req.name.clone(),
    };
    let mut namespaces = vec![json!({"type": "mount"}), json!({"type": "uts"})];
    for (kind, mode) in [("pid", &pid), ("ipc", &ipc), ("network", &net)] {
        match mode {
            Ns::Host => {}
            Ns::Private => namespaces.push(json!({"type": kind})),
            Ns::Path(p) => namespaces.push(json!({"type": kind, "path": p})),
        }
    }

    // ---- environment: defaults, image, pipeline, user (later wins)
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("TERM".into(), "xterm".into()),
        ("container".into(), "podman".into()),
        ("HOSTNAME".into(), hostname.clone()),
    ];
    let set = |env: &mut Vec<(String, String)>, k: &str, v: &str| match env
        .iter_mut()
        .find(|(key, _)| key == k)
    {
        Some(e) => e.1 = v.to_owned(),
        None => env.push((k.to_owned(), v.to_owned())),
    };
    for kv in &image.env {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => set(&mut env, k, v),
            _ => warnings.push(format!("image Env entry {kv:?} is not NAME=value; ignored")),
        }
    }
    for (k, v) in &req.extra_env {
        set(&mut env, k, v);
    }
    for e in &spec.env {
        match e {
            EnvVar::Set { key, value } => set(&mut env, key, value),
            EnvVar::Inherit(key) => {
                if let Some(v) = facts.env.get(key) {
                    set(&mut env, key, v);
                }
            }
        }
    }
    if !env.iter().any(|(k, _)| k == "HOME") {
        set(&mut env, "HOME", &id.home);
    }

    // ---- working directory
    let cwd = spec
        .workdir
        .clone()
        .or_else(|| image.working_dir.clone())
        .unwrap_or_else(|| "/".to_owned());
    if !cwd.starts_with('/') {
        return Err(format!("working directory {cwd:?} is not absolute"));
    }
    if cwd != "/" {
        let p = rootfs::resolve_in(req.rootfs, &cwd)
            .map_err(|e| format!("resolving the working directory {cwd:?}: {e}"))?;
        dirs.push(p);
    }

    // ---- capabilities
    let caps = capabilities(spec.privileged, &spec.cap_add, &spec.cap_drop, facts)?;
    let added: Vec<String> = added_caps(&spec.cap_add, &caps);
    let (eff, inh) = if id.uid == 0 {
        (caps.clone(), Vec::new())
    } else {
        (added.clone(), added.clone())
    };
    let capabilities = json!({
        "bounding": caps,
        "effective": eff,
        "permitted": eff,
        "inheritable": inh,
        "ambient": inh,
    });

    // ---- security options
    let mut no_new_privs = false;
    for o in &spec.security_opt {
        match o.as_str() {
            "no-new-privileges" | "no-new-privileges=true" => no_new_privs = true,
            "no-new-privileges=false"
            | "label=disable"
            | "seccomp=unconfined"
            | "apparmor=unconfined" => {}
            other => warnings.push(format!("--security-opt={other} is not supported; ignored")),
        }
    }

    // ---- mounts
    let privileged = spec.privileged;
    let mut mounts = vec![json!({
        "destination": "/proc", "type": "proc", "source": "proc",
        "options": ["nosuid", "noexec", "nodev"]
    })];
    if privileged {
        mounts.push(json!({
            "destination": "/dev", "type": "bind", "source": "/dev",
            "options": ["rbind", "rprivate", "nosuid"]
        }));
    } else {
        mounts.extend([
            json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                   "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
            json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                   "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
            json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                   "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
            json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
                   "options": ["nosuid", "noexec", "nodev"]}),
        ]);
    }
    let ro_unless_privileged = if privileged { "rw" } else { "ro" };
    mounts.push(json!({
        "destination": "/sys", "type": "sysfs", "source": "sysfs",
        "options": ["nosuid", "noexec", "nodev", ro_unless_privileged]
    }));
    mounts.push(json!({
        "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
        "options": ["nosuid", "noexec", "nodev", "relatime", ro_unless_privileged]
    }));

    // /etc files written in the bundle
    let etc = req.bundle_dir.join("etc");
    if let Some(text) = resolv_conf(&spec.dns, facts.resolv_conf.as_deref()) {
        let p = etc.join("resolv.conf");
        files.push((p.clone(), text));
        mounts.push(bind_file("/etc/resolv.conf", &p));
    }
    let hosts = hosts_file(facts.hosts.as_deref(), &hostname, matches!(net, Ns::Host));
    let p = etc.join("hosts");
    files.push((p.clone(), hosts));
    mounts.push(bind_file("/etc/hosts", &p));
    let p = etc.join("hostname");
    files.push((p.clone(), format!("{hostname}\n")));
    mounts.push(bind_file("/etc/hostname", &p));

    // -v
    for (i, v) in spec.volumes.iter().enumerate() {
        let source = match &v.source {
            MountSource::Named(n) => named_volume(req.volumes, n)?,
            MountSource::HostPath(p) => host_path(&facts.cwd, p)?,
            MountSource::Anonymous => {
                let p = req.bundle_dir.join("anon").join(i.to_string());
                dirs.push(p.clone());
                p
            }
        };
        let mut opts: Vec<String> = Vec::new();
        let mut recursive = true;
        for o in &v.options {
            match o.as_str() {
                "ro" | "rw" => {}
                "bind" => recursive = false,
                "rbind" => recursive = true,
                o if PASSTHROUGH_OPTS.contains(&o) => opts.push(o.to_owned()),
                o if IGNORED_OPTS.contains(&o) => {}
                o => warnings.push(format!(
                    "volume {}: mount option {o:?} is not supported; ignored",
                    v.target
                )),
            }
        }
        opts.insert(0, if recursive { "rbind" } else { "bind" }.to_owned());
        opts.push(if v.read_only { "ro" } else { "rw" }.to_owned());
        mounts.push(json!({
            "destination": v.target, "type": "bind",
            "source": source.to_string_lossy(), "options": opts
        }));
    }

    // --mount
    for m in &spec.mounts {
        mounts.push(parse_mount(m, req.volumes, &facts.cwd)?);
    }

    // ---- devices
    let mut devices = Vec::new();
    let mut device_rules: Vec<Value> = if privileged {
        vec![json!({"allow": true, "access": "rwm"})]
    } else {
        let mut r = vec![json!({"allow": false, "access": "rwm"})];
        r.extend(DEFAULT_DEVICE_RULES.iter().map(|(t, maj, min, acc)| {
            let mut rule = json!({"allow": true, "type": t, "access": acc});
            if *maj >= 0 {
                rule["major"] = json!(maj);
            }
            if *min >= 0 {
                rule["minor"] = json!(min);
            }
            rule
        }));
        r
    };
    for d in &spec.devices {
        for dev in parse_device(d)? {
            // With --privileged the host's /dev is bind-mounted: nodes at their own path
            // are already there (and must not be created in the host's /dev).
            if privileged && dev.path == dev.host_path {
                continue;
            }
            if !privileged {
                device_rules.push(json!({
                    "allow": true, "type": dev.kind, "major": dev.major,
                    "minor": dev.minor, "access": dev.access
                }));
            }
            devices.push(json!({
                "path": dev.path, "type": dev.kind, "major": dev.major, "minor": dev.minor,
                "fileMode": dev.mode, "uid": dev.uid, "gid": dev.gid
            }));
        }
    }

    let mut linux = json!({
        "namespaces": namespaces,
        "devices": devices,
        "resources": {"devices": device_rules},
    });
    if !privileged {
        linux["maskedPaths"] = json!(MASKED_PATHS);
        linux["readonlyPaths"] = json!(READONLY_PATHS);
    }

    let mut user_json = json!({"uid": id.uid, "gid": id.gid});
    if !id.additional_gids.is_empty() {
        user_json["additionalGids"] = json!(id.additional_gids);
    }
    let env_json: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let config = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": spec.tty && facts.stdin_is_tty,
            "user": user_json,
            "args": args,
            "env": env_json,
            "cwd": cwd,
            "capabilities": capabilities,
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": facts.nofile, "soft": facts.nofile}],
            "noNewPrivileges": no_new_privs,
        },
        "root": {"path": req.rootfs.to_string_lossy(), "readonly": false},
        "hostname": hostname,
        "mounts": mounts,
        "linux": linux,
    });
    Ok(Prepared {
        config,
        files,
        dirs,
        warnings,
    })
}

/// podman's rules: `--entrypoint` replaces the image's Entrypoint (a JSON array, or one
/// word; empty clears it) and then the image's Cmd is only used when `--entrypoint` was
/// not given or was empty; arguments after the image replace the image's Cmd.
fn command(
    entrypoint: Option<&str>,
    args: &[String],
    image: &crate::oci::ImageConfig,
) -> Result<Vec<String>, String> {
    let (entry, user_entry) = match entrypoint {
        None => (image.entrypoint.clone(), false),
        Some("") => (Vec::new(), false),
        Some(e) if e.trim_start().starts_with('[') => {
            let v: Vec<String> = serde_json::from_str(e)
                .map_err(|err| format!("--entrypoint {e:?}: not a JSON array of strings: {err}"))?;
            let user = !v.is_empty();
            (v, user)
        }
        Some(e) => (vec![e.to_owned()], true),
    };
    let cmd = if !args.is_empty() {
        args.to_vec()
    } else if user_entry {
        Vec::new()
    } else {
        image.cmd.clone()
    };
    let mut all = entry;
    all.extend(cmd);
    if all.is_empty() {
        return Err("no command: the image has no Entrypoint or Cmd and none was given".to_owned());
    }
    Ok(all)
}

/// Normalises a capability name (`sys_admin`, `CAP_SYS_ADMIN`) or `ALL`.
fn cap_name(c: &str) -> Result<String, String> {
    let up = c.to_ascii_uppercase();
    if up == "ALL" {
        return Ok(up);
    }
    let full = if up.starts_with("CAP_") {
        up
    } else {
        format!("CAP_{up}")
    };
    if ALL_CAPS.contains(&full.as_str()) {
        Ok(full)
    } else {
        Err(format!("unknown capability {c:?}"))
    }
}

/// The bounding set: podman's defaults, or all with `--privileged`, plus `--cap-add`
/// minus `--cap-drop` (`ALL` works for both), restricted to what the agent itself has.
fn capabilities(
    privileged: bool,
    add: &[String],
    drop: &[String],
    facts: &HostFacts,
) -> Result<Vec<String>, String> {
    let add = add
        .iter()
        .map(|c| cap_name(c))
        .collect::<Result<Vec<_>, _>>()?;
    let drop = drop
        .iter()
        .map(|c| cap_name(c))
        .collect::<Result<Vec<_>, _>>()?;
    let all = privileged || add.iter().any(|c| c == "ALL");
    let drop_all = drop.iter().any(|c| c == "ALL");
    let mut set: Vec<&str> = if all {
        ALL_CAPS.to_vec()
    } else if drop_all {
        Vec::new()
    } else {
        DEFAULT_CAPS.to_vec()
    };
    if !all {
        for c in &add {
            if !set.contains(&c.as_str()) {
                set.push(c);
            }
        }
        if !drop_all {
            set.retain(|c| !drop.iter().any(|d| d == c));
        }
    }
    let mut out: Vec<String> = ALL_CAPS
        .iter()
        .filter(|c| set.contains(c) && facts.bounding_caps.iter().any(|b| b == *c))
        .map(|c| (*c).to_owned())
        .collect();
    out.dedup();
    Ok(out)
}

/// The `--cap-add` capabilities that made it into the bounding set (what a non-root user
/// gets as effective capabilities).
fn added_caps(add: &[String], set: &[String]) -> Vec<String> {
    let add: Vec<String> = add.iter().filter_map(|c| cap_name(c).ok()).collect();
    set.iter()
        .filter(|c| add.iter().any(|a| a == "ALL" || a == *c))
        .cloned()
        .collect()
}

fn bind_file(dest: &str, src: &Path) -> Value {
    json!({
        "destination": dest, "type": "bind", "source": src.to_string_lossy(),
        "options": ["bind", "rprivate"]
    })
}

/// The container's `/etc/resolv.conf`: `None` with `--dns=none` (the image's own is
/// kept); the host's, with its `nameserver` lines replaced by `--dns` ones if any.
fn resolv_conf(dns: &[String], host: Option<&str>) -> Option<String> {
    if dns.iter().any(|d| d == "none") {
        return None;
    }
    let host = host.unwrap_or("");
    if dns.is_empty() {
        return Some(host.to_owned());
    }
    let mut out: String = dns.iter().map(|d| format!("nameserver {d}\n")).collect();
    for l in host.lines() {
        if !l.trim_start().starts_with("nameserver") {
            out.push_str(l);
            out.push('\n');
        }
    }
    Some(out)
}

/// The container's `/etc/hosts`: the host's with the host network (else localhost
/// only), plus the host name when it is not there.
fn hosts_file(host: Option<&str>, hostname: &str, host_net: bool) -> String {
    let mut out = match host {
        Some(h) if host_net => h.to_owned(),
        _ => "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n".to_owned(),
    };
    if !out.ends_with('\n') && !out.is_empty() {
        out.push('\n');
    }
    let known = out.lines().any(|l| {
        let l = l.split('#').next().unwrap_or("");
        l.split_whitespace().skip(1).any(|n| n == hostname)
    });
    if !known && !hostname.is_empty() {
        out.push_str(&format!("127.0.1.1\t{hostname}\n"));
    }
    out
}

fn named_volume(volumes: &BTreeMap<String, PathBuf>, name: &str) -> Result<PathBuf, String> {
    volumes.get(name).cloned().ok_or_else(|| {
        let have: Vec<&str> = volumes.keys().map(String::as_str).collect();
        format!(
            "named volume {name:?} is not one of the volumes set up ({})",
            if have.is_empty() {
                "none".to_owned()
            } else {
                have.join(", ")
            }
        )
    })
}

fn host_path(cwd: &Path, p: &str) -> Result<PathBuf, String> {
    let path = cwd.join(p);
    match std::fs::symlink_metadata(&path) {
        Ok(_) => Ok(path),
        Err(e) => Err(format!("host path {p:?} of a volume: {e}")),
    }
}

/// A `--mount type=bind|volume|tmpfs,source=…,destination=…[,ro]` option.
fn parse_mount(
    text: &str,
    volumes: &BTreeMap<String, PathBuf>,
    cwd: &Path,
) -> Result<Value, String> {
    let err = |why: String| format!("--mount {text:?}: {why}");
    let mut kind = None;
    let mut src = None;
    let mut dst = None;
    let mut ro = false;
    let mut opts: Vec<String> = Vec::new();
    for field in text.split(',') {
        let (k, v) = match field.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (field, None),
        };
        match (k, v) {
            ("type", Some(v)) => kind = Some(v.to_owned()),
            ("source" | "src", Some(v)) => src = Some(v.to_owned()),
            ("destination" | "dst" | "target", Some(v)) => dst = Some(v.to_owned()),
            ("ro" | "readonly", None | Some("true")) => ro = true,
            ("ro" | "readonly", Some("false")) | ("rw", None) => ro = false,
            ("bind-propagation", Some(v)) if PASSTHROUGH_OPTS.contains(&v) => {
                opts.push(v.to_owned())
            }
            ("tmpfs-size", Some(v)) => opts.push(format!("size={v}")),
            ("tmpfs-mode", Some(v)) => opts.push(format!("mode={v}")),
            ("relabel" | "consistency", _) => {}
            (k, _) if v.is_none() && PASSTHROUGH_OPTS.contains(&k) => opts.push(k.to_owned()),
            _ => return Err(err(format!("option {field:?} is not supported"))),
        }
    }
    let dst = dst.ok_or_else(|| err("no destination".to_owned()))?;
    if !dst.starts_with('/') {
        return Err(err(format!("destination {dst:?} is not absolute")));
    }
    opts.push(if ro { "ro" } else { "rw" }.to_owned());
    match kind.as_deref() {
        Some("bind") | Some("volume") => {
            let s = src.ok_or_else(|| err("no source".to_owned()))?;
            let source = if kind.as_deref() == Some("volume") {
                named_volume(volumes, &s).map_err(err)?
            } else {
                host_path(cwd, &s).map_err(err)?
            };
            opts.insert(0, "rbind".to_owned());
            Ok(json!({"destination": dst, "type": "bind",
                      "source": source.to_string_lossy(), "options": opts}))
        }
        Some("tmpfs") => {
            opts.splice(0..0, ["nosuid".to_owned(), "nodev".to_owned()]);
            Ok(json!({"destination": dst, "type": "tmpfs", "source": "tmpfs", "options": opts}))
        }
        Some(k) => Err(err(format!(
            "type {k:?} is not supported (bind, volume, tmpfs)"
        ))),
        None => Err(err("no type=".to_owned())),
    }
}

/// One device node given to the container.
#[derive(Debug)]
struct Device {
    host_path: String,
    path: String,
    kind: &'static str,
    major: u64,
    minor: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    access: String,
}

/// A `--device=host[:container][:perms]`; a directory gives every device under it.
fn parse_device(text: &str) -> Result<Vec<Device>, String> {
    let err = |why: String| format!("--device {text:?}: {why}");
    let parts: Vec<&str> = text.split(':').collect();
    let is_perm = |s: &str| !s.is_empty() && s.chars().all(|c| matches!(c, 'r' | 'w' | 'm'));
    let (src, dst, access) = match parts.as_slice() {
        [s] => (*s, *s, "rwm"),
        [s, p] if is_perm(p) => (*s, *s, *p),
        [s, d] => (*s, *d, "rwm"),
        [s, d, p] if is_perm(p) => (*s, *d, *p),
        _ => {
            return Err(err(
                "expected host-path[:container-path][:permissions]".to_owned()
            ));
        }
    };
    if !src.starts_with('/') || !dst.starts_with('/') {
        return Err(err("device paths must be absolute".to_owned()));
    }
    let mut out = Vec::new();
    collect_devices(Path::new(src), Path::new(dst), access, &mut out, 0).map_err(err)?;
    if out.is_empty() {
        return Err(err(format!("no device node at or under {src}")));
    }
    Ok(out)
}

fn collect_devices(
    src: &Path,
    dst: &Path,
    access: &str,
    out: &mut Vec<Device>,
    depth: usize,
) -> Result<(), String> {
    let meta = std::fs::metadata(src).map_err(|e| format!("{}: {e}", src.display()))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        if depth > 8 {
            return Ok(());
        }
        let rd = std::fs::read_dir(src).map_err(|e| format!("{}: {e}", src.display()))?;
        let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            // Symbolic links in a device directory (by-path/…) name nodes listed anyway.
            if e.file_type().map(|t| t.is_symlink()).unwrap_or(true) {
                continue;
            }
            collect_devices(&e.path(), &dst.join(e.file_name()), access, out, depth + 1)?;
        }
        return Ok(());
    }
    let kind = if ft.is_char_device() {
        "c"
    } else if ft.is_block_device() {
        "b"
    } else if depth == 0 {
        return Err(format!("{} is not a device node", src.display()));
    } else {
        return Ok(());
    };
    let rdev = meta.rdev();
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    out.push(Device {
        host_path: src.to_string_lossy().into_owned(),
        path: dst.to_string_lossy().into_owned(),
        kind,
        major,
        minor,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        access: access.to_owned(),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::ImageConfig;

    fn img(entry: &[&str], cmd: &[&str]) -> ImageConfig {
        ImageConfig {
            entrypoint: entry.iter().map(|s| s.to_string()).collect(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            env: vec![],
            working_dir: None,
            user: None,
            digest: String::new(),
        }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn command_rules() {
        let i = img(&["/entry", "-x"], &["default"]);
        assert_eq!(
            command(None, &[], &i).unwrap(),
            s(&["/entry", "-x", "default"])
        );
        assert_eq!(
            command(None, &s(&["a"]), &i).unwrap(),
            s(&["/entry", "-x", "a"])
        );
        assert_eq!(command(Some("/bin/sh"), &[], &i).unwrap(), s(&["/bin/sh"]));
        assert_eq!(
            command(Some("/bin/sh"), &s(&["-c", "x"]), &i).unwrap(),
            s(&["/bin/sh", "-c", "x"])
        );
        assert_eq!(
            command(Some(r#"["/bin/sh","-c"]"#), &s(&["x"]), &i).unwrap(),
            s(&["/bin/sh", "-c", "x"])
        );
        assert_eq!(command(Some(""), &[], &i).unwrap(), s(&["default"]));
        assert!(command(Some("[bad"), &[], &i).is_err());
        assert!(command(None, &[], &img(&[], &[])).is_err());
    }

    #[test]
    fn caps() {
        let facts = HostFacts {
            bounding_caps: ALL_CAPS.iter().map(|c| c.to_string()).collect(),
            ..HostFacts::for_tests()
        };
        let c = capabilities(false, &[], &[], &facts).unwrap();
        assert_eq!(c.len(), DEFAULT_CAPS.len());
        let c = capabilities(false, &s(&["sys_admin"]), &s(&["CAP_KILL"]), &facts).unwrap();
        assert!(c.contains(&"CAP_SYS_ADMIN".to_string()));
        assert!(!c.contains(&"CAP_KILL".to_string()));
        let c = capabilities(false, &s(&["net_raw"]), &s(&["all"]), &facts).unwrap();
        assert_eq!(c, s(&["CAP_NET_RAW"]));
        let c = capabilities(true, &[], &[], &facts).unwrap();
        assert_eq!(c.len(), ALL_CAPS.len());
        assert!(capabilities(false, &s(&["CAP_FLY"]), &[], &facts).is_err());
        let few = HostFacts {
            bounding_caps: s(&["CAP_KILL"]),
            ..HostFacts::for_tests()
        };
        assert_eq!(
            capabilities(true, &[], &[], &few).unwrap(),
            s(&["CAP_KILL"])
        );
    }

    #[test]
    fn resolv_and_hosts() {
        let host = "search lan\nnameserver 1.1.1.1\n";
        assert_eq!(resolv_conf(&[], Some(host)).unwrap(), host);
        assert_eq!(
            resolv_conf(&s(&["9.9.9.9"]), Some(host)).unwrap(),
            "nameserver 9.9.9.9\nsearch lan\n"
        );
        assert_eq!(resolv_conf(&s(&["none"]), Some(host)), None);
        let h = hosts_file(Some("127.0.0.1 localhost\n"), "dut", true);
        assert_eq!(h, "127.0.0.1 localhost\n127.0.1.1\tdut\n");
        let h = hosts_file(Some("10.0.0.2 dut # me\n"), "dut", true);
        assert_eq!(h, "10.0.0.2 dut # me\n");
        assert!(
            hosts_file(Some("10.0.0.2 dut\n"), "c1", false).starts_with("127.0.0.1\tlocalhost")
        );
    }

    #[test]
    fn mount_option() {
        let mut vols = BTreeMap::new();
        vols.insert("job".to_string(), PathBuf::from("/var/vol/job"));
        let m = parse_mount("type=volume,src=job,dst=/job,ro", &vols, Path::new("/")).unwrap();
        assert_eq!(m["source"], "/var/vol/job");
        assert_eq!(m["options"], json!(["rbind", "ro"]));
        let m = parse_mount(
            "type=tmpfs,dst=/scratch,tmpfs-size=1m",
            &vols,
            Path::new("/"),
        )
        .unwrap();
        assert_eq!(m["type"], "tmpfs");
        assert_eq!(m["options"], json!(["nosuid", "nodev", "size=1m", "rw"]));
        let e = parse_mount("type=volume,src=nope,dst=/x", &vols, Path::new("/")).unwrap_err();
        assert!(e.contains("\"nope\"") && e.contains("job"), "{e}");
        assert!(parse_mount("type=image,src=a,dst=/x", &vols, Path::new("/")).is_err());
        assert!(
            parse_mount(
                "type=bind,src=/nonexistent-farmgate,dst=/x",
                &vols,
                Path::new("/")
            )
            .is_err()
        );
    }

    #[test]
    fn devices() {
        let d = parse_device("/dev/null:/dev/mynull:rw").unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].kind, d[0].major, d[0].minor), ("c", 1, 3));
        assert_eq!(d[0].path, "/dev/mynull");
        assert_eq!(d[0].access, "rw");
        let d = parse_device("/dev/zero:r").unwrap();
        assert_eq!(
            (d[0].path.as_str(), d[0].access.as_str()),
            ("/dev/zero", "r")
        );
        assert!(
            parse_device("/etc/passwd")
                .unwrap_err()
                .contains("not a device node")
        );
        assert!(parse_device("/dev/does-not-exist").is_err());
        assert!(parse_device("dev/null").is_err());
    }
}
