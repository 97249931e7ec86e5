//! The `farm-agent` binary in boot2container's pipeline mode on this host: a job's
//! containers pulled from a real registry (Debian's docker-registry on loopback) and run
//! with the real crun, writing into a named volume; the final lines and exit status.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use farmgate_agent::oci;

fn busybox_image() -> Image {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let l = layer(
        &[
            dir("bin", 0o755),
            file("bin/busybox", 0o755, &busybox),
            symlink("bin/sh", "busybox"),
            symlink("bin/echo", "busybox"),
            symlink("bin/cat", "busybox"),
            dir("etc", 0o755),
            file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n"),
            dir("tmp", 0o1777),
        ],
        OCI_TAR_GZ,
    );
    Image::new(
        vec![l],
        serde_json::json!({"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]}),
        oci::default_arch(),
        false,
    )
}

fn agent(cmdline: &str, storage: &Path, crun: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_farm-agent"))
        .args(["--no-poweroff", "--cmdline", cmdline, "--storage"])
        .arg(storage)
        .arg("--crun")
        .arg(crun)
        .output()
        .expect("farm-agent runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// A registry holding `test/box:v1` (busybox), a crun of the test's own, a storage
/// directory; `None` (the test is skipped) when not root, as crun needs.
struct Setup {
    reg: DockerRegistry,
    dir: tempfile::TempDir,
    crun: std::path::PathBuf,
    storage: std::path::PathBuf,
    image: String,
}

async fn setup() -> Option<Setup> {
    if !is_root() {
        eprintln!("skipped: crun needs root (CI runs as root)");
        return None;
    }
    let reg = DockerRegistry::start().await;
    push_image(&reg, "test/box", "v1", &busybox_image()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let crun = crun_wrapper(dir.path());
    let storage = dir.path().join("storage");
    let image = format!("docker://127.0.0.1:{}/test/box:v1", reg.port);
    Some(Setup {
        reg,
        dir,
        crun,
        storage,
        image,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_pulls_runs_and_reports_like_boot2container() {
    let Some(Setup {
        reg,
        dir: _dir,
        crun,
        storage,
        image,
    }) = setup().await
    else {
        return;
    };
    // Two containers share the job volume; the second reads what the first wrote.
    let cmdline = format!(
        "console=ttyS0 b2c.container=\"--tls-verify=false -v job:/job {image} sh -c 'echo from the first > /job/out.txt'\" \
         b2c.container=\"--tls-verify=false -v job:/job {image} sh -c 'cat /job/out.txt; echo status=$B2C_PIPELINE_STATUS'\""
    );
    let (code, out) = agent(&cmdline, &storage, &crun);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("from the first"), "{out}");
    assert!(out.contains("status=0"), "{out}");
    assert!(
        out.contains("Execution is over, pipeline status: 0"),
        "{out}"
    );
    assert!(
        out.contains("It's now safe to turn off your computer"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(storage.join("volumes/job/out.txt")).unwrap_or_default(),
        "from the first\n"
    );
    // A failing container: its exit code is the pipeline's status, and with pipefail
    // the next one does not run; the post container always does.
    let cmdline = format!(
        "b2c.pipefail b2c.container=\"--tls-verify=false {image} sh -c 'exit 7'\" \
         b2c.container=\"--tls-verify=false {image} echo must-not-run\" \
         b2c.post_container=\"--tls-verify=false {image} sh -c 'echo post saw $B2C_PIPELINE_STATUS'\""
    );
    let (code, out) = agent(&cmdline, &storage, &crun);
    assert_eq!(code, 7, "{out}");
    assert!(!out.contains("must-not-run\n"), "{out}");
    assert!(out.contains("post saw 7"), "{out}");
    assert!(
        out.contains("Execution is over, pipeline status: 7"),
        "{out}"
    );
    // An image that does not exist: a clear message, a failed pipeline.
    let cmdline = format!(
        "b2c.container=\"--tls-verify=false docker://127.0.0.1:{}/test/nothing:v1 true\"",
        reg.port
    );
    let (code, out) = agent(&cmdline, &storage, &crun);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("test/nothing"), "{out}");
    assert!(
        out.contains("Execution is over, pipeline status: 1"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_runs_beside_the_pipeline_and_is_stopped_at_its_end() {
    let Some(Setup {
        reg: _reg,
        dir: _dir,
        crun,
        storage,
        image,
    }) = setup().await
    else {
        return;
    };
    // The service counts heartbeats into the shared volume; the pipeline's container
    // waits until it sees some, so it only passes if the service runs beside it.
    let cmdline = format!(
        "b2c.service=\"--tls-verify=false -v job:/job {image} sh -c 'i=0; while true; do i=$((i+1)); echo $i > /job/beat; busybox sleep 0.1; done'\" \
         b2c.container=\"--tls-verify=false -v job:/job {image} sh -c 'n=0; while [ ! -s /job/beat ] && [ $n -lt 300 ]; do busybox sleep 0.1; n=$((n+1)); done; busybox sleep 0.5; echo beats=$(cat /job/beat)'\""
    );
    let (code, out) = agent(&cmdline, &storage, &crun);
    assert_eq!(code, 0, "{out}");
    let beats: u64 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("beats="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no beats line: {out}"));
    assert!(beats >= 2, "{out}");
    assert!(out.contains("farm-agent: starting service"), "{out}");
    assert!(
        out.contains("Execution is over, pipeline status: 0"),
        "{out}"
    );
    // Stopped when the pipeline ended: the count no longer moves.
    let beat = storage.join("volumes/job/beat");
    let first = std::fs::read_to_string(&beat).expect("beat");
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert_eq!(
        std::fs::read_to_string(&beat).expect("beat"),
        first,
        "{out}"
    );
}

#[test]
fn check_mode_and_bad_modes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, out) = agent(
        "farmgate.agent=check",
        dir.path(),
        Path::new("/usr/bin/crun"),
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("farm-agent: check passed") && out.contains("cpu:arch:"),
        "{out}"
    );
    let (code, out) = agent(
        "farmgate.agent=register",
        dir.path(),
        Path::new("/usr/bin/crun"),
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("farmgate.gateway"), "{out}");
    let (code, out) = agent(
        "b2c.container=\"unterminated",
        dir.path(),
        Path::new("/usr/bin/crun"),
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("kernel command line") && out.contains("unterminated"),
        "{out}"
    );
    assert!(
        out.contains("Execution is over, pipeline status: 1"),
        "{out}"
    );
}
