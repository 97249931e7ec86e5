//! What the S3 tests share (also included by farmgate-agent's volume tests): the store
//! served on loopback, the admin key, and real clients (aws-cli, boto3) run with a
//! bounded wait.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use farmgate_s3::{Credentials, S3Config, S3Store};

/// Bound of one client run.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// The admin key the test stores are opened with.
pub fn admin() -> Credentials {
    Credentials {
        access_key: "FGADMINKEY0000000000".into(),
        secret_key: "adminsecretadminsecretadminsecretadminse".into(),
    }
}

/// A store served on 127.0.0.1 (OS-assigned port, bound in this process); the server
/// stops when dropped.
pub struct Server {
    pub store: S3Store,
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    _root: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    /// The store of `cfg`, served.
    pub async fn serve(cfg: S3Config) -> Server {
        let store = S3Store::open(cfg).expect("open the store");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let router = store.router();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Server {
            store,
            addr,
            task,
            _root: None,
        }
    }

    /// A local store in `root` with the [`admin`] key, served.
    pub async fn start(root: &Path) -> Server {
        Self::serve(S3Config::new(root, admin())).await
    }

    /// [`Server::start`] in a temporary directory of its own.
    pub async fn start_temp() -> Server {
        let root = tempfile::tempdir().expect("temp dir");
        let mut s = Self::start(root.path()).await;
        s._root = Some(root);
        s
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Runs a client program with a bounded wait; a missing program fails with what to
/// install (`install`).
pub async fn run(program: &str, args: &[&str], envs: &[(&str, String)], install: &str) -> Output {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    for k in ["AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"] {
        cmd.env_remove(k);
    }
    match tokio::time::timeout(CLIENT_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{program} is not installed: {install}")
        }
        Ok(Err(e)) => panic!("running {program}: {e} ({install})"),
        Err(_) => panic!("{program} {args:?} did not finish within {CLIENT_TIMEOUT:?}"),
    }
}

/// A client's status and output, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// aws-cli and boto3 configured for one endpoint and one key.
pub struct Aws {
    endpoint: String,
    creds: Credentials,
    config: PathBuf,
    install: &'static str,
    /// boto3 tries once (errors show at once) instead of retrying.
    boto3_no_retries: bool,
}

impl Aws {
    /// Clients of `endpoint` with `creds`, their config file in `dir`; `install` says how
    /// to get them when missing.
    pub fn new(endpoint: &str, creds: Credentials, dir: &Path, install: &'static str) -> Aws {
        let config = dir.join(format!("aws-config-{}", creds.access_key));
        std::fs::write(
            &config,
            // aws-cli v1 presigns with SigV2 unless told s3v4.
            "[default]\nregion = us-east-1\ns3 =\n    addressing_style = path\n    signature_version = s3v4\n",
        )
        .expect("write aws config");
        Aws {
            endpoint: endpoint.to_string(),
            creds,
            config,
            install,
            boto3_no_retries: false,
        }
    }

    /// boto3 without retries.
    pub fn boto3_no_retries(mut self) -> Aws {
        self.boto3_no_retries = true;
        self
    }

    pub fn envs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.creds.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.creds.secret_key.clone()),
            ("AWS_CONFIG_FILE", self.config.display().to_string()),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                self.config.with_extension("nocreds").display().to_string(),
            ),
            ("AWS_DEFAULT_REGION", "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
            ("S3_ENDPOINT", self.endpoint.clone()),
        ]
    }

    pub async fn run(&self, args: &[&str]) -> Output {
        let mut all = vec!["--endpoint-url", self.endpoint.as_str()];
        all.extend_from_slice(args);
        run("aws", &all, &self.envs(), self.install).await
    }

    pub async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(out.status.success(), "aws {args:?} failed:\n{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub async fn fails(&self, args: &[&str], code: &str) {
        let out = self.run(args).await;
        let all = text(&out);
        assert!(!out.status.success(), "aws {args:?} should fail:\n{all}");
        assert!(
            all.contains(code),
            "aws {args:?} should fail with {code}:\n{all}"
        );
    }

    /// Runs a Python script with boto3; `s3` is a client for this endpoint and key, and
    /// `ClientError` is imported.
    pub async fn boto3(&self, script: &str) -> String {
        let retries = if self.boto3_no_retries {
            ", retries={'max_attempts': 1}"
        } else {
            ""
        };
        let full = format!(
            "import os, boto3\nfrom botocore.config import Config\n\
             from botocore.exceptions import ClientError\n\
             s3 = boto3.client('s3', endpoint_url=os.environ['S3_ENDPOINT'], \
             config=Config(s3={{'addressing_style': 'path'}}{retries}))\n{script}"
        );
        let out = run("python3", &["-c", &full], &self.envs(), self.install).await;
        assert!(out.status.success(), "boto3 script failed:\n{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
