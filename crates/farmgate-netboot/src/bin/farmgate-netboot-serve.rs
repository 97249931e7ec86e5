//! Test and benchmark helper for farmgate-netboot (not used by the gateway itself).
//!
//! ```text
//! farmgate-netboot-serve [--interface IF --http-port N [--leases FILE]]
//!                        [--tftp-root DIR [--tftp-listen ADDR]]
//! farmgate-netboot-serve probe --interface IF --mac MAC [--pxe-arch N] [--ipxe]
//!                        [--request] [--timeout-ms N]
//! ```
//!
//! Serving: with `--interface`, runs the DHCP server configured by
//! `DhcpServerConfig::from_interface`; with `--tftp-root`, runs the TFTP server (default
//! `0.0.0.0:69`). Prints `dhcp <addr>` / `tftp <addr>`, then `ready`, then one
//! `seen mac=… type=… address=… boot_file=…` line per DHCP request, on stdout, until killed.
//!
//! Probing: sends a DHCP DISCOVER from port 68 of interface IF with chaddr MAC (as PXE
//! firmware of architecture N, or as iPXE), prints `offer address=… siaddr=… file=…`; with
//! `--request`, then requests that address and prints `ack address=…`. Exits with status 1
//! when no answer came in time.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use farmgate_netboot::TftpServer;
use farmgate_netboot::dhcp::{self, DhcpMessage, MessageType};
use farmgate_netboot::dhcp_server::{DhcpServer, DhcpServerConfig};
use tokio_util::sync::CancellationToken;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// `--name value` pairs and bare `--flag`s.
struct Args(Vec<String>);

impl Args {
    fn value(&self, name: &str) -> Option<&str> {
        let i = self.0.iter().position(|a| a == name)?;
        self.0.get(i + 1).map(String::as_str)
    }
    fn flag(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
    }
    fn parsed<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, Error>
    where
        T::Err: std::fmt::Display,
    {
        self.value(name)
            .map(|v| {
                v.parse::<T>()
                    .map_err(|e| Error::from(format!("{name} {v}: {e}")))
            })
            .transpose()
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("farmgate-netboot-serve: tokio runtime: {e}");
            std::process::exit(2);
        }
    };
    let result = if args.first().map(String::as_str) == Some("probe") {
        runtime.block_on(probe(Args(args[1..].to_vec())))
    } else {
        runtime.block_on(serve(Args(args)))
    };
    if let Err(e) = result {
        eprintln!("farmgate-netboot-serve: {e}");
        std::process::exit(1);
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn serve(args: Args) -> Result<(), Error> {
    let cancel = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(root) = args.value("--tftp-root") {
        let listen: SocketAddr = args
            .parsed("--tftp-listen")?
            .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 69)));
        let server = TftpServer::bind(listen, PathBuf::from(root))?;
        say(&format!("tftp {}", server.local_addr()?));
        tasks.spawn(server.serve(cancel.clone()));
    }
    if let Some(interface) = args.value("--interface") {
        let http_port: u16 = args.parsed("--http-port")?.unwrap_or(80);
        let mut cfg = DhcpServerConfig::from_interface(interface, http_port)?;
        cfg.leases_file = args.value("--leases").map(PathBuf::from);
        let server = DhcpServer::bind(cfg).await?;
        say(&format!("dhcp {}", server.local_addr()?));
        tasks.spawn(server.serve(cancel.clone(), |s| {
            say(&format!(
                "seen mac={} type={} arch={} ipxe={} address={} boot_file={}",
                s.mac,
                s.message,
                s.arch.map_or("-".into(), |a| a.to_string()),
                s.is_ipxe,
                s.address.map_or("-".into(), |a| a.to_string()),
                s.boot_file.as_deref().unwrap_or("-"),
            ))
        }));
    }
    if tasks.is_empty() {
        return Err("nothing to serve: give --tftp-root and/or --interface".into());
    }
    say("ready");
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

fn parse_mac(text: &str) -> Result<[u8; 6], Error> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("--mac {text}: {e}"))?;
    bytes
        .try_into()
        .map_err(|_| format!("--mac {text}: not 6 bytes").into())
}

async fn probe(args: Args) -> Result<(), Error> {
    let interface = args.value("--interface").ok_or("probe needs --interface")?;
    let mac = parse_mac(args.value("--mac").ok_or("probe needs --mac")?)?;
    let timeout = Duration::from_millis(args.parsed("--timeout-ms")?.unwrap_or(5000));
    let server_port: u16 = args.parsed("--port")?.unwrap_or(67);

    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_broadcast(true)?;
    socket.bind_device(Some(interface.as_bytes()))?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68)).into())?;
    let socket = tokio::net::UdpSocket::from_std(socket.into())?;
    let to = SocketAddr::from((Ipv4Addr::BROADCAST, server_port));

    let xid = std::process::id() ^ 0x5a5a_0000;
    let mut discover = DhcpMessage::new(dhcp::BOOTREQUEST);
    discover.htype = dhcp::HTYPE_ETHERNET;
    discover.hlen = 6;
    discover.xid = xid;
    discover.flags = dhcp::FLAG_BROADCAST;
    discover.chaddr[..6].copy_from_slice(&mac);
    discover.set_message_type(MessageType::Discover);
    if let Some(arch) = args.parsed::<u16>("--pxe-arch")? {
        discover.set_vendor_class(&format!("PXEClient:Arch:{arch:05}:UNDI:002001"));
        discover.set_option(dhcp::OPT_CLIENT_ARCH, &arch.to_be_bytes())?;
    }
    if args.flag("--ipxe") {
        discover.set_option(dhcp::OPT_USER_CLASS, b"iPXE")?;
    }

    let offer = exchange(&socket, to, &discover, MessageType::Offer, timeout).await?;
    say(&format!(
        "offer address={} siaddr={} file={}",
        offer.yiaddr,
        offer.siaddr,
        offer.boot_file().unwrap_or_else(|| "-".into())
    ));
    if args.flag("--request") {
        let mut request = discover.clone();
        request.set_message_type(MessageType::Request);
        request.set_option(dhcp::OPT_REQUESTED_IP, &offer.yiaddr.octets())?;
        if let Some(server) = offer.server_id() {
            request.set_server_id(server);
        }
        let ack = exchange(&socket, to, &request, MessageType::Ack, timeout).await?;
        say(&format!("ack address={}", ack.yiaddr));
    }
    Ok(())
}

/// Sends `msg` and waits (at most `timeout`) for a reply of type `want` with its xid; a NAK
/// ends the wait with an error.
async fn exchange(
    socket: &tokio::net::UdpSocket,
    to: SocketAddr,
    msg: &DhcpMessage,
    want: MessageType,
    timeout: Duration,
) -> Result<DhcpMessage, Error> {
    socket.send_to(&msg.encode(), to).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    loop {
        let (len, _) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf))
            .await
            .map_err(|_| format!("no {want} within {timeout:?}"))??;
        let Ok(reply) = dhcp::parse(buf.get(..len).unwrap_or(&[])) else {
            continue;
        };
        if reply.op != dhcp::BOOTREPLY || reply.xid != msg.xid {
            continue;
        }
        match reply.message_type() {
            Some(t) if t == want => return Ok(reply),
            Some(MessageType::Nak) => return Err(format!("got DHCPNAK instead of {want}").into()),
            _ => continue,
        }
    }
}
