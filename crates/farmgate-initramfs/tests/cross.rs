//! Images of another architecture: the ELF reader on real files, the sysroot build path
//! (always, with a sysroot made of the host's own files), and, when
//! `FARMGATE_ARM64_SYSROOT` names a sysroot made by `scripts/arm64-sysroot.sh`, a real
//! aarch64 initramfs with the cross-built agent (`FARMGATE_ARM64_AGENT`, default
//! `target/aarch64-unknown-linux-gnu/agent/farm-agent`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use farmgate_initramfs::elf::{self, EM_AARCH64};
use farmgate_initramfs::{BuildOptions, build, resolve_in_sysroot, sysroot_dependencies};

const HOST_ARCH: &str = std::env::consts::ARCH;

fn host_machine() -> u16 {
    elf::machine_of_arch(HOST_ARCH).expect("tests run on x86_64 or aarch64")
}

/// One entry of a newc archive.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    Other,
}

/// Reads a gzip-compressed newc cpio archive into path (without leading `/`) → entry.
fn read_initramfs(path: &Path) -> BTreeMap<String, Node> {
    let gz = std::fs::read(path).expect("reading the initramfs");
    let mut cpio = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut cpio)
        .expect("gunzip initramfs");
    let mut out = BTreeMap::new();
    let mut pos = 0usize;
    let hex = |b: &[u8]| u32::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap();
    loop {
        let hdr = &cpio[pos..pos + 110];
        assert_eq!(&hdr[..6], b"070701", "newc magic at {pos}");
        let field = |i: usize| hex(&hdr[6 + 8 * i..14 + 8 * i]);
        let (mode, filesize, namesize) = (field(1), field(6) as usize, field(11) as usize);
        let name_start = pos + 110;
        let name = std::str::from_utf8(&cpio[name_start..name_start + namesize - 1])
            .unwrap()
            .to_string();
        let data_start = (name_start + namesize).div_ceil(4) * 4;
        let data = cpio[data_start..data_start + filesize].to_vec();
        pos = (data_start + filesize).div_ceil(4) * 4;
        if name == "TRAILER!!!" {
            break;
        }
        let node = match mode & 0o170000 {
            0o040000 => Node::Dir,
            0o100000 => Node::File(data),
            0o120000 => Node::Symlink(String::from_utf8(data).unwrap()),
            _ => Node::Other,
        };
        out.insert(name.trim_start_matches('/').to_string(), node);
    }
    out
}

/// Checks every ELF file of the archive: for `machine`, its interpreter and every
/// `DT_NEEDED` library present in the archive's library directories. Returns the
/// number of ELF files.
fn assert_self_contained(files: &BTreeMap<String, Node>, arch: &str) -> usize {
    let machine = elf::machine_of_arch(arch).unwrap();
    let dirs = farmgate_initramfs::sysroot_library_dirs(arch);
    let mut count = 0;
    for (path, node) in files {
        let Node::File(data) = node else { continue };
        if !elf::is_elf(data) {
            continue;
        }
        count += 1;
        assert_eq!(
            elf::machine(data).unwrap(),
            machine,
            "/{path} is for {}, not {arch}",
            elf::machine_name(elf::machine(data).unwrap())
        );
        let info = elf::parse(data).unwrap_or_else(|e| panic!("/{path}: {e}"));
        if let Some(interp) = &info.interp {
            assert!(
                matches!(
                    files.get(interp.trim_start_matches('/')),
                    Some(Node::File(_))
                ),
                "interpreter {interp} of /{path} missing"
            );
        }
        for lib in &info.needed {
            assert!(
                dirs.iter().any(|d| matches!(
                    files.get(&format!("{}/{lib}", d.trim_start_matches('/'))),
                    Some(Node::File(_))
                )),
                "{lib} (DT_NEEDED of /{path}) is not in the image"
            );
        }
    }
    count
}

/// `ldd`'s view of a host program: file names of its libraries and interpreter.
fn ldd_names(program: &Path) -> BTreeSet<String> {
    farmgate_initramfs::shared_libraries(program)
        .unwrap_or_else(|e| panic!("ldd {}: {e}", program.display()))
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

fn host_crun() -> &'static Path {
    let crun = Path::new("/usr/bin/crun");
    assert!(
        crun.is_file(),
        "install crun (scripts/setup.sh does it in CI)"
    );
    crun
}

