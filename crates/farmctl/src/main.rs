//! `farmctl`: the user's client of a farmgate gateway (CI-tron's `executorctl` role).
//!
//! `farmctl run job.yml` submits a job (same multipart request as executorctl), then
//! follows its events: executor messages go to stderr prefixed with `[farmgate]`, the
//! DUT's console goes to stdout as it comes, and farmctl exits with the job's status
//! code. If the stream drops (the gateway restarting), it resumes where it stopped.
//!
//! Exit codes: 0 PASS, 1 WARN, 2 COMPLETE, 3 FAIL, 4 INCOMPLETE, 5 UNKNOWN, 6 SETUP_FAIL
//! (CI-tron's values), 7 the gateway refused the request, 8 the gateway could not be
//! reached, 9 bad usage or unreadable input.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use farmgate_wire::{
    ApiErrorBody, DutList, DutPatch, EventKind, JobAccepted, JobEvent, JobMetadata, JobStatus,
    JobTarget, JobView, SessionEnd,
};
use futures_util::StreamExt;

/// The gateway refused the request (bad job, no machine, busy, credentials).
const EXIT_REFUSED: u8 = 7;
/// The gateway could not be reached.
const EXIT_UNREACHABLE: u8 = 8;
/// Bad usage or unreadable input.
const EXIT_USAGE: u8 = 9;

#[derive(Parser)]
#[command(name = "farmctl", version, about = "Run jobs on a farmgate test farm")]
struct Cli {
    /// URL of the gateway's REST API.
    #[arg(long, env = "FARMGATE_URL", default_value = "http://localhost")]
    url: String,
    /// Bearer token (submit token for jobs, admin token for DUT changes).
    #[arg(long, env = "FARMGATE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job and follow it; exit with its status code.
    Run {
        /// Wait for a machine to become available if all are busy.
        #[arg(short = 'w', long)]
        wait: bool,
        /// Tag the machine must have (repeatable). Overrides the job's target.
        #[arg(short = 't', long = "machine-tag")]
        machine_tags: Vec<String>,
        /// ID of the machine that should run the job. Overrides the job's target.
        #[arg(short = 'i', long = "machine-id")]
        machine_id: Option<String>,
        /// Directory shared with the job: put into the job's bucket before it starts,
        /// and what the job left there is unpacked into it at the end.
        #[arg(short = 's', long = "share-directory")]
        share_directory: Option<PathBuf>,
        /// Identifier for the job, if you have one already.
        #[arg(short = 'j', long = "job-id")]
        job_id: Option<String>,
        /// Variable forwarded to the job template as `environ.NAME` (repeatable).
        #[arg(short = 'e', long = "env", value_name = "NAME=VALUE")]
        environ: Vec<String>,
        /// The job description (YAML, may be a Jinja2 template).
        job: PathBuf,
    },
    /// Show a job's record.
    Status {
        /// Job id.
        job_id: String,
    },
    /// Follow a job's events from the start (or print them if it is over).
    Follow {
        /// Job id.
        job_id: String,
    },
    /// Cancel a job.
    Cancel {
        /// Job id.
        job_id: String,
    },
    /// List the farm's machines.
    Duts,
    /// Retire a machine (admin).
    Retire {
        /// Machine id.
        dut_id: String,
    },
    /// Bring a retired machine back, through a quick check (admin).
    Activate {
        /// Machine id.
        dut_id: String,
    },
    /// PDUs: drivers, list, add, remove, switch or reserve a port.
    Pdu {
        #[command(subcommand)]
        command: PduCommand,
    },
    /// Machines: list, enrol a new one, retire, activate.
    Dut {
        #[command(subcommand)]
        command: DutCommand,
    },
}

