//! Builds the initramfs from the host's kernel and busybox with the real
//! `farmgate-mkinitramfs` binary and boots it in QEMU (TCG).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// QEMU TCG boots are CPU bound (CI has 2 cores): run them one at a time so each
/// gets the CPU and the per-boot timeout measures only its own boot.
static BOOT_LOCK: Mutex<()> = Mutex::new(());

/// Kills and reaps QEMU when dropped (also on test failure).
struct QemuGuard {
    child: Child,
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mkinitramfs(out: &Path, extra: &[&str]) -> String {
    assert!(
        std::fs::read_dir("/boot")
            .map(|rd| rd
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-")))
            .unwrap_or(false),
        "no kernel in /boot: install linux-image-amd64 (scripts/setup.sh does it in CI)"
    );
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_farmgate-mkinitramfs"))
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("running farmgate-mkinitramfs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "farmgate-mkinitramfs failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{stdout}(built in {:?})", started.elapsed());
    assert!(out.join("vmlinuz").is_file());
    assert!(out.join("initramfs.cpio.gz").is_file());
    stdout
}

/// Boots the kernel + initramfs in `dir` and returns the serial output once QEMU has
/// exited (or the timeout has passed).
fn boot(dir: &Path, extra_qemu: &[&str], append: &str) -> String {
    boot_interactive(dir, extra_qemu, append, None)
}

/// Like [`boot`]; when `interact` is `(prompt, input)`, writes `input` to the serial
/// console once the output contains `prompt`.
fn boot_interactive(
    dir: &Path,
    extra_qemu: &[&str],
    append: &str,
    interact: Option<(&str, &str)>,
) -> String {
    let _serial = BOOT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "tcg",
        "-m",
        "512",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
    ])
    .args(extra_qemu)
    .arg("-kernel")
    .arg(dir.join("vmlinuz"))
    .arg("-initrd")
    .arg(dir.join("initramfs.cpio.gz"))
    .arg("-append")
    .arg(append)
    .stdin(if interact.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut guard = QemuGuard {
        child: cmd
            .spawn()
            .expect("starting qemu-system-x86_64 (install qemu-system-x86)"),
    };
    let out = Arc::new(Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    for stream in [
        guard
            .child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        guard
            .child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let out = Arc::clone(&out);
        readers.push(std::thread::spawn(move || {
            let mut stream = stream;
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock()
                    .expect("output lock")
                    .extend_from_slice(&buf[..n]);
            }
        }));
    }
    let started = Instant::now();
    let mut stdin = guard.child.stdin.take();
    let status = loop {
        if let (Some((prompt, input)), Some(w)) = (interact, stdin.as_mut()) {
            let seen = String::from_utf8_lossy(&out.lock().expect("output lock")).contains(prompt);
            if seen {
                w.write_all(input.as_bytes())
                    .expect("writing to the serial console");
                w.flush().expect("flushing the serial console");
                stdin = None;
            }
        }
        if let Some(st) = guard.child.try_wait().expect("waiting for qemu") {
            break Some(st);
        }
        if started.elapsed() > BOOT_TIMEOUT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(guard); // kills QEMU if still running, closing the pipes
    for r in readers {
        let _ = r.join();
    }
    let text = String::from_utf8_lossy(&out.lock().expect("output lock")).into_owned();
    eprintln!(
        "--- serial output ({:?}, exit {status:?}) ---\n{text}\n--- end ---",
        started.elapsed()
    );
    assert!(
        status.is_some(),
        "QEMU did not exit within {BOOT_TIMEOUT:?}; output:\n{text}"
    );
    text
}

#[test]
fn boots_and_runs_the_job_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let summary = mkinitramfs(dir.path(), &[]);
    assert!(summary.contains("modules"), "{summary}");
    let out = boot(
        dir.path(),
        &[],
        "console=ttyS0 panic=-1 quiet farmgate.run=\"echo MARKER-$((6*7))\"",
    );
    assert!(out.contains("farmgate-initramfs: up (kernel "), "{out}");
    assert!(out.contains("MARKER-42"), "{out}");
    assert!(
        out.contains("farmgate-initramfs: run exit status 0"),
        "{out}"
    );
    assert!(out.contains("reboot: Power down"), "{out}");
}

#[test]
fn brings_up_virtio_net_with_dhcp() {
    let dir = tempfile::tempdir().expect("tempdir");
    mkinitramfs(dir.path(), &[]);
    let out = boot(
        dir.path(),
        &["-nic", "user,model=virtio-net-pci"],
        "console=ttyS0 panic=-1 quiet farmgate.net farmgate.run=\"ip -4 addr show; exit 3\"",
    );
    assert!(out.contains("inet 10.0.2.15/24"), "{out}");
    assert!(
        out.contains("farmgate-initramfs: run exit status 3"),
        "{out}"
    );
    assert!(out.contains("reboot: Power down"), "{out}");
}

/// Yields the request head and body the test HTTP server received, if any.
type ServerThread = std::thread::JoinHandle<Option<(String, String)>>;

/// A one-shot HTTP server on the host loopback (reachable from the QEMU user-mode
/// network as 10.0.2.2). Returns the port and a thread yielding the request; the
/// thread stops waiting for a connection once the flag is set (or after 10 minutes).
fn http_server(status: &'static str) -> (u16, ServerThread, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding the test HTTP server");
    let port = listener.local_addr().expect("local addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let handle = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(600);
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if stop2.load(Ordering::SeqCst) || Instant::now() > deadline {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(_) => return None,
            }
        };
        stream.set_nonblocking(false).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .ok()?;
        let mut reader = BufReader::new(stream.try_clone().ok()?);
        let mut head = String::new();
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().ok()?;
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body).ok()?;
        let reply = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        );
        let mut stream = stream;
        stream.write_all(reply.as_bytes()).ok()?;
        Some((head, String::from_utf8_lossy(&body).into_owned()))
    });
    (port, handle, stop)
}

