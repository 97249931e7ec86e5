//! `farmgate`: the gateway daemon.
//!
//! - `farmgate serve` runs a gateway configured by environment variables (seed 001
//!   names): the executor's REST API, SALAD, Sergeant Hartman.
//! - `farmgate run-job` is what `serve` starts for each job, in its own process group;
//!   it exits with the job's status code. Users do not call it.
//! - `farmgate image build` builds the DUT image (kernel, initramfs with farm-agent) and
//!   publishes it where the default boot configuration finds it ([`image`]).
//!
//! Exit codes of `serve`: 0 after a clean shutdown, 1 on a runtime failure, 2 on a bad
//! configuration.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use farmgate_executor::{Executor, GatewayConfig};
use tokio_util::sync::CancellationToken;

mod image;

#[derive(Parser)]
#[command(
    name = "farmgate",
    version,
    about = "Time-share a farm of test machines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (configuration from the environment; see the README).
    Serve,
    /// Run one job on its DUT (started by `serve`; exits with the job's status code).
    #[command(hide = true)]
    RunJob {
        /// The gateway's SQLite database.
        #[arg(long)]
        database: PathBuf,
        /// The job to run.
        #[arg(long)]
        job_id: String,
    },
    /// The DUT image (kernel + initramfs with farm-agent) the gateway boots by default.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build it from host packages and publish it in BOOTS_TFTP_ROOT.
    Build(image::BuildArgs),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FARMGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Serve => {
            match farmgate_executor::raise_fd_limit() {
                Ok(n) => tracing::debug!("open files limit: {n}"),
                Err(e) => tracing::warn!("cannot raise the open files limit: {e}"),
            }
            let config = match GatewayConfig::from_process_env() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("farmgate: configuration: {e}");
                    return ExitCode::from(2);
                }
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("farmgate: cannot start the async runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("farmgate: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Image(ImageCommand::Build(args)) => {
            let config = GatewayConfig::from_process_env().ok();
            match image::build(&args, config.as_ref()) {
                Ok(p) => {
                    println!("{}", p.summary);
                    println!(
                        "farmgate image build: published {} and {}; unknown machines of this architecture now boot them with: {}",
                        p.kernel.display(),
                        p.initrd.display(),
                        p.cmdline
                    );
                    println!(
                        "(BOOTS_DEFAULT_* variables, when set, still take precedence; the command line is in {})",
                        p.cmdline_file.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("farmgate image build: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::RunJob { database, job_id } => {
            // One small single-threaded runtime per job: a farm runs hundreds at once.
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("farmgate run-job: cannot start the async runtime: {e}");
                    return ExitCode::from(farmgate_wire::JobStatus::Unknown.exit_code() as u8);
                }
            };
            let result = rt.block_on(async {
                let store = farmgate_store::SqliteStore::open(&database)?;
                farmgate_executor::runner::run_job(Arc::new(store), &job_id).await
            });
            match result {
                Ok(status) => ExitCode::from(status.exit_code() as u8),
                Err(e) => {
                    eprintln!("farmgate run-job {job_id}: {e:#}");
                    ExitCode::from(farmgate_wire::JobStatus::Unknown.exit_code() as u8)
                }
            }
        }
    }
}

/// Writes a generated secret (one line) readable by its owner only, creating the
/// state directory if needed.
fn write_secret_file(path: &std::path::Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    writeln!(f, "{secret}")?;
    Ok(())
}

/// Make sure an admin token exists: the configured one, or one generated on first start
/// and kept in the state directory (readable by root only), so a fresh gateway is never
/// open to anonymous admin actions.
fn admin_token(config: &GatewayConfig) -> anyhow::Result<String> {
    if let Some(t) = &config.admin_token {
        return Ok(t.clone());
    }
    let path = config.state_dir.join("admin.token");
    if let Ok(t) = std::fs::read_to_string(&path)
        && !t.trim().is_empty()
    {
        return Ok(t.trim().to_string());
    }
    use rand::Rng;
    let bytes: [u8; 24] = rand::rng().random();
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_secret_file(&path, &token)?;
    tracing::warn!(
        "FARMGATE_ADMIN_TOKEN is not set: generated an admin token in {}",
        path.display()
    );
    Ok(token)
}

/// The DUTs' network as read from `PRIVATE_INTERFACE` (its address, subnet, and the
/// DHCP settings derived from them), when that interface exists.
type PrivateNet = Result<
    farmgate_netboot::dhcp_server::DhcpServerConfig,
    farmgate_netboot::dhcp_server::DhcpServerError,
>;

fn private_net(config: &GatewayConfig) -> Option<PrivateNet> {
    std::path::Path::new("/sys/class/net")
        .join(&config.private_interface)
        .exists()
        .then(|| {
            farmgate_netboot::dhcp_server::DhcpServerConfig::from_interface(
                &config.private_interface,
                config.executor_port,
            )
        })
}

/// Who may use the DUT-facing endpoints: `FARMGATE_DUT_NETWORKS`, or loopback (QEMU
/// machines on user-mode networking, local tools) and `PRIVATE_INTERFACE`'s subnet.
fn dut_networks(
    config: &GatewayConfig,
    private: Option<&PrivateNet>,
) -> Vec<(std::net::IpAddr, u8)> {
    if let Some(n) = &config.dut_networks {
        return n.clone();
    }
    let mut nets = vec![
        (std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8),
        (std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), 128),
    ];
    if let Some(Ok(c)) = private {
        nets.push((std::net::IpAddr::V4(c.server_ip), c.prefix_len));
    }
    tracing::info!(
        ?nets,
        "DUT-facing endpoints answer these networks (FARMGATE_DUT_NETWORKS)"
    );
    nets
}

