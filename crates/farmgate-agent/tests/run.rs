//! Containers run with the real crun (as root) on a busybox root file system: exit codes,
//! volumes (named, read-only), users, environment, entrypoint/argument rules, working
//! directory, boot2container's pipeline variables with and without pipefail; and the
//! generated `config.json` checked without crun.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{crun_wrapper, is_root};
use farmgate_agent::cmdline::{ContainerSpec, parse_container};
use farmgate_agent::oci::ImageConfig;
use farmgate_agent::run::{
    HostFacts, PipelineResult, RunError, RunRequest, ShutdownMode, final_lines,
    oci_runtime_config_with, run, run_pipeline,
};
use serde_json::{Value, json};

const CRUN: &str = "/usr/bin/crun";
const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "ls", "id", "env", "hostname", "pwd", "kill", "touch", "test", "sleep",
    "grep",
];

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A container name unique to this test process.
fn unique_name(what: &str) -> String {
    format!(
        "fgrun-{}-{}-{what}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// Skips (with the reason printed) unless root with crun and busybox.
fn can_run(test: &str) -> bool {
    if !is_root() {
        println!("SKIP {test}: needs root to run crun containers");
        return false;
    }
    for p in [CRUN, BUSYBOX] {
        if !Path::new(p).exists() {
            println!("SKIP {test}: {p} is not installed");
            return false;
        }
    }
    true
}

/// A test world: busybox rootfs, volume directories, a crun wrapper, bundles.
struct World {
    dir: tempfile::TempDir,
    crun: PathBuf,
    volumes: BTreeMap<String, PathBuf>,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        std::fs::create_dir_all(rootfs.join("root")).unwrap();
        std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).unwrap();
        }
        std::fs::write(
            rootfs.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\ntester:x:1234:1234:tester:/home/tester:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            rootfs.join("etc/group"),
            "root:x:0:\ntester:x:1234:\nvideo:x:44:tester\n",
        )
        .unwrap();
        let crun = crun_wrapper(dir.path());
        let mut volumes = BTreeMap::new();
        for v in ["out", "ro"] {
            let p = dir.path().join("volumes").join(v);
            std::fs::create_dir_all(&p).unwrap();
            // Writable by the `tester` user too.
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
            volumes.insert(v.to_string(), p);
        }
        World { dir, crun, volumes }
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    fn vol(&self, name: &str) -> &Path {
        &self.volumes[name]
    }

    fn read(&self, vol: &str, file: &str) -> String {
        let p = self.vol(vol).join(file);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
    }

    /// Runs one container (bounded: 60 s) and returns its exit code.
    async fn run(
        &self,
        spec: &ContainerSpec,
        image: &ImageConfig,
        extra_env: Vec<(String, String)>,
    ) -> Result<i32, RunError> {
        let name = unique_name("c");
        let bundle = self.dir.path().join("bundles").join(&name);
        let rootfs = self.rootfs();
        let req = RunRequest {
            spec,
            image,
            rootfs: &rootfs,
            volumes: &self.volumes,
            extra_env,
            bundle_dir: &bundle,
            name,
        };
        tokio::time::timeout(Duration::from_secs(60), run(&req, &self.crun))
            .await
            .expect("the container did not finish within 60 s")
    }
}

fn image(entrypoint: &[&str], cmd: &[&str], env: &[&str]) -> ImageConfig {
    ImageConfig {
        entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        env: env.iter().map(|s| s.to_string()).collect(),
        working_dir: None,
        user: None,
        digest: "sha256:0".into(),
    }
}

fn spec(value: &str) -> ContainerSpec {
    parse_container("b2c.container", value).unwrap()
}

