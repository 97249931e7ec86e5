//! boot2container's cache (`b2c.cache_device`, `b2c.swap`) on loop devices backed by sparse
//! files: `auto` partitions and formats a blank disk then finds it again, `reset` wipes it,
//! disks with data are left alone, an explicit device and a `b2c.filesystem` are mounted,
//! a swap file is made. Needs root, loop devices, sfdisk, mkfs.ext4, mkswap, swapon, blkid
//! and partx. Discovery is pinned to each test's own loop devices (`only_devices`), so the
//! host's disks are never looked at. Every loop device, mount and swap file is undone by a
//! guard, even when a test fails.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use farmgate_agent::cachedev::{
    CACHE_LABEL, CacheEnv, CacheError, CacheOutcome, CacheTools, HEAD_LEN, Signature, SwapOutcome,
    discover, identify, prepare,
};
use farmgate_agent::cmdline::{CacheDevice, Filesystem};

const TIMEOUT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

/// Runs `program args`, waiting at most [`TIMEOUT`]; its stdout, or what went wrong.
fn sh(program: &str, args: &[&str]) -> Result<String, String> {
    let what = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what}: still running after {TIMEOUT:?}"));
            }
            Err(e) => return Err(format!("{what}: wait: {e}")),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{what}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{what}: {}: {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn must(program: &str, args: &[&str]) -> String {
    sh(program, args).unwrap_or_else(|e| panic!("{e}"))
}

/// `blkid -p` (no cache) value of `tag` on `dev`.
fn blkid(dev: &str, tag: &str) -> String {
    sh("blkid", &["-p", "-o", "value", "-s", tag, dev])
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The image's SHA-256 (`sha256sum`: hashing 64 MiB in an unoptimised test build is slow).
fn sha256_file(path: &Path) -> String {
    let out = must("sha256sum", &[&path.to_string_lossy()]);
    let sum = out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(sum.len(), 64, "sha256sum printed {out:?}");
    sum
}

fn is_mounted(mp: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mp = mp.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(mp.as_ref()))
}

fn mount_options(mp: &Path) -> String {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mp = mp.to_string_lossy();
    info.lines()
        .find(|l| l.split(' ').nth(4) == Some(mp.as_ref()))
        .and_then(|l| l.split(' ').nth(5))
        .unwrap_or_default()
        .to_string()
}

fn unmount(mp: &Path) {
    nix::mount::umount(mp).unwrap_or_else(|e| panic!("umount {}: {e}", mp.display()));
}

/// Temp files, loop devices, mounts and swap files of one test, undone on drop.
struct Scratch {
    dir: tempfile::TempDir,
    loops: Vec<String>,
    mounts: Vec<PathBuf>,
    swaps: Vec<PathBuf>,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().expect("temp dir"),
            loops: Vec::new(),
            mounts: Vec::new(),
            swaps: Vec::new(),
        }
    }

    /// A sparse (all zero) disk image.
    fn image(&self, name: &str, size: u64) -> PathBuf {
        let path = self.dir.path().join(name);
        let f = fs::File::create(&path).expect("create image");
        f.set_len(size).expect("size image");
        path
    }

    /// A loop device over `image` (`/dev/loopN`).
    fn attach(&mut self, image: &Path) -> String {
        let img = image.to_string_lossy();
        let dev = sh("losetup", &["--find", "--show", "--partscan", &img])
            .unwrap_or_else(|e| panic!("loop devices do not work here (needs root): {e}"))
            .trim()
            .to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        self.loops.push(dev.clone());
        dev
    }

    /// `<dev>p1`, asking the kernel for it with partx when it did not read the table.
    fn first_partition(&self, dev: &str) -> String {
        let part = format!("{dev}p1");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut asked = false;
        while !Path::new(&part).exists() {
            assert!(Instant::now() < deadline, "{part} never appeared");
            if !asked {
                asked = true;
                let _ = sh("partx", &["--add", dev]);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        part
    }

    /// A mount point path (not created), unmounted on drop.
    fn mount_point(&mut self, name: &str) -> PathBuf {
        let mp = self.dir.path().join("mnt").join(name);
        self.mounts.push(mp.clone());
        mp
    }

    fn env(&mut self, mp: &Path, only: &[&str]) -> CacheEnv {
        self.swaps.push(mp.join("swapfile"));
        CacheEnv {
            mount_point: mp.to_path_buf(),
            tools: CacheTools::find(),
            only_devices: Some(only.iter().map(|s| s.to_string()).collect()),
            ..CacheEnv::default()
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for s in &self.swaps {
            if s.exists() {
                let _ = sh("swapoff", &[&s.to_string_lossy()]);
            }
        }
        for mp in self.mounts.iter().rev() {
            while is_mounted(mp) {
                if nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH).is_err() {
                    break;
                }
            }
        }
        for dev in self.loops.iter().rev() {
            let _ = sh("losetup", &["--detach", dev]);
        }
    }
}

fn mounted(out: &CacheOutcome) -> (&Path, Option<&str>, bool, bool) {
    match out {
        CacheOutcome::Mounted {
            device,
            label,
            formatted,
            created_partition,
            ..
        } => (device, label.as_deref(), *formatted, *created_partition),
        other => panic!("not mounted: {other:?}"),
    }
}

#[test]
fn auto_partitions_a_blank_disk_then_finds_it_again_without_formatting() {
    let mut s = Scratch::new();
    let img = s.image("blank.img", 64 * MIB);
    let dev = s.attach(&img);
    let mp = s.mount_point("storage");
    assert!(!mp.exists());
    let env = s.env(&mp, &[&dev]);

    let out = prepare(&CacheDevice::Auto, &[], None, &env).expect("auto on a blank disk");
    let part = format!("{dev}p1");
    let (device, label, formatted, created) = mounted(&out);
    assert_eq!(device, Path::new(&part));
    assert_eq!(label, Some(CACHE_LABEL));
    assert!(formatted && created, "{out:?}");
    assert!(is_mounted(&mp), "{} not mounted", mp.display());
    assert_eq!(blkid(&dev, "PTTYPE"), "gpt");
    assert_eq!(blkid(&part, "TYPE"), "ext4");
    assert_eq!(blkid(&part, "LABEL"), CACHE_LABEL);
    assert!(
        out.describe().starts_with(&format!(
            "farm-agent: cache: {part} (B2C_CACHE) mounted at {}",
            mp.display()
        )),
        "{}",
        out.describe()
    );
    assert_eq!(out.swap(), &SwapOutcome::NotRequested);

    fs::write(mp.join("marker"), b"kept across boots").expect("write in the cache");
    unmount(&mp);

    // The next boot: the same partition, not formatted.
    let out = prepare(&CacheDevice::Auto, &[], None, &env).expect("auto again");
    let (device, _, formatted, created) = mounted(&out);
    assert_eq!(device, Path::new(&part));
    assert!(!formatted && !created, "{out:?}");
    assert_eq!(
        out.describe(),
        format!(
            "farm-agent: cache: {part} (B2C_CACHE) mounted at {}",
            mp.display()
        )
    );
    assert_eq!(
        fs::read(mp.join("marker")).expect("marker survives"),
        b"kept across boots"
    );
}

#[test]
fn reset_formats_the_cache_again() {
    let mut s = Scratch::new();
    let img = s.image("blank.img", 64 * MIB);
    let dev = s.attach(&img);
    let mp = s.mount_point("storage");
    let env = s.env(&mp, &[&dev]);

    prepare(&CacheDevice::Auto, &[], None, &env).expect("auto");
    fs::write(mp.join("corrupt"), b"x").expect("write in the cache");
    unmount(&mp);

    let out = prepare(&CacheDevice::Reset, &[], None, &env).expect("reset");
    let (device, label, formatted, created) = mounted(&out);
    assert_eq!(device, Path::new(&format!("{dev}p1")));
    assert_eq!(label, Some(CACHE_LABEL));
    assert!(formatted && !created, "{out:?}");
    assert!(!mp.join("corrupt").exists(), "reset kept the old files");
    assert_eq!(blkid(&format!("{dev}p1"), "LABEL"), CACHE_LABEL);
    assert!(
        out.describe().contains("formatted ext4 now"),
        "{}",
        out.describe()
    );
}

#[test]
fn auto_leaves_disks_with_data_alone() {
    let mut s = Scratch::new();
    // A: a GPT with an ext4 partition that is not ours, holding a file.
    let img_a = s.image("a.img", 64 * MIB);
    let a_str = img_a.to_string_lossy().into_owned();
    let script = s.dir.path().join("gpt.sfdisk");
    fs::write(&script, "label: gpt\n,,L\n").expect("script");
    must(
        "sh",
        &[
            "-c",
            &format!("sfdisk --quiet '{a_str}' < '{}'", script.display()),
        ],
    );
    let dev_a = s.attach(&img_a);
    let part_a = s.first_partition(&dev_a);
    must("mkfs.ext4", &["-q", "-F", "-L", "OTHER", &part_a]);
    let tmp_mp = s.mount_point("a");
    fs::create_dir_all(&tmp_mp).expect("mkdir");
    must("mount", &[&part_a, &tmp_mp.to_string_lossy()]);
    fs::write(tmp_mp.join("data"), b"someone's data").expect("write");
    unmount(&tmp_mp);
    // B: a whole-disk ext4 labelled otherwise.
    let img_b = s.image("b.img", 64 * MIB);
    must(
        "mkfs.ext4",
        &["-q", "-F", "-L", "OTHER2", &img_b.to_string_lossy()],
    );
    let dev_b = s.attach(&img_b);
    let before = (sha256_file(&img_a), sha256_file(&img_b));

    let disks = discover(&s.env(Path::new("/nonexistent"), &[&dev_a, &dev_b])).expect("discover");
    let names: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
    let a_name = dev_a.trim_start_matches("/dev/");
    let b_name = dev_b.trim_start_matches("/dev/");
    assert_eq!(names, [a_name, b_name]);
    assert_eq!(disks[0].partitions.len(), 1, "{disks:?}");
    assert_eq!(disks[0].size_bytes, 64 * MIB);
    assert!(disks[1].partitions.is_empty());

    let mp = s.mount_point("storage");
    let env = s.env(&mp, &[&dev_a, &dev_b]);
    let out = prepare(&CacheDevice::Auto, &[], Some("16M"), &env).expect("auto");
    let CacheOutcome::NoBlankDisk { reason, swap } = &out else {
        panic!("a disk with data was used: {out:?}");
    };
    assert!(
        reason.contains(&format!("{a_name}: has partitions ({a_name}p1)")),
        "{reason}"
    );
    assert!(
        reason.contains(&format!(
            "{b_name}: has a ext4 file system labelled \"OTHER2\""
        )),
        "{reason}"
    );
    assert!(
        matches!(swap, SwapOutcome::Skipped { size, .. } if size == "16M"),
        "{swap:?}"
    );
    let text = out.describe();
    assert!(
        text.contains("no blank disk") && text.contains("b2c.swap=16M ignored"),
        "{text}"
    );
    assert!(!is_mounted(&mp));
    assert_eq!((sha256_file(&img_a), sha256_file(&img_b)), before);

    // With a blank disk after them, the blank one is taken and A, B are still untouched.
    let img_c = s.image("c.img", 64 * MIB);
    let dev_c = s.attach(&img_c);
    let env = s.env(&mp, &[&dev_a, &dev_b, &dev_c]);
    let out = prepare(&CacheDevice::Auto, &[], None, &env).expect("auto with a blank disk");
    let (device, _, formatted, created) = mounted(&out);
    assert_eq!(device, Path::new(&format!("{dev_c}p1")));
    assert!(formatted && created);
    unmount(&mp);
    assert_eq!((sha256_file(&img_a), sha256_file(&img_b)), before);
}

#[test]
fn explicit_device_is_formatted_once_and_holds_the_swap_file() {
    let mut s = Scratch::new();
    let img = s.image("disk.img", 64 * MIB);
    let dev = s.attach(&img);
    let mp = s.mount_point("storage");
    // Explicit devices ignore only_devices: pin to nothing.
    let env = s.env(&mp, &[]);
    let path = CacheDevice::Path(dev.clone());

    let out = prepare(&path, &[], Some("16M"), &env).expect("explicit device");
    eprintln!("{}", out.describe());
    let (device, label, formatted, created) = mounted(&out);
    assert_eq!(device, Path::new(&dev));
    assert_eq!(label, Some(CACHE_LABEL));
    assert!(formatted && !created, "{out:?}");
    assert_eq!(blkid(&dev, "TYPE"), "ext4");
    assert_eq!(blkid(&dev, "LABEL"), CACHE_LABEL);

    let swapfile = mp.join("swapfile");
    let meta = fs::metadata(&swapfile).expect("swap file");
    assert_eq!(meta.len(), 16 * MIB);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let mut head = vec![0u8; HEAD_LEN];
    let n = fs::File::open(&swapfile)
        .and_then(|mut f| f.read(&mut head))
        .expect("read swap file");
    assert!(
        identify(&head[..n])
            .iter()
            .any(|s| matches!(s, Signature::Swap { .. })),
        "no swap signature"
    );
    match out.swap() {
        SwapOutcome::Active {
            path,
            bytes,
            reused,
        } => {
            assert_eq!((path, *bytes, *reused), (&swapfile, 16 * MIB, false));
            let swaps = fs::read_to_string("/proc/swaps").expect("/proc/swaps");
            assert!(swaps.contains(&*swapfile.to_string_lossy()), "{swaps}");
        }
        // Sandboxes may forbid swapon; the error must say so.
        SwapOutcome::Failed { error, .. } => {
            assert!(
                error.contains("swapon") && error.contains("enabling the swap file"),
                "{error}"
            );
        }
        other => panic!("swap: {other:?}"),
    }
    assert!(
        out.describe().contains("farm-agent: swap: "),
        "{}",
        out.describe()
    );

    let _ = sh("swapoff", &[&swapfile.to_string_lossy()]);
    unmount(&mp);

    // Next boot: not formatted, the swap file used again.
    let out = prepare(&path, &[], Some("16M"), &env).expect("explicit device again");
    let (_, _, formatted, _) = mounted(&out);
    assert!(!formatted, "{out:?}");
    if let SwapOutcome::Active { reused, .. } = out.swap() {
        assert!(*reused, "{out:?}");
    }
}

#[test]
fn explicit_device_with_a_partition_table_or_missing_is_refused() {
    let mut s = Scratch::new();
    let img = s.image("gpt.img", 64 * MIB);
    let script = s.dir.path().join("gpt.sfdisk");
    fs::write(&script, "label: gpt\n,,L\n").expect("script");
    must(
        "sh",
        &[
            "-c",
            &format!(
                "sfdisk --quiet '{}' < '{}'",
                img.display(),
                script.display()
            ),
        ],
    );
    let dev = s.attach(&img);
    let before = sha256_file(&img);
    let mp = s.mount_point("storage");
    let env = s.env(&mp, &[]);

    let err = prepare(&CacheDevice::Path(dev.clone()), &[], None, &env)
        .expect_err("a partitioned disk must be refused");
    assert!(matches!(err, CacheError::Refused { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&dev) && msg.contains("GPT partition table"),
        "{msg}"
    );
    assert_eq!(sha256_file(&img), before);
    assert!(!is_mounted(&mp));

    let err = prepare(
        &CacheDevice::Path("/dev/farmgate-no-such-disk".into()),
        &[],
        None,
        &env,
    )
    .expect_err("missing device");
    assert!(
        err.to_string().contains("/dev/farmgate-no-such-disk"),
        "{err}"
    );

    let err = prepare(&CacheDevice::Path("nosuchfs".into()), &[], None, &env)
        .expect_err("unknown b2c.filesystem");
    assert!(
        err.to_string().contains("b2c.cache_device=nosuchfs"),
        "{err}"
    );
}

#[test]
fn named_filesystem_is_mounted_as_declared_never_formatted() {
    let mut s = Scratch::new();
    let img = s.image("fs.img", 64 * MIB);
    must(
        "mkfs.ext4",
        &["-q", "-F", "-L", "MINE", &img.to_string_lossy()],
    );
    let dev = s.attach(&img);
    let mp = s.mount_point("storage");
    let env = s.env(&mp, &[]);
    let fs = Filesystem {
        name: "cachefs".into(),
        src: dev.clone(),
        fs_type: Some("ext4".into()),
        opts: vec!["noatime".into()],
        unknown: Vec::new(),
    };

    let out =
        prepare(&CacheDevice::Path("cachefs".into()), &[fs], None, &env).expect("b2c.filesystem");
    let (device, label, formatted, created) = mounted(&out);
    assert_eq!(device, Path::new(&dev));
    assert_eq!(label, Some("MINE"));
    assert!(!formatted && !created);
    assert!(
        mount_options(&mp).split(',').any(|o| o == "noatime"),
        "{}",
        mount_options(&mp)
    );
    assert_eq!(blkid(&dev, "LABEL"), "MINE");
}

#[test]
fn bad_swap_size_fails_before_touching_anything() {
    let mut s = Scratch::new();
    let img = s.image("blank.img", 64 * MIB);
    let dev = s.attach(&img);
    let before = sha256_file(&img);
    let mp = s.mount_point("storage");
    let env = s.env(&mp, &[&dev]);

    let err = prepare(&CacheDevice::Auto, &[], Some("4X"), &env).expect_err("bad size");
    assert!(matches!(err, CacheError::BadSwapSize { .. }), "{err:?}");
    assert!(err.to_string().contains("b2c.swap=4X"), "{err}");
    assert!(!is_mounted(&mp));
    assert_eq!(sha256_file(&img), before);

    // none: no cache, and the swap file is skipped with a reason.
    let out = prepare(&CacheDevice::None, &[], Some("1G"), &env).expect("none");
    assert!(matches!(out, CacheOutcome::None { .. }));
    assert!(
        out.describe()
            .contains("farm-agent: swap: b2c.swap=1G ignored: no cache"),
        "{}",
        out.describe()
    );
}