/// Binds a TCP listener of the gateway, naming the variable that chose the port.
async fn bind(
    config: &GatewayConfig,
    port: u16,
    variable: &str,
) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind((config.executor_host, port))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {}:{port} ({variable}; 0 turns this service off): {e}",
                config.executor_host
            )
        })
}

/// The S3 endpoint's admin credentials: `MINIO_ROOT_USER`/`MINIO_ROOT_PASSWORD`, or
/// generated on first start into the state directory (readable by root only), like the
/// admin token.
fn s3_admin_credentials(config: &GatewayConfig) -> anyhow::Result<(String, String)> {
    if let Some((u, p)) = &config.storage.s3_admin {
        return Ok((u.clone(), p.clone()));
    }
    let path = config.state_dir.join("s3-admin.credentials");
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Some((u, p)) = text.trim().split_once(':')
    {
        return Ok((u.to_string(), p.to_string()));
    }
    let creds = farmgate_s3::new_credentials();
    write_secret_file(&path, &format!("{}:{}", creds.access_key, creds.secret_key))?;
    tracing::warn!(
        "MINIO_ROOT_USER/MINIO_ROOT_PASSWORD are not set: generated the S3 admin credentials in {}",
        path.display()
    );
    Ok((creds.access_key, creds.secret_key))
}

/// Job share spaces in the embedded S3 store: a bucket and a key restricted to it.
struct S3JobStorage {
    store: farmgate_s3::S3Store,
    url: String,
}

impl farmgate_executor::jobspace::JobStorage for S3JobStorage {
    fn url_for_duts(&self) -> String {
        self.url.clone()
    }

    fn create_space(&self, bucket: &str) -> Result<(String, String), String> {
        self.store
            .create_bucket(bucket)
            .map_err(|e| e.to_string())?;
        let creds = farmgate_s3::new_credentials();
        let (access, secret) = (creds.access_key.clone(), creds.secret_key.clone());
        if let Err(e) = self.store.add_key(creds, vec![bucket.to_string()]) {
            let _ = self.store.delete_bucket_recursive(bucket);
            return Err(e.to_string());
        }
        Ok((access, secret))
    }