/// Parses `env` output (one `K=V` per line).
fn env_map(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn exit_code_volume_and_user() {
    if !can_run("exit_code_volume_and_user") {
        return;
    }
    let w = World::new();
    let img = image(&[], &["sh"], &[]);
    let s = spec(
        "-v out:/out docker://busybox sh -c 'echo hello > /out/result.txt; id -u > /out/uid; id -G > /out/groups; exit 3'",
    );
    assert_eq!(w.run(&s, &img, vec![]).await.unwrap(), 3);
    assert_eq!(w.read("out", "result.txt"), "hello\n");
    assert_eq!(w.read("out", "uid"), "0\n");

    let s = spec(
        "-u tester -v out:/out docker://busybox sh -c 'id -u > /out/uid2; id -G > /out/groups2'",
    );
    assert_eq!(w.run(&s, &img, vec![]).await.unwrap(), 0);
    assert_eq!(w.read("out", "uid2"), "1234\n");
    assert_eq!(w.read("out", "groups2"), "1234 44\n");
    let written = std::fs::metadata(w.vol("out").join("uid2")).unwrap();
    assert_eq!(written.uid(), 1234, "the file was written by uid 1234");

    // The image's User, and a numeric uid:gid.
    let mut img_user = img.clone();
    img_user.user = Some("tester".into());
    let s = spec("-v out:/out docker://busybox sh -c 'id -u > /out/uid3'");
    assert_eq!(w.run(&s, &img_user, vec![]).await.unwrap(), 0);
    assert_eq!(w.read("out", "uid3"), "1234\n");
    let s =
        spec("-u 4321:55 -v out:/out docker://busybox sh -c 'echo $(id -u):$(id -g) > /out/uid4'");
    assert_eq!(w.run(&s, &img, vec![]).await.unwrap(), 0);
    assert_eq!(w.read("out", "uid4"), "4321:55\n");

    // Killed by a signal (from the host: the container's init ignores its own): 128 + n.
    let s = spec("-v out:/out docker://busybox sh -c 'touch /out/started; sleep 30'");
    let name = unique_name("killed");
    let bundle = w.dir.path().join("bundles").join(&name);
    let rootfs = w.rootfs();
    let req = RunRequest {
        spec: &s,
        image: &img,
        rootfs: &rootfs,
        volumes: &w.volumes,
        extra_env: vec![],
        bundle_dir: &bundle,
        name: name.clone(),
    };
    let killer = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !w.vol("out").join("started").exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the container did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let out = tokio::process::Command::new(&w.crun)
            .args(["state", &name])
            .output()
            .await
            .unwrap();
        let state: Value = serde_json::from_slice(&out.stdout).unwrap();
        let pid = state["pid"].as_i64().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    };
    let (code, ()) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(run(&req, &w.crun), killer)
    })
    .await
    .expect("the killed container did not finish within 60 s");
    assert_eq!(code.unwrap(), 137);
    let state = std::process::Command::new(&w.crun)
        .args(["state", &name])
        .output()
        .unwrap();
    assert!(!state.status.success(), "the container was deleted");

    // An unknown user is an error naming the container and the user.
    let s = spec("-u nobody docker://busybox true");
    let e = w.run(&s, &img, vec![]).await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, RunError::Config { .. }), "{msg}");
    assert!(
        msg.contains("fgrun-") && msg.contains("\"nobody\""),
        "{msg}"
    );

    // A named volume that was not set up.
    let s = spec("-v nope:/x docker://busybox true");
    let msg = w.run(&s, &img, vec![]).await.unwrap_err().to_string();
    assert!(msg.contains("\"nope\"") && msg.contains("out, ro"), "{msg}");
}

#[tokio::test]
async fn environment() {
    if !can_run("environment") {
        return;
    }
    let w = World::new();
    let img = image(
        &[],
        &["sh"],
        &["IMG=from-image", "A=image-a", "PATH=/bin:/sbin"],
    );
    let s = spec(
        "-v out:/out -e A=1 -e CARGO_PKG_NAME -e FARMGATE_NOT_SET_ANYWHERE -e B2C_PIPELINE_FAILED_BY=user \
         -h testhost docker://busybox sh -c 'env > /out/env; hostname > /out/hostname; cat /etc/hostname > /out/etc_hostname'",
    );
    let extra = vec![
        ("B2C_PIPELINE_STATUS".to_string(), "7".to_string()),
        ("B2C_PIPELINE_FAILED_BY".to_string(), "someone".to_string()),
        (
            "B2C_PIPELINE_PREV_CONTAINER".to_string(),
            "-v a:/b img".to_string(),
        ),
    ];
    assert_eq!(w.run(&s, &img, extra).await.unwrap(), 0);
    let env = env_map(&w.read("out", "env"));
    assert_eq!(env["IMG"], "from-image");
    assert_eq!(env["A"], "1", "-e overrides the image");
    assert_eq!(
        env["PATH"], "/bin:/sbin",
        "the image's PATH replaces the default"
    );
    assert_eq!(
        env["CARGO_PKG_NAME"],
        std::env::var("CARGO_PKG_NAME").unwrap(),
        "-e NAME copies the agent's value"
    );
    assert!(!env.contains_key("FARMGATE_NOT_SET_ANYWHERE"));
    assert_eq!(env["B2C_PIPELINE_STATUS"], "7");
    assert_eq!(env["B2C_PIPELINE_PREV_CONTAINER"], "-v a:/b img");
    assert_eq!(
        env["B2C_PIPELINE_FAILED_BY"], "user",
        "-e wins over the pipeline's"
    );
    assert_eq!(env["HOME"], "/root");
    assert_eq!(env["HOSTNAME"], "testhost");
    assert_eq!(env["TERM"], "xterm");
    assert_eq!(w.read("out", "hostname"), "testhost\n");
    assert_eq!(w.read("out", "etc_hostname"), "testhost\n");
}