#[test]
fn registers_with_mars() {
    let dir = tempfile::tempdir().expect("tempdir");
    mkinitramfs(dir.path(), &[]);
    let (port, server, stop) = http_server("200 OK");
    let out = boot(
        dir.path(),
        &["-smp", "2", "-nic", "user,model=virtio-net-pci"],
        &format!("console=ttyS0 panic=-1 quiet farmgate.register=http://10.0.2.2:{port}/"),
    );
    stop.store(true, Ordering::SeqCst);
    assert!(out.contains("SALAD.machine_id=52:54:00:12:34:56"), "{out}");
    assert!(out.contains("MaRS: Registration complete"), "{out}");
    assert!(out.contains("reboot: Power down"), "{out}");
    let (head, body) = server
        .join()
        .expect("server thread")
        .expect("the DUT never POSTed its registration");
    assert!(head.starts_with("POST /api/v1/dut/ HTTP/1.1\r\n"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let json: serde_json::Value = serde_json::from_str(&body).expect("registration body is JSON");
    assert_eq!(
        json,
        serde_json::json!({
            "id": "52:54:00:12:34:56",
            "base_name": "qemu",
            "ip_address": "10.0.2.15",
            "tags": ["virtio:family:VIRTIO", "cpu:cores:2"],
            "local_tty_device": "ttyS0",
        })
    );
}

#[test]
fn registration_failure_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    mkinitramfs(dir.path(), &[]);
    let (port, server, stop) = http_server("500 Internal Server Error");
    let out = boot(
        dir.path(),
        &["-nic", "user,model=e1000"],
        &format!(
            "console=ttyS0 panic=-1 quiet farmgate.register=http://10.0.2.2:{port} farmgate.run=\"echo after-register\""
        ),
    );
    stop.store(true, Ordering::SeqCst);
    assert!(server.join().expect("server thread").is_some(), "{out}");
    assert!(out.contains("SALAD.machine_id=52:54:00:12:34:56"), "{out}");
    assert!(out.contains("MaRS: Registration failed: "), "{out}");
    assert!(out.contains("500"), "{out}");
    assert!(out.contains("after-register"), "{out}");
    assert!(out.contains("reboot: Power down"), "{out}");
}

#[test]
fn keep_gives_a_shell_on_the_console() {
    let dir = tempfile::tempdir().expect("tempdir");
    mkinitramfs(dir.path(), &[]);
    let out = boot_interactive(
        dir.path(),
        &[],
        "console=ttyS0 panic=-1 quiet farmgate.keep farmgate.run=\"echo ran\"",
        Some((
            "not powering off",
            "sleep 1; echo KEPT-$((20+3)); poweroff -f\n",
        )),
    );
    assert!(
        out.contains("farmgate-initramfs: run exit status 0"),
        "{out}"
    );
    assert!(out.contains("KEPT-23"), "{out}");
    assert!(out.contains("reboot: Power down"), "{out}");
}

#[test]
fn without_parameters_prints_help_and_powers_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    mkinitramfs(dir.path(), &[]);
    let out = boot(dir.path(), &[], "console=ttyS0 panic=-1 quiet");
    assert!(out.contains("no farmgate.* parameter"), "{out}");
    assert!(out.contains("reboot: Power down"), "{out}");
}

#[test]
fn missing_module_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = Command::new(env!("CARGO_BIN_EXE_farmgate-mkinitramfs"))
        .arg("--out")
        .arg(dir.path())
        .args(["--module", "no-such-module-xyz"])
        .output()
        .expect("running farmgate-mkinitramfs");
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("no_such_module_xyz"), "{err}");
    assert!(!dir.path().join("initramfs.cpio.gz").exists());
}

#[test]
fn an_extra_dynamic_program_runs_with_its_libraries() {
    // crun (Debian's, dynamically linked): what the DUT agent runs containers with.
    let crun = Path::new("/usr/bin/crun");
    assert!(
        crun.is_file(),
        "install crun (scripts/setup.sh does it in CI)"
    );
    let libs = farmgate_initramfs::shared_libraries(crun).expect("ldd crun");
    assert!(
        libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
        "{libs:?}"
    );
    assert!(
        libs.iter()
            .any(|l| l.to_string_lossy().contains("ld-linux")),
        "the program interpreter is included: {libs:?}"
    );
    let static_busybox = farmgate_initramfs::shared_libraries(Path::new("/bin/busybox"))
        .expect("ldd on a static program");
    assert!(static_busybox.is_empty(), "{static_busybox:?}");
    let dir = tempfile::tempdir().expect("tempdir");
    let summary = mkinitramfs(dir.path(), &["--binary", "/usr/bin/crun"]);
    assert!(summary.contains("extra files"), "{summary}");
    let out = boot(
        dir.path(),
        &[],
        "console=ttyS0 panic=-1 quiet farmgate.run=\"/usr/bin/crun --version\"",
    );
    assert!(out.contains("crun version"), "{out}");
    assert!(
        out.contains("farmgate-initramfs: run exit status 0"),
        "{out}"
    );
    // A missing program is a clear error naming it.
    let out = Command::new(env!("CARGO_BIN_EXE_farmgate-mkinitramfs"))
        .arg("--out")
        .arg(dir.path())
        .args(["--binary", "/usr/bin/no-such-program"])
        .output()
        .expect("running farmgate-mkinitramfs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/usr/bin/no-such-program"), "{err}");
}