    fn import_archive(&self, bucket: &str, archive: &std::path::Path) -> Result<usize, String> {
        let file = std::fs::File::open(archive).map_err(|e| e.to_string())?;
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
        let mut count = 0;
        for entry in tar.entries().map_err(|e| format!("share archive: {e}"))? {
            let mut entry = entry.map_err(|e| format!("share archive: {e}"))?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let path = entry
                .path()
                .map_err(|e| format!("share archive: {e}"))?
                .to_string_lossy()
                .trim_start_matches("./")
                .to_string();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data)
                .map_err(|e| format!("share archive, {path}: {e}"))?;
            // The store refuses keys that would leave the bucket (`..`, absolute paths).
            self.store
                .put_object(bucket, &path, &data)
                .map_err(|e| format!("share archive, {path}: {e}"))?;
            count += 1;
        }
        Ok(count)
    }

    fn export_archive(&self, bucket: &str, archive: &std::path::Path) -> Result<usize, String> {
        let objects = self.store.list_objects(bucket).map_err(|e| e.to_string())?;
        let tmp = archive.with_extension("tmp");
        let file = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
            file,
            flate2::Compression::fast(),
        ));
        let spool = archive.with_extension("object");
        for (key, _) in &objects {
            // Each object through a spool file: the store may be local or remote.
            let mut f =
                std::fs::File::create(&spool).map_err(|e| format!("{}: {e}", spool.display()))?;
            self.store
                .read_object_to(bucket, key, &mut f)
                .map_err(|e| format!("{key}: {e}"))?;
            drop(f);
            tar.append_path_with_name(&spool, key)
                .map_err(|e| format!("{key}: {e}"))?;
        }
        let _ = std::fs::remove_file(&spool);
        tar.into_inner()
            .and_then(|gz| gz.finish())
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        // Complete or absent: a client never downloads half an archive.
        std::fs::rename(&tmp, archive).map_err(|e| format!("{}: {e}", archive.display()))?;
        Ok(objects.len())
    }

    fn remove_space(&self, bucket: &str, access_key: &str) -> Result<(), String> {
        let key = self.store.remove_key(access_key).map_err(|e| e.to_string());
        let bucket = self
            .store
            .delete_bucket_recursive(bucket)
            .map_err(|e| e.to_string());
        key.and(bucket)
    }
}

/// The iPXE binaries the DHCP server names for PXE firmware (`undionly.kpxe` for BIOS,
/// `ipxe.efi` for x86-64 EFI), copied into the TFTP root from Debian's `ipxe` package
/// when the root has none: an admin with real hardware needs nothing more. Files
/// already in the root are the admin's and are left alone.
fn provide_ipxe_binaries(root: &std::path::Path) {
    for name in ["undionly.kpxe", "ipxe.efi"] {
        let dest = root.join(name);
        let src = std::path::Path::new("/usr/lib/ipxe").join(name);
        if dest.exists() || !src.exists() {
            continue;
        }
        match std::fs::copy(&src, &dest) {
            Ok(_) => tracing::info!("TFTP root: added {name} from {}", src.display()),
            Err(e) => tracing::warn!("TFTP root: cannot copy {}: {e}", src.display()),
        }
    }
}

/// Largest `storage.tftp` file fetched from a URL for a DUT (TFTP transfers are slow;
/// big files belong in `storage.http`).
const MAX_TFTP_STORAGE: u64 = 256 << 20;

/// The TFTP server's overlay: a running job's `storage.tftp` files, for the DUT that has
/// the client's address (learnt from DHCP). Anything else falls through to the root.
fn tftp_storage(
    exec: Executor,
    dut_of_ip: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, String>>>,
) -> farmgate_netboot::Overlay {
    Arc::new(move |ip, name| {
        let exec = exec.clone();
        let mac = dut_of_ip.lock().ok().and_then(|m| m.get(&ip).cloned());
        Box::pin(async move {
            let mac = mac?;
            match exec.storage_file(&mac, true, &name).ok()? {
                farmgate_executor::storage::StorageContent::Data(bytes) => Some(bytes),
                farmgate_executor::storage::StorageContent::Url(url) => {
                    let r = reqwest::get(&url).await.ok()?;
                    if !r.status().is_success()
                        || r.content_length().unwrap_or(0) > MAX_TFTP_STORAGE
                    {
                        tracing::warn!(%mac, %url, status = %r.status(), "storage.tftp: cannot fetch");
                        return None;
                    }
                    let bytes = r.bytes().await.ok()?;
                    (bytes.len() as u64 <= MAX_TFTP_STORAGE).then(|| bytes.to_vec())
                }
            }
        })
    })
}