/// Runs a pipeline of `containers` then `post` with the world's rootfs.
async fn pipeline(
    w: &World,
    containers: &[ContainerSpec],
    post: &[ContainerSpec],
    pipefail: bool,
) -> PipelineResult {
    let img = image(&[], &["sh"], &[]);
    run_pipeline(
        containers,
        post,
        pipefail,
        async |s: &ContainerSpec, env| {
            if s.image.reference == "unpullable" {
                return Err("pulling unpullable: 404".to_string());
            }
            w.run(s, &img, env).await.map_err(|e| e.to_string())
        },
    )
    .await
}

#[tokio::test]
async fn pipeline_with_and_without_pipefail() {
    if !can_run("pipeline_with_and_without_pipefail") {
        return;
    }
    let c: Vec<ContainerSpec> = [
        "-v out:/out docker://busybox sh -c 'env > /out/c1.env'",
        "-v out:/out docker://busybox sh -c 'env > /out/c2.env; exit 5'",
        "-v out:/out docker://busybox sh -c 'env > /out/c3.env'",
    ]
    .iter()
    .map(|s| spec(s))
    .collect();
    let post = vec![spec(
        "-v out:/out docker://busybox sh -c 'env > /out/post.env'",
    )];

    for pipefail in [true, false] {
        let w = World::new();
        let r = pipeline(&w, &c, &post, pipefail).await;
        assert_eq!(r.status, 5, "pipefail={pipefail}");
        assert_eq!(r.failed_by.as_deref(), Some(c[1].raw.as_str()));
        assert_eq!(r.shutdown, ShutdownMode::Default);
        let ran: Vec<(String, bool, Result<i32, String>)> = r
            .outcomes
            .iter()
            .map(|o| (o.container.clone(), o.post, o.result.clone()))
            .collect();
        let mut want = vec![
            (c[0].raw.clone(), false, Ok(0)),
            (c[1].raw.clone(), false, Ok(5)),
        ];
        if !pipefail {
            want.push((c[2].raw.clone(), false, Ok(0)));
        }
        want.push((post[0].raw.clone(), true, Ok(0)));
        assert_eq!(ran, want, "pipefail={pipefail}");

        let e1 = env_map(&w.read("out", "c1.env"));
        assert_eq!(e1["B2C_PIPELINE_STATUS"], "0");
        assert_eq!(e1["B2C_PIPELINE_FAILED_BY"], "");
        assert_eq!(e1["B2C_PIPELINE_PREV_CONTAINER"], "");
        assert_eq!(e1["B2C_PIPELINE_PREV_CONTAINER_EXIT_CODE"], "");
        assert_eq!(e1["B2C_PIPELINE_SHUTDOWN_MODE"], "default");
        let e2 = env_map(&w.read("out", "c2.env"));
        assert_eq!(e2["B2C_PIPELINE_STATUS"], "0");
        assert_eq!(e2["B2C_PIPELINE_PREV_CONTAINER"], c[0].raw);
        assert_eq!(e2["B2C_PIPELINE_PREV_CONTAINER_EXIT_CODE"], "0");
        let ep = env_map(&w.read("out", "post.env"));
        assert_eq!(ep["B2C_PIPELINE_STATUS"], "5");
        assert_eq!(ep["B2C_PIPELINE_FAILED_BY"], c[1].raw);
        if pipefail {
            assert!(!w.vol("out").join("c3.env").exists(), "c3 must not run");
            assert_eq!(ep["B2C_PIPELINE_PREV_CONTAINER"], c[1].raw);
            assert_eq!(ep["B2C_PIPELINE_PREV_CONTAINER_EXIT_CODE"], "5");
        } else {
            let e3 = env_map(&w.read("out", "c3.env"));
            assert_eq!(e3["B2C_PIPELINE_STATUS"], "5");
            assert_eq!(e3["B2C_PIPELINE_FAILED_BY"], c[1].raw);
            assert_eq!(e3["B2C_PIPELINE_PREV_CONTAINER"], c[1].raw);
            assert_eq!(e3["B2C_PIPELINE_PREV_CONTAINER_EXIT_CODE"], "5");
            assert_eq!(ep["B2C_PIPELINE_PREV_CONTAINER"], c[2].raw);
            assert_eq!(ep["B2C_PIPELINE_PREV_CONTAINER_EXIT_CODE"], "0");
        }
        assert_eq!(
            final_lines(r.status),
            [
                "Execution is over, pipeline status: 5".to_string(),
                "It's now safe to turn off your computer".to_string()
            ]
        );
    }
}