#[derive(Subcommand)]
enum DutCommand {
    /// The farm's machines (as `farmctl duts`).
    List,
    /// Enrol the machine plugged into a PDU port (admin): the gateway powers the port,
    /// the machine boots the default configuration and registers, is bound to the port,
    /// trains, and becomes IDLE.
    Discover {
        /// The PDU the machine is plugged into.
        #[arg(long)]
        pdu: String,
        /// Its port on that PDU.
        #[arg(long)]
        port: String,
        /// Seconds the gateway waits for the machine to register.
        #[arg(long, default_value_t = 150.0)]
        timeout: f64,
        /// Follow the machine until it is IDLE (exit 0), or until the discovery ends
        /// without it or its training retires it (exit 1).
        #[arg(short = 'w', long)]
        wait: bool,
    },
    /// Retire a machine (admin).
    Retire {
        /// Machine id.
        dut_id: String,
    },
    /// Bring a retired machine back, through a quick check (admin).
    Activate {
        /// Machine id.
        dut_id: String,
    },
}

#[derive(Subcommand)]
enum PduCommand {
    /// The PDU drivers of the gateway and their configuration keys.
    Drivers,
    /// Every PDU with its ports: state, last change, power, energy, reserved.
    List,
    /// Add a PDU (admin); the gateway talks to it before adding it.
    Add {
        /// Its name.
        name: String,
        /// Its driver (see `farmctl pdu drivers`).
        driver: String,
        /// Configuration, `key=value` (repeatable; numbers stay text, drivers accept both).
        #[arg(value_name = "KEY=VALUE")]
        config: Vec<String>,
    },
    /// Remove a PDU that powers no machine (admin).
    Remove {
        /// Its name.
        name: String,
    },
    /// Switch a port on or off (returns once it reads back so), reserve or release it,
    /// or label it (admin).
    Port {
        /// The PDU.
        pdu: String,
        /// The port id.
        port: String,
        /// on, off, reserve, release, or label (followed by the text; empty removes it).
        #[arg(value_parser = ["on", "off", "reserve", "release", "label"])]
        action: String,
        /// The label, for `label`.
        text: Option<String>,
    },
}

struct Client {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
}

/// A failure with the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