async fn serve(config: GatewayConfig) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            farmgate_executor::stop_requested().await;
            tracing::info!("shutting down (running jobs go on in their own processes)");
            shutdown.cancel();
        });
    }
    let private = private_net(&config);
    let tokens = farmgate_api::Tokens {
        admin: Some(admin_token(&config)?),
        submit: config.submit_token.clone(),
        dut_networks: dut_networks(&config, private.as_ref()),
    };
    let salad = farmgate_console::Salad::start(
        farmgate_console::SaladConfig {
            serial_globs: config.salad_serial_globs.clone(),
            rescan_interval: std::time::Duration::from_secs(1),
            bind_host: config.executor_host,
            baud: 115_200,
            tcpconsole_bind: (config.salad_tcpconsole_port != 0).then(|| {
                std::net::SocketAddr::new(config.executor_host, config.salad_tcpconsole_port)
            }),
        },
        shutdown.clone(),
    )
    .await?;
    // The embedded S3 endpoint, where every user job gets a bucket and a key.
    let s3 = if config.storage.s3_port == 0 {
        None
    } else {
        let (access_key, secret_key) = s3_admin_credentials(&config)?;
        let admin = farmgate_s3::Credentials {
            access_key,
            secret_key,
        };
        // With MINIO_URL, the objects live in that store; this endpoint checks the
        // keys (the admin's, the same as the store's, and the jobs' restricted ones)
        // and forwards there.
        let remote = config
            .storage
            .s3_remote_url
            .clone()
            .map(|url| farmgate_s3::RemoteStore {
                url,
                region: config.storage.s3_region.clone(),
                creds: admin.clone(),
            });
        if let Some(r) = &remote {
            tracing::info!(store = %r.url, "S3 objects are kept in the external store (MINIO_URL)");
        }
        let store = farmgate_s3::S3Store::open(farmgate_s3::S3Config {
            root: config.storage.s3_dir.clone(),
            region: config.storage.s3_region.clone(),
            admin,
            remote,
        })
        .map_err(|e| anyhow::anyhow!("S3 store (FARMGATE_S3_DIR): {e}"))?;
        let listener = bind(&config, config.storage.s3_port, "FARMGATE_S3_PORT").await?;
        let (router, sd) = (store.router(), shutdown.clone());
        tokio::spawn(
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { sd.cancelled().await })
                .into_future(),
        );
        Some(store)
    };
    let job_storage = s3.clone().map(|store| {
        Arc::new(S3JobStorage {
            store,
            url: config.storage.s3_url.clone(),
        }) as Arc<dyn farmgate_executor::jobspace::JobStorage>
    });
    let exec = Executor::start_with_storage(config.clone(), shutdown.clone(), job_storage).await?;
    // Certificates trusted for the caches' https upstreams, besides the usual roots.
    let extra_ca: Vec<Vec<u8>> = match &config.storage.extra_ca_file {
        Some(path) => vec![std::fs::read(path).map_err(|e| {
            anyhow::anyhow!(
                "FARMGATE_EXTRA_CA_FILE: cannot read {}: {e}",
                path.display()
            )
        })?],
        None => Vec::new(),
    };
    // The artifact cache, on the API port at /cache/<url>.
    let cache = farmgate_cache::ArtifactCache::open(farmgate_cache::CacheConfig {
        dir: config.storage.cache_dir.clone(),
        max_bytes: config.storage.cache_max_bytes,
        ttl: config.storage.cache_ttl,
        allow_hosts: config.storage.cache_allow_hosts.clone(),
        upstream_timeout: std::time::Duration::from_secs(30),
        extra_ca_pem: extra_ca.clone(),
    })
    .map_err(|e| anyhow::anyhow!("artifact cache (FARMGATE_CACHE_DIR): {e}"))?;
    // The OCI registry cache, on its own port.
    let registry = if config.storage.registry_port == 0 {
        None
    } else {
        let registry = farmgate_registry::RegistryCache::open(farmgate_registry::RegistryConfig {
            dir: config.storage.registry_dir.clone(),
            upstreams: config
                .storage
                .registry_upstreams
                .iter()
                .map(|(prefix, url)| farmgate_registry::Upstream {
                    prefix: prefix.clone(),
                    url: url.clone(),
                })
                .collect(),
            tag_ttl: config.storage.registry_tag_ttl,
            upstream_timeout: std::time::Duration::from_secs(30),
            max_size: config.storage.registry_max_bytes,
            extra_ca_pem: extra_ca.clone(),
        })
        .map_err(|e| anyhow::anyhow!("registry cache (FARMGATE_REGISTRY_DIR): {e}"))?;
        let listener = bind(
            &config,
            config.storage.registry_port,
            "FARMGATE_REGISTRY_PORT",
        )
        .await?;
        let local = listener.local_addr()?;
        let (router, sd) = (registry.router(), shutdown.clone());
        tokio::spawn(
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { sd.cancelled().await })
                .into_future(),
        );
        Some((local, registry))
    };
    // Every known machine has its console relay port from the start, so a job runner can
    // attach before a network console (a QEMU machine) ever printed its id.
    {
        let (exec, salad, sd) = (exec.clone(), salad.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            // The MaRS snapshot whose machines all have their ports: nothing to do until
            // the file (or a registration) gives a new one.
            let mut done: Option<Arc<farmgate_wire::MarsDb>> = None;
            loop {
                tokio::select! {
                    _ = sd.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let mars = exec.mars();
                if done.as_ref().is_some_and(|d| Arc::ptr_eq(d, &mars)) {
                    continue;
                }
                let mut all = true;
                for id in mars.duts.keys() {
                    if let Err(e) = salad.ensure_machine(id) {
                        tracing::debug!(machine = %id, "no console relay: {e}");
                        all = false;
                    }
                }
                done = all.then_some(mars);
            }
        });
    }
    let api = tokio::net::TcpListener::bind((config.executor_host, config.executor_port))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {}:{} (EXECUTOR_HOST/EXECUTOR_PORT): {e}",
                config.executor_host,
                config.executor_port
            )
        })?;
    let salad_listener = tokio::net::TcpListener::bind((config.executor_host, config.salad_port))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {}:{} (SALAD_PORT): {e}",
                config.executor_host,
                config.salad_port
            )
        })?;
    // Which DUT has which address on the private network (from the DHCP server), so the
    // TFTP server can serve a running job's `storage.tftp` files to its DUT.
    let dut_of_ip: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, String>>> =
        Arc::default();
    // Netboot: TFTP for firmware that cannot fetch its boot script over HTTP.
    let tftp = if config.boots_disable_servers {
        None
    } else {
        std::fs::create_dir_all(&config.boots_tftp_root).map_err(|e| {
            anyhow::anyhow!(
                "cannot create BOOTS_TFTP_ROOT {}: {e}",
                config.boots_tftp_root.display()
            )
        })?;
        provide_ipxe_binaries(&config.boots_tftp_root);
        let addr = std::net::SocketAddr::new(config.executor_host, config.boots_tftp_port);
        let server = farmgate_netboot::TftpServer::bind(addr, config.boots_tftp_root.clone())
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot serve TFTP on {addr} (BOOTS_TFTP_PORT): {e}; set BOOTS_DISABLE_SERVERS=1 to run without the netboot servers"
                )
            })?;
        let server = server.with_overlay(tftp_storage(exec.clone(), dut_of_ip.clone()));
        let local = server.local_addr()?;
        let sd = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = server.serve(sd).await {
                tracing::error!("TFTP server stopped: {e}");
            }
        });
        Some(local)
    };
    // SNTP for the DUTs' clocks (`b2c.ntp_peer=ci-gateway`). Not fatal: a host NTP
    // daemon may hold the port already, and DUTs can use another peer.
    let ntp = if config.boots_disable_servers || config.ntp_port == 0 {
        None
    } else {
        let addr = std::net::SocketAddr::new(config.executor_host, config.ntp_port);
        match tokio::net::UdpSocket::bind(addr).await {
            Ok(sock) => {
                let local = sock.local_addr()?;
                let sd = shutdown.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        r = farmgate_netboot::ntp::serve(sock, farmgate_netboot::ntp::DEFAULT_STRATUM) => {
                            if let Err(e) = r {
                                tracing::error!("NTP server stopped: {e}");
                            }
                        }
                        _ = sd.cancelled() => {}
                    }
                });
                Some(local)
            }
            Err(e) => {
                tracing::warn!(
                    "cannot serve NTP on {addr} (FARMGATE_NTP_PORT): {e}; DUTs asking ci-gateway for the time get no answer"
                );
                None
            }
        }
    };
    // DHCP on the DUTs' network, when there is one (PRIVATE_INTERFACE).
    let dhcp = if config.boots_disable_servers {
        None
    } else if let Some(private) = private {
        let mut cfg = private.map_err(|e| anyhow::anyhow!("DHCP on PRIVATE_INTERFACE: {e}"))?;
        cfg.leases_file = Some(config.state_dir.join("dhcp-leases.json"));
        let server = farmgate_netboot::dhcp_server::DhcpServer::bind(cfg)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot serve DHCP on {}: {e}; set BOOTS_DISABLE_SERVERS=1 to run without the netboot servers",
                    config.private_interface
                )
            })?;
        let local = server.local_addr()?;
        let (sd, exec, dut_of_ip) = (shutdown.clone(), exec.clone(), dut_of_ip.clone());
        tokio::spawn(async move {
            let seen = move |s: farmgate_netboot::dhcp_server::DhcpSeen| {
                if let Some(a) = s.address
                    && let Ok(mut map) = dut_of_ip.lock()
                {
                    map.insert(std::net::IpAddr::V4(a), s.mac.clone());
                }
                exec.note_dhcp_request(
                    &s.mac,
                    farmgate_executor::executor::DhcpClient::of(s.is_ipxe, s.arch),
                    s.address,
                );
            };
            if let Err(e) = server.serve(sd, seen).await {
                tracing::error!("DHCP server stopped: {e}");
            }
        });
        Some(local)
    } else {
        tracing::info!(
            "no interface {:?} (PRIVATE_INTERFACE): no DHCP served",
            config.private_interface
        );
        None
    };
    tracing::info!(
        farm = %config.farm_name,
        api = %api.local_addr()?,
        salad = %salad_listener.local_addr()?,
        tftp = ?tftp,
        dhcp = ?dhcp,
        ntp = ?ntp,
        network_consoles = ?salad.tcpconsole_addr(),
        s3 = ?s3.as_ref().map(|_| config.storage.s3_port),
        registry = ?registry.as_ref().map(|(addr, _)| addr),
        "farmgate is serving"
    );
    let sd = shutdown.clone();
    let salad_server = tokio::spawn(
        axum::serve(salad_listener, farmgate_api::salad_router(salad.clone()))
            .with_graceful_shutdown(async move { sd.cancelled().await })
            .into_future(),
    );
    let sd = shutdown.clone();
    axum::serve(
        api,
        cache
            .router()
            .merge(farmgate_api::executor_router(
                exec,
                tokens,
                farmgate_api::Extras {
                    cache: Some(cache.clone()),
                    salad: Some(salad.clone()),
                    registry: registry.map(|(_, r)| r),
                    ui_vendor_dir: config.ui_vendor_dir.clone(),
                },
            ))
            .into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move { sd.cancelled().await })
    .await?;
    let _ = salad_server.await;
    Ok(())
}