#[tokio::test]
async fn pipeline_reboot_request_and_setup_failure() {
    if !can_run("pipeline_reboot_request_and_setup_failure") {
        return;
    }
    let w = World::new();
    let c = vec![
        spec("docker://unpullable true"),
        spec("-v out:/out docker://busybox sh -c 'env > /out/c2.env; exit 129'"),
    ];
    let post = vec![spec(
        "-v out:/out docker://busybox sh -c 'env > /out/post.env; exit 9'",
    )];
    let r = pipeline(&w, &c, &post, false).await;
    assert_eq!(r.status, 1, "a container that cannot be set up counts as 1");
    assert_eq!(r.failed_by.as_deref(), Some(c[0].raw.as_str()));
    assert_eq!(r.shutdown, ShutdownMode::Reboot);
    assert_eq!(
        r.outcomes[0].result,
        Err("pulling unpullable: 404".to_string())
    );
    assert_eq!(r.outcomes[2].result, Ok(9));
    let e2 = env_map(&w.read("out", "c2.env"));
    assert_eq!(e2["B2C_PIPELINE_STATUS"], "1");
    assert_eq!(
        e2["B2C_PIPELINE_PREV_CONTAINER"], "",
        "a failed setup is not a previous container"
    );
    let ep = env_map(&w.read("out", "post.env"));
    assert_eq!(ep["B2C_PIPELINE_SHUTDOWN_MODE"], "reboot");
    assert_eq!(ep["B2C_PIPELINE_PREV_CONTAINER_EXIT_CODE"], "129");
}