#[test]
fn the_elf_reader_agrees_with_ldd_on_host_programs() {
    let crun = host_crun();
    let exe = std::env::current_exe().unwrap();
    for program in [crun, exe.as_path()] {
        let data = std::fs::read(program).unwrap();
        let info = elf::parse(&data).unwrap();
        assert_eq!(info.machine, host_machine(), "{}", program.display());
        let ldd = ldd_names(program);
        // Direct DT_NEEDED entries are among what ldd lists.
        assert!(!info.needed.is_empty(), "{}", program.display());
        for n in &info.needed {
            assert!(
                ldd.contains(n),
                "{n} of {} not in ldd's {ldd:?}",
                program.display()
            );
        }
        let interp = info.interp.expect("a dynamic program has PT_INTERP");
        let interp_name = Path::new(&interp).file_name().unwrap().to_string_lossy();
        assert!(ldd.contains(interp_name.as_ref()), "{interp} vs {ldd:?}");
        // The whole closure, found in "/" as a sysroot, is what ldd finds.
        let deps = sysroot_dependencies(Path::new("/"), program, HOST_ARCH).unwrap();
        let ours: BTreeSet<String> = deps
            .iter()
            .map(|(image, _)| image.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(ours, ldd, "{}", program.display());
    }
    // crun's libraries as readelf lists them (when binutils is installed).
    if let Ok(out) = Command::new("readelf")
        .args(["-d", "/usr/bin/crun"])
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        let readelf: Vec<String> = text
            .lines()
            .filter(|l| l.contains("(NEEDED)"))
            .filter_map(|l| Some(l.split_once('[')?.1.trim_end_matches(']').to_string()))
            .collect();
        let ours = elf::parse(&std::fs::read(crun).unwrap()).unwrap().needed;
        assert_eq!(ours, readelf);
    }
}

#[test]
fn static_programs_modules_and_scripts() {
    let bb = std::fs::read("/bin/busybox").expect("install busybox-static");
    let info = elf::parse(&bb).unwrap();
    assert_eq!(info.interp, None);
    assert!(info.needed.is_empty(), "{:?}", info.needed);
    assert_eq!(info.machine, host_machine());
    // A kernel module (ET_REL, no program headers) of the host kernel, if uncompressed.
    let module = std::fs::read_dir("/lib/modules")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("kernel/drivers/net/virtio_net.ko"))
        .find(|p| p.is_file());
    if let Some(m) = module {
        let info = elf::parse(&std::fs::read(&m).unwrap()).unwrap();
        assert_eq!((info.elf_type, info.machine), (1, host_machine()));
        assert!(info.interp.is_none() && info.needed.is_empty());
    }
    let e = elf::parse(b"#!/bin/sh\necho hi\n").unwrap_err();
    assert!(e.to_string().contains("not an ELF"), "{e}");
}