impl Client {
    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(
            method,
            format!("{}{}", self.url.trim_end_matches('/'), path),
        );
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> Result<reqwest::Response, Failure> {
        let resp = r.send().await.map_err(|e| {
            fail(
                EXIT_UNREACHABLE,
                format!("cannot reach the gateway at {}: {e}", self.url),
            )
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ApiErrorBody>(&text)
            .map(|b| b.error)
            .unwrap_or(text);
        Err(fail(
            EXIT_REFUSED,
            format!("the gateway answered {status}: {message}"),
        ))
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        r: reqwest::RequestBuilder,
    ) -> Result<T, Failure> {
        self.send(r).await?.json().await.map_err(|e| {
            fail(
                EXIT_UNREACHABLE,
                format!("unreadable answer from the gateway: {e}"),
            )
        })
    }
}

fn ctrl(text: &str) {
    let now = chrono::Local::now().format("%H:%M:%S");
    eprintln!("[farmgate {now}] {text}");
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let client = Client {
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default(),
        url: cli.url.clone(),
        token: cli.token.clone(),
    };
    match run(&client, cli.command).await {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("farmctl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn run(client: &Client, command: Command) -> Result<u8, Failure> {
    match command {
        Command::Run {
            wait,
            machine_tags,
            machine_id,
            share_directory,
            job_id,
            environ,
            job,
        } => {
            let share = match &share_directory {
                Some(dir) => Some(pack_share(dir)?),
                None => None,
            };
            let template = std::fs::read_to_string(&job)
                .map_err(|e| fail(EXIT_USAGE, format!("cannot read {}: {e}", job.display())))?;
            let mut env = BTreeMap::new();
            for pair in environ {
                let (k, v) = pair.split_once('=').ok_or_else(|| {
                    fail(EXIT_USAGE, format!("--env {pair:?}: expected NAME=VALUE"))
                })?;
                env.insert(k.to_string(), v.to_string());
            }
            let target = (machine_id.is_some() || !machine_tags.is_empty()).then_some(JobTarget {
                id: machine_id,
                tags: machine_tags,
            });
            // The job id is chosen here when not given, so that a submission whose
            // answer is lost (gateway restarting) can be checked and retried safely.
            let job_id = job_id.unwrap_or_else(client_job_id);
            let metadata = JobMetadata {
                version: 1,
                job_id: Some(job_id.clone()),
                target,
                wait,
                environ: env,
                callback: None,
                minio: None,
            };
            let metadata = serde_json::to_string(&metadata).unwrap_or_default();
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let accepted: JobAccepted = loop {
                let mut form = reqwest::multipart::Form::new()
                    .text("metadata", metadata.clone())
                    .text("job", template.clone());
                if let Some(archive) = &share {
                    form = form.part(
                        "archive",
                        reqwest::multipart::Part::bytes(archive.clone())
                            .file_name("share.tar.gz")
                            .mime_str("application/gzip")
                            .map_err(|e| fail(EXIT_USAGE, e.to_string()))?,
                    );
                }
                match client
                    .json::<JobAccepted>(
                        client
                            .req(reqwest::Method::POST, "/api/v1/jobs")
                            .multipart(form),
                    )
                    .await
                {
                    Ok(a) => break a,
                    Err(f)
                        if f.code == EXIT_UNREACHABLE && std::time::Instant::now() < deadline =>
                    {
                        ctrl(&format!("{}; trying again", f.message));
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        // The gateway may have queued the job before its answer was lost.
                        if let Ok(view) = client
                            .json::<JobView>(
                                client.req(reqwest::Method::GET, &format!("/api/v1/job/{job_id}")),
                            )
                            .await
                        {
                            break JobAccepted {
                                job_id: view.job_id,
                                dut_id: view.dut_id,
                                state: view.state,
                            };
                        }
                    }
                    Err(f) => return Err(f),
                }
            };
            ctrl(&format!(
                "Job {} accepted ({}{})",
                accepted.job_id,
                accepted.state.as_str(),
                accepted
                    .dut_id
                    .as_deref()
                    .map(|d| format!(" on {d}"))
                    .unwrap_or_default()
            ));
            let code = follow(client, &accepted.job_id).await?;
            if let Some(dir) = &share_directory {
                unpack_share(client, &accepted.job_id, dir).await?;
            }
            Ok(code)
        }
        Command::Follow { job_id } => follow(client, &job_id).await,
        Command::Status { job_id } => {
            let view: JobView = client
                .json(client.req(reqwest::Method::GET, &format!("/api/v1/job/{job_id}")))
                .await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&view).unwrap_or_default()
            );
            Ok(view.status.map(|s| s.exit_code() as u8).unwrap_or(0))
        }
        Command::Cancel { job_id } => {
            let view: JobView = client
                .json(client.req(
                    reqwest::Method::POST,
                    &format!("/api/v1/job/{job_id}/cancel"),
                ))
                .await?;
            ctrl(&format!("cancel requested for job {}", view.job_id));
            Ok(0)
        }
        Command::Duts
        | Command::Dut {
            command: DutCommand::List,
        } => print_duts(client).await,
        Command::Pdu { command } => pdu_command(client, command).await,
        Command::Dut {
            command:
                DutCommand::Discover {
                    pdu,
                    port,
                    timeout,
                    wait,
                },
        } => discover(client, &pdu, &port, timeout, wait).await,
        Command::Dut {
            command: DutCommand::Retire { dut_id },
        } => set_retired(client, &dut_id, true).await,
        Command::Dut {
            command: DutCommand::Activate { dut_id },
        } => set_retired(client, &dut_id, false).await,
        Command::Retire { dut_id } => set_retired(client, &dut_id, true).await,
        Command::Activate { dut_id } => set_retired(client, &dut_id, false).await,
    }
}

/// `farmctl dut list`: one line a machine.
async fn print_duts(client: &Client) -> Result<u8, Failure> {
    let list: DutList = client
        .json(client.req(reqwest::Method::GET, "/api/v1/duts"))
        .await?;
    println!(
        "{:<20} {:<24} {:<12} {:<10} TAGS",
        "ID", "NAME", "STATE", "PDU:PORT"
    );
    for (id, d) in list.duts {
        println!(
            "{:<20} {:<24} {:<12} {:<10} {}",
            id,
            d.full_name,
            d.state.as_str(),
            format!(
                "{}:{}",
                d.record.pdu.as_deref().unwrap_or("-"),
                d.record.pdu_port_id.as_deref().unwrap_or("-")
            ),
            d.record.all_tags().collect::<Vec<_>>().join(",")
        );
    }
    Ok(0)
}

/// `farmctl dut discover`: starts the discovery of a PDU port; with `wait`, follows the
/// machine that registers there until it is IDLE.
async fn discover(
    client: &Client,
    pdu: &str,
    port: &str,
    timeout: f64,
    wait: bool,
) -> Result<u8, Failure> {
    use reqwest::Method;
    let req = farmgate_wire::DiscoverRequest {
        pdu: pdu.to_string(),
        port_id: port.to_string(),
        timeout: Some(timeout),
    };
    let state: farmgate_wire::DiscoverState = client
        .json(client.req(Method::POST, "/api/v1/dut/discover").json(&req))
        .await?;
    ctrl(&format!(
        "discovering {pdu} port {port}: the port is powered on; the machine has until {} to register",
        rfc3339_short(state.deadline.as_deref())
    ));
    if !wait {
        ctrl("it appears in `farmctl dut list` once registered");
        return Ok(0);
    }
    let mut last: Option<(String, String)> = None;
    loop {
        let list: DutList = client.json(client.req(Method::GET, "/api/v1/duts")).await?;
        let found = list.duts.iter().find(|(_, d)| {
            d.record.pdu.as_deref() == Some(pdu) && d.record.pdu_port_id.as_deref() == Some(port)
        });
        if let Some((id, d)) = found {
            let now = (id.clone(), d.state.as_str().to_string());
            if last.as_ref() != Some(&now) {
                ctrl(&format!("{} ({id}) is {}", d.full_name, now.1));
                last = Some(now);
            }
            match d.state {
                farmgate_wire::DutState::Idle => return Ok(0),
                farmgate_wire::DutState::Retired => {
                    return Err(fail(
                        1,
                        format!(
                            "{} was retired (training failed?): see its jobs",
                            d.full_name
                        ),
                    ));
                }
                _ => {}
            }
        } else {
            let d: farmgate_wire::DiscoverState = client
                .json(client.req(Method::GET, "/api/v1/dut/discover"))
                .await?;
            if d.pdu.is_none() {
                return Err(fail(
                    1,
                    format!(
                        "no machine registered on {pdu} port {port} within {timeout} s: the port is off again"
                    ),
                ));
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

fn rfc3339_short(t: Option<&str>) -> String {
    t.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| {
            t.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|| "-".into())
}

async fn pdu_command(client: &Client, command: PduCommand) -> Result<u8, Failure> {
    use reqwest::Method;
    match command {
        PduCommand::Drivers => {
            let drivers: Vec<farmgate_wire::PduDriverInfo> = client
                .json(client.req(Method::GET, "/api/v1/pdu-drivers"))
                .await?;
            for d in drivers {
                println!("{}: {}", d.name, d.description);
                for k in d.config {
                    println!("    {:<18} {}", k.key, k.description);
                }
            }
        }
        PduCommand::List => {
            let list: farmgate_wire::PduList =
                client.json(client.req(Method::GET, "/api/v1/pdus")).await?;
            for (name, p) in list.pdus {
                let health = match (&p.down, &p.error) {
                    (Some(down), _) => format!("DOWN: {down}"),
                    (None, Some(e)) => format!("last read failed: {e}"),
                    (None, None) => "answering".into(),
                };
                println!("{name} ({}): {health}", p.driver);
                println!(
                    "    {:<6} {:<8} {:<20} {:<9} {:<11} {:<9} LABEL",
                    "PORT", "STATE", "LAST CHANGE", "POWER W", "ENERGY WH", "RESERVED"
                );
                for (id, port) in p.ports {
                    let m = port.measure.unwrap_or_default();
                    let num = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or("-".into());
                    println!(
                        "    {:<6} {:<8} {:<20} {:<9} {:<11} {:<9} {}",
                        id,
                        port.state.to_string(),
                        rfc3339_short(port.last_change.as_deref()),
                        num(m.power_w),
                        num(m.energy_wh),
                        if port.reserved { "yes" } else { "no" },
                        port.label.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        PduCommand::Add {
            name,
            driver,
            config,
        } => {
            let mut map = serde_json::Map::new();
            for kv in &config {
                let Some((k, v)) = kv.split_once('=') else {
                    return Err(fail(
                        EXIT_USAGE,
                        format!("config {kv:?}: expected KEY=VALUE"),
                    ));
                };
                map.insert(
                    k.trim().to_string(),
                    serde_json::Value::String(v.to_string()),
                );
            }
            let body = serde_json::json!({"name": name, "driver": driver, "config": map});
            let view: farmgate_wire::PduView = client
                .json(client.req(Method::POST, "/api/v1/pdus").json(&body))
                .await?;
            ctrl(&format!(
                "PDU {} ({}) added with {} ports",
                view.name,
                view.driver,
                view.ports.len()
            ));
        }
        PduCommand::Remove { name } => {
            client
                .send(client.req(Method::DELETE, &format!("/api/v1/pdu/{name}")))
                .await?;
            ctrl(&format!("PDU {name} removed"));
        }
        PduCommand::Port {
            pdu,
            port,
            action,
            text,
        } => {
            let body = match (action.as_str(), text) {
                ("label", Some(t)) => serde_json::json!({"label": t}),
                ("label", None) => {
                    return Err(fail(
                        EXIT_USAGE,
                        "label: give the text (\"\" removes the label)",
                    ));
                }
                (_, Some(t)) => {
                    return Err(fail(
                        EXIT_USAGE,
                        format!("{action} takes no text (got {t:?})"),
                    ));
                }
                ("on" | "off", None) => serde_json::json!({"state": action}),
                ("reserve", None) => serde_json::json!({"reserved": true}),
                _ => serde_json::json!({"reserved": false}),
            };
            let view: farmgate_wire::PortView = client
                .json(
                    client
                        .req(Method::PATCH, &format!("/api/v1/pdu/{pdu}/port/{port}"))
                        .json(&body),
                )
                .await?;
            ctrl(&format!(
                "{pdu} port {port}: {}{}{}",
                view.state,
                if view.reserved { " (reserved)" } else { "" },
                view.label
                    .map(|l| format!(", label {l:?}"))
                    .unwrap_or_default()
            ));
        }
    }
    Ok(0)
}

async fn set_retired(client: &Client, dut_id: &str, retired: bool) -> Result<u8, Failure> {
    let patch = DutPatch {
        is_retired: Some(retired),
        ..DutPatch::default()
    };
    let view: farmgate_wire::DutView = client
        .json(
            client
                .req(reqwest::Method::PATCH, &format!("/api/v1/dut/{dut_id}"))
                .json(&patch),
        )
        .await?;
    ctrl(&format!("{} is now {}", view.full_name, view.state));
    Ok(0)
}

/// Follow a job's events until its session_end; resume after stream losses.
/// A job id unique enough for one client: time to the millisecond, process id, and
/// the clock's nanoseconds.
fn client_job_id() -> String {
    let now = chrono::Utc::now();
    let salt = (now.timestamp_subsec_nanos() as u64) ^ ((std::process::id() as u64) << 20);
    format!("job-{}-{salt:08x}", now.format("%Y%m%d%H%M%S%3f"))
}

/// The share directory as a `.tar.gz` (paths relative to it), sent with the job.
fn pack_share(dir: &std::path::Path) -> Result<Vec<u8>, Failure> {
    if !dir.is_dir() {
        return Err(fail(
            EXIT_USAGE,
            format!("--share-directory {}: not a directory", dir.display()),
        ));
    }
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    tar.follow_symlinks(false);
    tar.append_dir_all(".", dir)
        .and_then(|()| tar.into_inner())
        .and_then(|gz| gz.finish())
        .map_err(|e| {
            fail(
                EXIT_USAGE,
                format!("--share-directory {}: {e}", dir.display()),
            )
        })
}

/// After the job: what it left in its bucket is unpacked into the share directory
/// (entries that would land outside it are refused by the archive reader).
async fn unpack_share(client: &Client, job_id: &str, dir: &std::path::Path) -> Result<(), Failure> {
    // The archive is written right after the job ends, in the background.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let bytes = loop {
        let r = client
            .req(
                reqwest::Method::GET,
                &format!("/api/v1/job/{job_id}/share.tar.gz"),
            )
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => match r.bytes().await {
                Ok(b) => break b,
                Err(e) => ctrl(&format!("share archive download: {e}; trying again")),
            },
            Ok(r) if r.status() != reqwest::StatusCode::NOT_FOUND => {
                return Err(fail(
                    EXIT_REFUSED,
                    format!(
                        "share archive of job {job_id}: the gateway answered {}",
                        r.status()
                    ),
                ));
            }
            _ => {}
        }
        if std::time::Instant::now() > deadline {
            return Err(fail(
                EXIT_UNREACHABLE,
                format!("the share archive of job {job_id} did not appear within 60 s"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    let mut count = 0;
    let entries = archive
        .entries()
        .map_err(|e| fail(EXIT_REFUSED, format!("share archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| fail(EXIT_REFUSED, format!("share archive: {e}")))?;
        if entry.unpack_in(dir).map_err(|e| {
            fail(
                EXIT_USAGE,
                format!("share directory {}: {e}", dir.display()),
            )
        })? {
            count += 1;
        }
    }
    ctrl(&format!(
        "Share directory {}: {count} files from the job's bucket",
        dir.display()
    ));
    Ok(())
}

async fn follow(client: &Client, job_id: &str) -> Result<u8, Failure> {
    let mut after = 0i64;
    let mut failures = 0u32;
    let mut cancel_sent = false;
    let mut stdout = std::io::stdout();
    loop {
        let req = client.req(
            reqwest::Method::GET,
            &format!("/api/v1/job/{job_id}/events?follow=true&after={after}"),
        );
        let resp = match client.send(req).await {
            Ok(r) => r,
            Err(f) if f.code == EXIT_UNREACHABLE && failures < 600 => {
                if failures == 0 {
                    ctrl("lost the gateway; retrying every second");
                }
                failures += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(f) => return Err(f),
        };
        if failures > 0 {
            ctrl("reconnected to the gateway");
        }
        failures = 0;
        let mut stream = resp.bytes_stream();
        let mut partial: Vec<u8> = Vec::new();
        loop {
            let chunk = tokio::select! {
                c = stream.next() => c,
                _ = tokio::signal::ctrl_c() => {
                    if cancel_sent {
                        return Ok(130);
                    }
                    cancel_sent = true;
                    ctrl("Ctrl-C: cancelling the job (press again to quit without waiting)");
                    let _ = client.send(client.req(reqwest::Method::POST, &format!("/api/v1/job/{job_id}/cancel"))).await;
                    continue;
                }
            };
            let Some(Ok(chunk)) = chunk else { break };
            partial.extend_from_slice(&chunk);
            while let Some(pos) = partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = partial.drain(..=pos).collect();
                let Ok(event) = serde_json::from_slice::<JobEvent>(&line) else {
                    continue;
                };
                after = event.seq;
                match event.msg_type {
                    EventKind::JobIo => {
                        let _ = writeln!(stdout, "{}", event.payload);
                        let _ = stdout.flush();
                    }
                    EventKind::Ctrl => ctrl(&event.payload),
                    EventKind::SessionEnd => {
                        let end: SessionEnd =
                            serde_json::from_str(&event.payload).unwrap_or(SessionEnd {
                                status: JobStatus::Unknown,
                                reason: event.payload.clone(),
                            });
                        ctrl(&format!(
                            "Job {job_id} finished: {} ({})",
                            end.status, end.reason
                        ));
                        return Ok(end.status.exit_code() as u8);
                    }
                }
            }
        }
        // Stream ended without session_end: the gateway went away; resume.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