#[tokio::test]
async fn read_only_volume_entrypoint_args_workdir() {
    if !can_run("read_only_volume_entrypoint_args_workdir") {
        return;
    }
    let w = World::new();
    std::fs::write(w.vol("ro").join("data"), "ro-data\n").unwrap();
    let img = image(&[], &["sh"], &[]);
    let s = spec(
        "-v out:/out -v ro:/ro:ro docker://busybox sh -c 'cat /ro/data > /out/read; touch /ro/new; echo $? > /out/rc'",
    );
    assert_eq!(w.run(&s, &img, vec![]).await.unwrap(), 0);
    assert_eq!(w.read("out", "read"), "ro-data\n");
    assert_ne!(
        w.read("out", "rc").trim(),
        "0",
        "writing to a ro volume must fail"
    );
    assert!(!w.vol("ro").join("new").exists());

    // Image Entrypoint + Cmd.
    let img = image(&["/bin/sh", "-c"], &["echo image-cmd > /out/o"], &[]);
    let s = spec("-v out:/out docker://busybox");
    assert_eq!(w.run(&s, &img, vec![]).await.unwrap(), 0);
    assert_eq!(w.read("out", "o"), "image-cmd\n");
    // Arguments replace the Cmd, the Entrypoint stays.
    let s = spec("-v out:/out docker://busybox 'echo args $0 > /out/o' zero");
    assert_eq!(w.run(&s, &img, vec![]).await.unwrap(), 0);
    assert_eq!(w.read("out", "o"), "args zero\n");
    // --entrypoint replaces the Entrypoint and drops the image's Cmd.
    let s = spec("-v out:/out --entrypoint /bin/touch docker://busybox /out/touched");
    assert_eq!(w.run(&s, &img, vec![]).await.unwrap(), 0);
    assert!(w.vol("out").join("touched").exists());
    let s = spec(
        r#"-v out:/out --entrypoint='["/bin/sh","-c","echo json $0 > /out/o"]' docker://busybox"#,
    );
    assert_eq!(w.run(&s, &img, vec![]).await.unwrap(), 0);
    assert_eq!(
        w.read("out", "o"),
        "json /bin/sh\n",
        "no image Cmd appended"
    );
    // --entrypoint "" clears the Entrypoint: the image's Cmd alone runs.
    let img2 = image(
        &["/bin/false"],
        &["/bin/sh", "-c", "echo cleared > /out/o"],
        &[],
    );
    let s = spec("-v out:/out --entrypoint '' docker://busybox");
    assert_eq!(w.run(&s, &img2, vec![]).await.unwrap(), 0);
    assert_eq!(w.read("out", "o"), "cleared\n");

    // Working directory: -w (created when missing), the image's, else /.
    let img = image(&[], &["sh"], &[]);
    let s = spec("-v out:/out -w /work/dir docker://busybox sh -c 'pwd > /out/pwd'");
    assert_eq!(w.run(&s, &img, vec![]).await.unwrap(), 0);
    assert_eq!(w.read("out", "pwd"), "/work/dir\n");
    let mut img_wd = img.clone();
    img_wd.working_dir = Some("/srv".into());
    let s = spec("-v out:/out docker://busybox sh -c 'pwd > /out/pwd'");
    assert_eq!(w.run(&s, &img_wd, vec![]).await.unwrap(), 0);
    assert_eq!(w.read("out", "pwd"), "/srv\n");
    assert_eq!(w.run(&s, &img, vec![]).await.unwrap(), 0);
    assert_eq!(w.read("out", "pwd"), "/\n");

    // Devices, --privileged (the host's /dev), capabilities, a private network.
    let s = spec(
        "-v out:/out --device /dev/null:/dev/extra-null --cap-add=sys_admin --cap-drop=kill docker://busybox \
         sh -c 'test -c /dev/extra-null; echo $? > /out/dev; grep CapBnd /proc/self/status > /out/caps'",
    );
    assert_eq!(w.run(&s, &img, vec![]).await.unwrap(), 0);
    assert_eq!(w.read("out", "dev"), "0\n");
    let mask = u64::from_str_radix(
        w.read("out", "caps")
            .trim()
            .trim_start_matches("CapBnd:")
            .trim(),
        16,
    )
    .unwrap();
    assert_ne!(mask & (1 << 21), 0, "CAP_SYS_ADMIN added");
    assert_eq!(mask & (1 << 5), 0, "CAP_KILL dropped");
    assert_eq!(mask & (1 << 27), 0, "CAP_MKNOD is not a podman default");
    let s = spec(
        "--privileged -v out:/out docker://busybox sh -c 'ls /dev > /out/devs; grep CapBnd /proc/self/status > /out/caps'",
    );
    assert_eq!(w.run(&s, &img, vec![]).await.unwrap(), 0);
    let host_devs: Vec<String> = std::fs::read_dir("/dev")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let devs = w.read("out", "devs");
    for d in host_devs.iter().filter(|d| !d.starts_with('.')) {
        assert!(
            devs.lines().any(|l| l == d),
            "host /dev/{d} missing in a privileged container: {devs}"
        );
    }
    let mask = u64::from_str_radix(
        w.read("out", "caps")
            .trim()
            .trim_start_matches("CapBnd:")
            .trim(),
        16,
    )
    .unwrap();
    assert_ne!(mask & (1 << 27), 0, "--privileged has CAP_MKNOD");
    let s = spec(
        "--network=none -v out:/out docker://busybox sh -c 'ls /sys/class/net > /out/net; hostname > /out/hostname'",
    );
    assert_eq!(w.run(&s, &img, vec![]).await.unwrap(), 0);
    assert_eq!(
        w.read("out", "net"),
        "lo\n",
        "only loopback in a private network namespace"
    );
    assert!(
        w.read("out", "hostname").starts_with("fgrun-"),
        "the container name"
    );

    // A missing command is crun's error: exit code non-zero, no hang.
    let s = spec("docker://busybox /bin/does-not-exist");
    assert_ne!(w.run(&s, &img, vec![]).await.unwrap(), 0);
}