#[test]
fn truncated_and_corrupted_real_binaries_never_panic() {
    let crun = std::fs::read(host_crun()).unwrap();
    let full = elf::parse(&crun).unwrap();
    // Every prefix up to 4 KiB, then a stride through the file.
    let mut lens: Vec<usize> = (0..4096.min(crun.len())).collect();
    lens.extend((4096..crun.len()).step_by(4093));
    let mut same = 0;
    for len in lens {
        match elf::parse(&crun[..len]) {
            Ok(info) => {
                // A prefix that still parses holds everything the reader looks at.
                assert_eq!(info, full, "prefix of {len} bytes");
                same += 1;
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
    assert!(elf::parse(&crun[..63]).is_err());
    eprintln!("{same} prefixes held all of crun's dynamic information");
    // Header bytes set to extreme values, one at a time.
    for i in 0..64 {
        for v in [0u8, 1, 0x7f, 0xff] {
            let mut g = crun[..4096.min(crun.len())].to_vec();
            g[i] = v;
            let _ = elf::parse(&g);
            let _ = elf::machine(&g);
        }
    }
}

#[test]
fn a_foreign_binary_is_refused_naming_it() {
    let crun = host_crun();
    let other = if HOST_ARCH == "aarch64" {
        "x86_64"
    } else {
        "aarch64"
    };
    let data = std::fs::read(crun).unwrap();
    let e = farmgate_initramfs::check_machine(crun, &data, other).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("/usr/bin/crun"), "{msg}");
    assert!(msg.contains(HOST_ARCH) && msg.contains(other), "{msg}");
    let e = sysroot_dependencies(Path::new("/"), crun, other).unwrap_err();
    assert!(e.to_string().contains("/usr/bin/crun"), "{e}");
}

/// A sysroot made of copies of the host's files, laid out like an extracted Debian
/// system with symbolic links of every kind: relative, absolute (to be taken inside
/// the sysroot), and through a directory link (`lib` → `usr/lib`).
struct HostSysroot {
    dir: tempfile::TempDir,
    kernel_version: String,
}

fn copy_into(root: &Path, image_path: &str, host: &Path) {
    let dst = root.join(image_path.trim_start_matches('/'));
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    std::fs::copy(host, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", host.display()));
}

fn host_sysroot() -> HostSysroot {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let t = format!("{HOST_ARCH}-linux-gnu");
    let (kernel, version) = farmgate_initramfs::find_kernel(Path::new("/boot"))
        .expect("a kernel in /boot (linux-image-amd64; scripts/setup.sh)");
    std::fs::create_dir_all(root.join("boot")).unwrap();
    std::os::unix::fs::symlink(
        &kernel,
        root.join("boot").join(format!("vmlinuz-{version}")),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("usr/lib/modules")).unwrap();
    std::os::unix::fs::symlink(
        Path::new("/lib/modules").join(&version),
        root.join("usr/lib/modules").join(&version),
    )
    .unwrap();
    // Merged /usr: /lib is a relative link to usr/lib.
    std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
    copy_into(root, "/usr/bin/busybox", Path::new("/bin/busybox"));
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::os::unix::fs::symlink("/usr/bin/busybox", root.join("bin/busybox")).unwrap();
    copy_into(root, "/usr/bin/crun", host_crun());
    for lib in farmgate_initramfs::shared_libraries(host_crun()).unwrap() {
        let name = lib.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("ld-linux") {
            // The interpreter stays where glibc puts it; /lib64/… (x86_64) is an
            // absolute link to it, which must be taken inside the sysroot.
            copy_into(root, &format!("/usr/lib/{t}/{name}"), &lib);
            if lib.starts_with("/lib64") {
                std::fs::create_dir_all(root.join("lib64")).unwrap();
                std::os::unix::fs::symlink(
                    format!("/lib/{t}/{name}"),
                    root.join("lib64").join(&name),
                )
                .unwrap();
            }
        } else {
            // Versioned file plus a relative soname link, as Debian ships them.
            copy_into(root, &format!("/usr/lib/{t}/{name}.0.0"), &lib);
            std::os::unix::fs::symlink(
                format!("{name}.0.0"),
                root.join(format!("usr/lib/{t}/{name}")),
            )
            .unwrap();
        }
    }
    HostSysroot {
        dir,
        kernel_version: version,
    }
}

#[test]
fn symbolic_links_are_resolved_inside_the_sysroot() {
    let s = host_sysroot();
    let root = s.dir.path();
    let bb = resolve_in_sysroot(root, Path::new("/bin/busybox")).unwrap();
    assert_eq!(bb, root.join("usr/bin/busybox"));
    let e = resolve_in_sysroot(root, Path::new("/usr/bin/nothing")).unwrap_err();
    assert!(e.to_string().contains("/usr/bin/nothing"), "{e}");
    // `..` cannot leave the sysroot.
    let up = resolve_in_sysroot(root, Path::new("/../../../bin/busybox")).unwrap();
    assert_eq!(up, root.join("usr/bin/busybox"));
    // A link loop is an error, not a hang.
    std::os::unix::fs::symlink("/loop-b", root.join("loop-a")).unwrap();
    std::os::unix::fs::symlink("/loop-a", root.join("loop-b")).unwrap();
    let e = resolve_in_sysroot(root, Path::new("/loop-a")).unwrap_err();
    assert!(e.to_string().contains("symbolic links"), "{e}");
    // A missing library is named with the one that needs it.
    let t = format!("{HOST_ARCH}-linux-gnu");
    let libc = root.join(format!("usr/lib/{t}/libc.so.6"));
    std::fs::remove_file(&libc).unwrap();
    let e = sysroot_dependencies(root, &root.join("usr/bin/crun"), HOST_ARCH).unwrap_err();
    assert!(e.to_string().contains("libc.so.6"), "{e}");
}

#[test]
fn an_image_builds_from_a_sysroot_without_ldd() {
    let s = host_sysroot();
    let out = tempfile::tempdir().unwrap();
    let mut opts = BuildOptions::new(out.path());
    opts.sysroot = Some(s.dir.path().to_path_buf());
    opts.arch = HOST_ARCH.to_string();
    opts.extra_binaries = vec![PathBuf::from("/usr/bin/crun")];
    let summary = build(&opts).unwrap();
    assert_eq!(summary.kernel_version, s.kernel_version);
    let files = read_initramfs(&summary.initramfs);
    let n = assert_self_contained(&files, HOST_ARCH);
    assert!(n >= 3, "{n} ELF files");
    assert!(matches!(files.get("usr/bin/crun"), Some(Node::File(_))));
    assert!(matches!(files.get("bin/busybox"), Some(Node::File(_))));
    let crun_libs = elf::parse(&std::fs::read(host_crun()).unwrap())
        .unwrap()
        .needed;
    for lib in crun_libs {
        let t = format!("{HOST_ARCH}-linux-gnu");
        // Found through the /lib → usr/lib link, stored under the first search directory.
        assert!(
            files.contains_key(&format!("lib/{t}/{lib}")),
            "{lib}: {:?}",
            files.keys()
        );
    }
    // Asking for the wrong architecture fails naming the file.
    let mut wrong = opts.clone();
    wrong.arch = if HOST_ARCH == "aarch64" {
        "x86_64"
    } else {
        "aarch64"
    }
    .into();
    let e = build(&wrong).unwrap_err().to_string();
    assert!(
        e.contains("busybox") && e.contains("mixing architectures"),
        "{e}"
    );
    // A program missing from the sysroot is named.
    let mut missing = opts.clone();
    missing.extra_binaries = vec![PathBuf::from("/usr/bin/no-such-program")];
    let e = build(&missing).unwrap_err().to_string();
    assert!(e.contains("/usr/bin/no-such-program"), "{e}");
}

/// The arm64 kernel of the sysroot is an arm64 `Image` (magic `ARM\x64` at 0x38),
/// possibly gzip-compressed. Debian 12's `vmlinuz-*-arm64` is the uncompressed Image
/// with its EFI stub (`MZ` at 0).
fn assert_arm64_kernel(data: &[u8]) -> &'static str {
    let (image, how) = if data.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .expect("gunzip vmlinuz");
        (out, "gzip-compressed Image")
    } else {
        assert!(
            data.get(4..8) != Some(b"zimg".as_slice()),
            "EFI zboot kernel: not expected from Debian 12"
        );
        (data.to_vec(), "uncompressed Image")
    };
    assert_eq!(
        image.get(0x38..0x3c),
        Some(b"ARM\x64".as_slice()),
        "arm64 Image magic"
    );
    if image.starts_with(b"MZ") {
        return if how.starts_with("gzip") {
            "gzip-compressed Image (EFI stub)"
        } else {
            "uncompressed Image with EFI stub"
        };
    }
    how
}

/// Runs `program` under qemu-aarch64 with `root` as its root for libraries; bounded.
fn qemu_aarch64(root: &Path, args: &[&str]) -> (bool, String) {
    let mut child = Command::new("qemu-aarch64")
        .arg("-L")
        .arg(root)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-aarch64 (Debian qemu-user)");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return (status.success(), text);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("qemu-aarch64 {args:?} did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_arm64_image_from_the_sysroot() {
    let Some(sysroot) = std::env::var_os("FARMGATE_ARM64_SYSROOT").map(PathBuf::from) else {
        eprintln!("skipped: set FARMGATE_ARM64_SYSROOT (scripts/arm64-sysroot.sh)");
        return;
    };
    let agent = std::env::var_os("FARMGATE_ARM64_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/aarch64-unknown-linux-gnu/agent/farm-agent")
        });
    let agent = std::fs::canonicalize(&agent).unwrap_or_else(|e| {
        panic!(
            "cross-built agent {}: {e}: build it with CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc cargo build --profile agent --target aarch64-unknown-linux-gnu -p farmgate-agent, or set FARMGATE_ARM64_AGENT",
            agent.display()
        )
    });
    let out = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_farmgate-mkinitramfs"))
        .arg("--out")
        .arg(out.path())
        .args(["--arch", "aarch64", "--sysroot"])
        .arg(&sysroot)
        .arg("--init")
        .arg(&agent)
        .args(["--binary", "/usr/bin/crun"])
        .args(["--binary", "/sbin/mkfs.ext4", "--binary", "/sbin/sfdisk"])
        .args(["--binary", "/usr/bin/partx", "--binary", "/sbin/mkswap"])
        .args(["--binary", "/sbin/swapon"])
        .args([
            "--module",
            "virtio_blk",
            "--module",
            "ext4",
            "--module",
            "nvme",
        ])
        .output()
        .expect("running farmgate-mkinitramfs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "farmgate-mkinitramfs failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{stdout}(built in {:?})", started.elapsed());

    let initramfs = out.path().join("initramfs.cpio.gz");
    let files = read_initramfs(&initramfs);
    let n = assert_self_contained(&files, "aarch64");
    eprintln!(
        "arm64 initramfs: {} bytes compressed, {} entries, {n} ELF files, all EM_AARCH64 ({EM_AARCH64})",
        std::fs::metadata(&initramfs).unwrap().len(),
        files.len()
    );
    // /init is the agent, stored at its own path.
    let agent_str = agent.to_string_lossy().into_owned();
    assert_eq!(files.get("init"), Some(&Node::Symlink(agent_str.clone())));
    assert!(matches!(
        files.get(agent_str.trim_start_matches('/')),
        Some(Node::File(_))
    ));
    // crun and its libraries.
    let Some(Node::File(crun)) = files.get("usr/bin/crun") else {
        panic!("no /usr/bin/crun in the image");
    };
    let crun_info = elf::parse(crun).unwrap();
    assert_eq!(crun_info.machine, EM_AARCH64);
    assert_eq!(
        crun_info.interp.as_deref(),
        Some("/lib/ld-linux-aarch64.so.1")
    );
    for lib in [
        "libseccomp.so.2",
        "libyajl.so.2",
        "libcap.so.2",
        "libsystemd.so.0",
        "libc.so.6",
    ] {
        assert!(
            ["lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu"]
                .iter()
                .any(|d| files.contains_key(&format!("{d}/{lib}"))),
            "{lib} missing"
        );
    }
    // Modules of the arm64 kernel, with their dependencies.
    let modules = match files.get("etc/farmgate-modules") {
        Some(Node::File(d)) => String::from_utf8_lossy(d).into_owned(),
        other => panic!("no /etc/farmgate-modules: {other:?}"),
    };
    assert!(
        modules.contains("-arm64/kernel/drivers/net/virtio_net.ko"),
        "{modules}"
    );
    assert!(modules.contains("/jbd2.ko"), "ext4's dependency: {modules}");
    // The kernel.
    let kernel = std::fs::read(out.path().join("vmlinuz")).unwrap();
    eprintln!(
        "arm64 kernel: {} bytes, {}",
        kernel.len(),
        assert_arm64_kernel(&kernel)
    );

    // The image's own files run: unpack it and run its programs under
    // qemu-user, with the image as their only library root.
    let root = tempfile::tempdir().unwrap();
    for (path, node) in &files {
        let p = root.path().join(path);
        match node {
            Node::Dir => std::fs::create_dir_all(&p).unwrap(),
            Node::File(data) => {
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, data).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            Node::Symlink(_) | Node::Other => {}
        }
    }
    // crun re-executes itself through /proc/self/exe, which under qemu-user is qemu:
    // ask the image's own dynamic loader to load crun with the image's libraries.
    let (ok, text) = qemu_aarch64(
        root.path(),
        &[
            root.path()
                .join("lib/ld-linux-aarch64.so.1")
                .to_str()
                .unwrap(),
            "--list",
            root.path().join("usr/bin/crun").to_str().unwrap(),
        ],
    );
    assert!(
        ok && !text.contains("not found") && text.contains("libseccomp.so.2 => "),
        "ld.so --list crun: {text}"
    );
    let (ok, text) = qemu_aarch64(
        root.path(),
        &[root.path().join("sbin/mkfs.ext4").to_str().unwrap(), "-V"],
    );
    assert!(ok && text.contains("mke2fs"), "{text}");
    let agent_in_image = root.path().join(agent_str.trim_start_matches('/'));
    let (ok, text) = qemu_aarch64(
        root.path(),
        &[
            agent_in_image.to_str().unwrap(),
            "--cmdline",
            "farmgate.agent=check",
            "--no-poweroff",
        ],
    );
    assert!(ok && text.contains("farm-agent: check passed"), "{text}");
}