fn facts() -> HostFacts {
    HostFacts {
        bounding_caps: vec![
            "CAP_CHOWN".into(),
            "CAP_KILL".into(),
            "CAP_SYS_ADMIN".into(),
            "CAP_NET_RAW".into(),
            "CAP_SETUID".into(),
        ],
        nofile: 4096,
        hostname: "dut-1".into(),
        stdin_is_tty: false,
        resolv_conf: Some("nameserver 10.42.0.1\n".into()),
        hosts: Some("127.0.0.1 localhost\n".into()),
        env: [("FROM_AGENT".to_string(), "agent".to_string())].into(),
        cwd: PathBuf::from("/"),
    }
}

fn find_mount<'a>(cfg: &'a Value, dest: &str) -> Option<&'a Value> {
    cfg["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["destination"] == dest)
}

#[test]
fn config_json_expectations() {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\ntester:x:1234:1234::/home/tester:/bin/sh\n",
    )
    .unwrap();
    let bundle = dir.path().join("bundle");
    let volumes: BTreeMap<String, PathBuf> =
        [("job".to_string(), PathBuf::from("/vol/job"))].into();
    let img = image(&["/entry"], &["cmd"], &["X=1"]);
    let s = spec(
        "-ti -v job:/job -v job:/ro:ro,nosuid,z -e FROM_AGENT -e Y=2 --cap-add=net_raw --cap-drop kill \
         --device /dev/null:/dev/extra-null:rw docker://alpine a b",
    );
    let req = RunRequest {
        spec: &s,
        image: &img,
        rootfs: &rootfs,
        volumes: &volumes,
        extra_env: vec![("B2C_PIPELINE_STATUS".into(), "0".into())],
        bundle_dir: &bundle,
        name: "c1".into(),
    };
    let cfg = oci_runtime_config_with(&req, &facts()).unwrap();
    assert_eq!(cfg["ociVersion"], "1.0.2");
    let p = &cfg["process"];
    assert_eq!(p["args"], json!(["/entry", "a", "b"]));
    assert_eq!(p["terminal"], false, "-t without a tty on stdin");
    assert_eq!(p["cwd"], "/");
    assert_eq!(p["user"], json!({"uid": 0, "gid": 0}));
    let env: Vec<&str> = p["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for want in [
        "X=1",
        "Y=2",
        "FROM_AGENT=agent",
        "B2C_PIPELINE_STATUS=0",
        "HOME=/root",
        "HOSTNAME=dut-1",
        "TERM=xterm",
    ] {
        assert!(env.contains(&want), "{want} missing from {env:?}");
    }
    assert!(env.iter().any(|e| e.starts_with("PATH=/usr/local/sbin:")));
    assert_eq!(
        p["capabilities"]["bounding"],
        json!(["CAP_CHOWN", "CAP_SETUID", "CAP_NET_RAW"]),
        "defaults + net_raw - kill, within the agent's set"
    );
    assert_eq!(
        p["capabilities"]["effective"],
        p["capabilities"]["bounding"]
    );
    assert_eq!(
        p["rlimits"],
        json!([{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}])
    );
    assert_eq!(
        cfg["root"],
        json!({"path": rootfs.to_string_lossy(), "readonly": false})
    );
    assert_eq!(
        cfg["hostname"], "dut-1",
        "host network: the agent's host name"
    );
    let ns: Vec<&str> = cfg["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        ns,
        ["mount", "uts", "pid", "ipc"],
        "host network by default"
    );
    assert!(cfg.get("seccomp").is_none() && cfg["linux"].get("seccomp").is_none());

    assert_eq!(find_mount(&cfg, "/proc").unwrap()["type"], "proc");
    assert_eq!(find_mount(&cfg, "/dev").unwrap()["type"], "tmpfs");
    assert_eq!(find_mount(&cfg, "/dev/pts").unwrap()["type"], "devpts");
    assert_eq!(find_mount(&cfg, "/dev/shm").unwrap()["type"], "tmpfs");
    assert_eq!(find_mount(&cfg, "/dev/mqueue").unwrap()["type"], "mqueue");
    assert!(
        find_mount(&cfg, "/sys").unwrap()["options"]
            .as_array()
            .unwrap()
            .contains(&json!("ro"))
    );
    assert!(find_mount(&cfg, "/tmp").is_none(), "podman mounts no /tmp");
    for (dest, file) in [
        ("/etc/resolv.conf", "resolv.conf"),
        ("/etc/hosts", "hosts"),
        ("/etc/hostname", "hostname"),
    ] {
        let m = find_mount(&cfg, dest).unwrap_or_else(|| panic!("{dest} not mounted"));
        assert_eq!(
            m["source"],
            bundle.join("etc").join(file).to_string_lossy().as_ref()
        );
    }
    assert_eq!(
        find_mount(&cfg, "/job").unwrap(),
        &json!({"destination": "/job", "type": "bind", "source": "/vol/job", "options": ["rbind", "rw"]})
    );
    assert_eq!(
        find_mount(&cfg, "/ro").unwrap()["options"],
        json!(["rbind", "nosuid", "ro"])
    );
    let devs = cfg["linux"]["devices"].as_array().unwrap();
    assert_eq!(devs.len(), 1);
    assert_eq!(
        (
            &devs[0]["path"],
            &devs[0]["type"],
            &devs[0]["major"],
            &devs[0]["minor"]
        ),
        (&json!("/dev/extra-null"), &json!("c"), &json!(1), &json!(3))
    );
    let rules = cfg["linux"]["resources"]["devices"].as_array().unwrap();
    assert_eq!(rules[0], json!({"allow": false, "access": "rwm"}));
    assert!(
        rules
            .contains(&json!({"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rw"}))
    );
    assert!(
        cfg["linux"]["maskedPaths"]
            .as_array()
            .unwrap()
            .contains(&json!("/proc/kcore"))
    );

    // --privileged, a user, a private network, an entrypoint override.
    let s =
        spec("--privileged -u tester --network=none --entrypoint /bin/sh -w /w docker://alpine");
    let req = RunRequest {
        spec: &s,
        name: "c2".into(),
        ..req.clone()
    };
    let cfg = oci_runtime_config_with(&req, &facts()).unwrap();
    assert_eq!(cfg["process"]["args"], json!(["/bin/sh"]));
    assert_eq!(cfg["process"]["cwd"], "/w");
    assert_eq!(cfg["process"]["user"], json!({"uid": 1234, "gid": 1234}));
    assert_eq!(
        cfg["process"]["capabilities"]["bounding"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    assert_eq!(
        cfg["process"]["capabilities"]["effective"],
        json!([]),
        "non-root user"
    );
    assert_eq!(cfg["hostname"], "c2", "private network: the container name");
    assert!(
        cfg["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .contains(&json!({"type": "network"}))
    );
    assert_eq!(
        find_mount(&cfg, "/dev").unwrap(),
        &json!({"destination": "/dev", "type": "bind", "source": "/dev", "options": ["rbind", "rprivate", "nosuid"]})
    );
    assert!(
        find_mount(&cfg, "/sys").unwrap()["options"]
            .as_array()
            .unwrap()
            .contains(&json!("rw"))
    );
    assert!(cfg["linux"].get("maskedPaths").is_none());
    assert_eq!(
        cfg["linux"]["resources"]["devices"],
        json!([{"allow": true, "access": "rwm"}])
    );

    // Errors name the container and the problem.
    for (opts, want) in [
        ("--network=bridge docker://a x", "--network=bridge"),
        ("--cap-add=fly docker://a x", "unknown capability"),
        ("-v nope:/x docker://a x", "named volume \"nope\""),
        ("docker://a", ""),
        (
            "--device=/dev/does-not-exist docker://a x",
            "/dev/does-not-exist",
        ),
        ("--mount type=image,src=a,dst=/x docker://a x", "--mount"),
    ] {
        let s = spec(opts);
        let empty = image(&[], &[], &[]);
        let req = RunRequest {
            spec: &s,
            image: &empty,
            name: "bad".into(),
            ..req.clone()
        };
        let msg = oci_runtime_config_with(&req, &facts())
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("container bad: building its OCI config: "),
            "{msg}"
        );
        assert!(msg.contains(want), "{opts}: {msg}");
    }
}
