//! Netboot services for DUTs: a read-only TFTP server for firmware that cannot fetch over
//! HTTP (it fetches iPXE over TFTP, and iPXE then continues over HTTP), and a DHCPv4 server
//! ([`dhcp_server`]) that tells PXE firmware which iPXE binary to fetch and tells iPXE the
//! URL of its boot script.
//!
//! The TFTP server:
//!
//! * RFC 1350 read requests in `octet` and `netascii` mode. `netascii` files are served
//!   as-is (no LF → CR LF translation): boot files are binary, and every client in practice
//!   asks for `octet`. `mail` mode is refused with ERROR 4.
//! * Write requests are refused with ERROR 2 "access violation: this server is read-only".
//! * Options (RFC 2347): `blksize` (RFC 2348), `tsize` and `timeout` (RFC 2349) and
//!   `windowsize` (RFC 7440) are negotiated and answered with an OACK that the client
//!   acknowledges with ACK 0; unknown options are ignored.
//! * Each request is served from its own task on a fresh ephemeral UDP socket (a new
//!   transfer ID, as RFC 1350 asks). Block numbers wrap around from 65535 to 0. On timeout
//!   (1 s, or the negotiated `timeout`) the unacknowledged window is sent again, up to
//!   [`MAX_RETRIES`] times, then the transfer is abandoned. The file is read in 256 KiB
//!   chunks and DATA packet buffers are reused, so a block costs no allocation and no
//!   blocking-pool round trip.
//! * Names are resolved below the root by [`resolve`], which refuses `..`, NUL, backslashes
//!   and anything (including symlinks) that ends up outside the root.
//!
//! [`dhcp`] parses and encodes DHCPv4 messages (no I/O); [`dhcp_server`] serves them.
//!
//! The `farmgate-netboot-serve` binary of this package is a test and benchmark helper: it
//! runs both servers on an interface (or the TFTP server alone), and has a `probe`
//! subcommand that sends one DHCP DISCOVER (optionally followed by a REQUEST) and prints
//! the answer.

pub mod dhcp;
pub mod dhcp_server;
pub mod ntp;
pub mod packet;

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use packet::{ErrorCode, Mode, Packet, Request, TftpOption};

/// How many times the last DATA (or OACK) is sent again before a transfer is abandoned.
pub const MAX_RETRIES: u32 = 5;
/// Retransmission timeout when the client did not negotiate one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a requested file name was refused by [`resolve`].
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// The name is empty (or only slashes).
    #[error("empty file name")]
    Empty,
    /// The name contains a NUL byte.
    #[error("file name `{0}` contains NUL")]
    Nul(String),
    /// The name contains a backslash.
    #[error("file name `{0}` contains a backslash")]
    Backslash(String),
    /// The name has a `..` (or other non-plain) component.
    #[error("file name `{0}` has a `..` component")]
    ParentComponent(String),
    /// The name resolves (through a symlink) outside the root.
    #[error("file name `{0}` resolves outside the root")]
    OutsideRoot(String),
    /// No such file below the root.
    #[error("file `{0}` not found")]
    NotFound(String),
    /// The root itself or the file could not be examined.
    #[error("file `{name}`: {source}")]
    Io {
        /// The requested name.
        name: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl PathError {
    /// The TFTP error this refusal is answered with.
    pub fn to_packet(&self) -> Packet {
        match self {
            PathError::NotFound(_) => Packet::Error {
                code: ErrorCode::FileNotFound,
                message: "file not found".into(),
            },
            PathError::Io { .. } => Packet::Error {
                code: ErrorCode::NotDefined,
                message: "cannot read the file".into(),
            },
            _ => Packet::Error {
                code: ErrorCode::AccessViolation,
                message: "access violation".into(),
            },
        }
    }
}

/// Resolves `requested` (a TFTP file name) below `root` and returns its canonical path.
///
/// Leading `/` are stripped; names with NUL, a backslash or a `..` component are refused;
/// the joined path is canonicalized (following symlinks) and must lie below the canonical
/// root, so a symlink leading out of the root is refused with [`PathError::OutsideRoot`].
pub fn resolve(root: &Path, requested: &str) -> Result<PathBuf, PathError> {
    if requested.contains('\0') {
        return Err(PathError::Nul(requested.to_string()));
    }
    if requested.contains('\\') {
        return Err(PathError::Backslash(requested.to_string()));
    }
    let relative = Path::new(requested.trim_start_matches('/'));
    let mut plain = false;
    for c in relative.components() {
        match c {
            Component::Normal(_) => plain = true,
            Component::CurDir => {}
            _ => return Err(PathError::ParentComponent(requested.to_string())),
        }
    }
    if !plain {
        return Err(PathError::Empty);
    }
    let io_err = |source: io::Error| PathError::Io {
        name: requested.to_string(),
        source,
    };
    let canonical_root = root.canonicalize().map_err(io_err)?;
    let full = canonical_root.join(relative);
    let canonical = match full.canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Includes a dangling symlink: nothing is served either way.
            return Err(PathError::NotFound(requested.to_string()));
        }
        Err(e) => return Err(io_err(e)),
    };
    if !canonical.starts_with(&canonical_root) {
        return Err(PathError::OutsideRoot(requested.to_string()));
    }
    Ok(canonical)
}

/// A bound, not yet serving, TFTP server.
pub struct TftpServer {
    socket: std::net::UdpSocket,
    root: PathBuf,
    overlay: Option<Overlay>,
}

impl std::fmt::Debug for TftpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TftpServer")
            .field("socket", &self.socket)
            .field("root", &self.root)
            .field("overlay", &self.overlay.is_some())
            .finish()
    }
}

/// Files served before the root is looked at: given the client's address and the
/// requested name, the content to send, or `None` to look in the root. The gateway uses
/// it for a running job's `storage.tftp` files (the client's address tells which DUT).
pub type Overlay = std::sync::Arc<
    dyn Fn(
            IpAddr,
            String,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<Vec<u8>>> + Send>>
        + Send
        + Sync,
>;

/// What a transfer reads from: a file of the root or an overlay's content.
type Source = tokio::io::BufReader<Box<dyn tokio::io::AsyncRead + Unpin + Send>>;

impl TftpServer {
    /// Binds the listening socket on `addr` (port 69 in production, `:0` in tests) and
    /// serves files below `root`, which must be an existing directory.
    pub fn bind(addr: SocketAddr, root: PathBuf) -> io::Result<TftpServer> {
        let root = root
            .canonicalize()
            .map_err(|e| io::Error::new(e.kind(), format!("TFTP root {}: {e}", root.display())))?;
        if !root.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("TFTP root {} is not a directory", root.display()),
            ));
        }
        let socket = std::net::UdpSocket::bind(addr)?;
        socket.set_nonblocking(true)?;
        Ok(TftpServer {
            socket,
            root,
            overlay: None,
        })
    }

    /// Serves what `overlay` returns before looking in the root (see [`Overlay`]).
    pub fn with_overlay(mut self, overlay: Overlay) -> TftpServer {
        self.overlay = Some(overlay);
        self
    }

    /// The address the listening socket is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Serves requests until `cancel` is cancelled; running transfers are cancelled too.
    pub async fn serve(self, cancel: CancellationToken) -> io::Result<()> {
        let socket = UdpSocket::from_std(self.socket)?;
        let local_ip = socket.local_addr()?.ip();
        let mut buf = vec![0u8; 65536];
        loop {
            let Some((len, peer)) = recv_or_cancel(&socket, &mut buf, &cancel, "tftp").await else {
                return Ok(());
            };
            let datagram = buf.get(..len).unwrap_or(&[]);
            match packet::parse(datagram) {
                Ok(Packet::Rrq(req)) => {
                    let root = self.root.clone();
                    let overlay = self.overlay.clone();
                    let cancel = cancel.child_token();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = cancel.cancelled() => {}
                            r = transfer(local_ip, peer, root, overlay, req) => {
                                if let Err(e) = r {
                                    tracing::warn!("tftp: transfer to {peer}: {e}");
                                }
                            }
                        }
                    });
                }
                Ok(Packet::Wrq(req)) => {
                    tracing::info!("tftp: {peer} asked to write {}: refused", req.filename);
                    tokio::spawn(async move {
                        let error = Packet::Error {
                            code: ErrorCode::AccessViolation,
                            message: "access violation: this server is read-only".into(),
                        };
                        if let Err(e) = reply_once(local_ip, peer, &error).await {
                            tracing::debug!("tftp: error reply to {peer}: {e}");
                        }
                    });
                }
                Ok(Packet::Error { .. }) => {}
                Ok(other) => {
                    tracing::debug!("tftp: {peer} sent {other:?} to the request port");
                    let error = Packet::Error {
                        code: ErrorCode::IllegalOperation,
                        message: "illegal operation: expected a read request".into(),
                    };
                    let _ = socket.send_to(&error.encode(), peer).await;
                }
                Err(e) => {
                    tracing::debug!("tftp: bad packet from {peer}: {e}");
                    let error = Packet::Error {
                        code: ErrorCode::IllegalOperation,
                        message: format!("illegal operation: {e}"),
                    };
                    let _ = socket.send_to(&error.encode(), peer).await;
                }
            }
        }
    }
}

/// A fresh socket (new transfer ID) of the same family as the listening address.
async fn ephemeral_socket(local_ip: IpAddr) -> io::Result<UdpSocket> {
    let ip = if local_ip.is_unspecified() {
        match local_ip {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    } else {
        local_ip
    };
    UdpSocket::bind(SocketAddr::new(ip, 0)).await
}

async fn reply_once(local_ip: IpAddr, peer: SocketAddr, packet: &Packet) -> io::Result<()> {
    let socket = ephemeral_socket(local_ip).await?;
    socket.send_to(&packet.encode(), peer).await?;
    Ok(())
}

/// Why a transfer ended early.
#[derive(Debug, thiserror::Error)]
enum TransferError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("no acknowledgement after {MAX_RETRIES} retransmissions")]
    TimedOut,
    #[error("client sent error {code}: {message}")]
    ClientError { code: u16, message: String },
    #[error("refused: {0}")]
    Refused(String),
}

/// How much of the file is read at a time (one blocking read per this many bytes, instead
/// of one per block).
const READ_CHUNK: usize = 256 * 1024;

/// Fills `buf` (fewer bytes only at end of file); returns how many bytes were read.
async fn read_full(file: &mut Source, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while let Some(rest) = buf.get_mut(filled..).filter(|r| !r.is_empty()) {
        let n = file.read(rest).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// Reads the next DATA packet (block number `block`, at most `blksize` bytes of data) into
/// `out`, reusing its allocation; returns the number of data bytes.
async fn read_data_packet(
    file: &mut Source,
    out: &mut Vec<u8>,
    block: u16,
    blksize: usize,
) -> io::Result<usize> {
    out.clear();
    out.extend_from_slice(&packet::OP_DATA.to_be_bytes());
    out.extend_from_slice(&block.to_be_bytes());
    out.resize(4 + blksize, 0);
    let n = read_full(file, out.get_mut(4..).unwrap_or(&mut [])).await?;
    out.truncate(4 + n);
    Ok(n)
}

async fn transfer(
    local_ip: IpAddr,
    peer: SocketAddr,
    root: PathBuf,
    overlay: Option<Overlay>,
    req: Request,
) -> Result<(), TransferError> {
    let socket = ephemeral_socket(local_ip).await?;
    socket.connect(peer).await?;
    let refuse = |packet: Packet, why: String| {
        let bytes = packet.encode();
        let socket = &socket;
        async move {
            let _ = socket.send(&bytes).await;
            Err::<(), _>(TransferError::Refused(why))
        }
    };
    if req.mode == Mode::Mail {
        return refuse(
            Packet::Error {
                code: ErrorCode::IllegalOperation,
                message: "illegal operation: mail mode is not supported".into(),
            },
            "mail mode".into(),
        )
        .await;
    }
    let overlaid = match &overlay {
        Some(o) => o(peer.ip(), req.filename.clone()).await,
        None => None,
    };
    let (reader, len, shown): (Box<dyn tokio::io::AsyncRead + Unpin + Send>, u64, String) =
        match overlaid {
            Some(content) => {
                let len = content.len() as u64;
                (
                    Box::new(std::io::Cursor::new(content)),
                    len,
                    format!("{} (job storage)", req.filename),
                )
            }
            None => {
                let path = match resolve(&root, &req.filename) {
                    Ok(p) => p,
                    Err(e) => return refuse(e.to_packet(), e.to_string()).await,
                };
                let file = match tokio::fs::File::open(&path).await {
                    Ok(f) => f,
                    Err(e) => {
                        let p = PathError::Io {
                            name: req.filename.clone(),
                            source: e,
                        };
                        return refuse(p.to_packet(), p.to_string()).await;
                    }
                };
                let meta = file.metadata().await?;
                if !meta.is_file() {
                    return refuse(
                        Packet::Error {
                            code: ErrorCode::FileNotFound,
                            message: "file not found".into(),
                        },
                        format!("{} is not a regular file", req.filename),
                    )
                    .await;
                }
                (Box::new(file), meta.len(), path.display().to_string())
            }
        };

    // Negotiate.
    let mut blksize = usize::from(packet::DEFAULT_BLKSIZE);
    let mut timeout = DEFAULT_TIMEOUT;
    let mut window = 1usize;
    let mut accepted = Vec::new();
    for o in &req.options {
        match o {
            TftpOption::BlkSize(b) => {
                blksize = usize::from(*b);
                accepted.push(o.clone());
            }
            // curl refuses an OACK with `tsize 0`; for an empty file the option is simply
            // not acknowledged (RFC 2347 lets a server leave out any option).
            TftpOption::TSize(_) if len > 0 => {
                accepted.push(TftpOption::TSize(len));
            }
            TftpOption::TSize(_) => {}
            TftpOption::Timeout(t) => {
                timeout = Duration::from_secs(u64::from(*t));
                accepted.push(o.clone());
            }
            TftpOption::WindowSize(w) => {
                window = usize::from(*w);
                accepted.push(o.clone());
            }
            TftpOption::Unknown { .. } => {}
        }
    }
    tracing::info!(
        "tftp: sending {shown} ({len} bytes, blksize {blksize}, window {window}) to {peer}"
    );

    let mut buf = vec![0u8; 65536];
    if !accepted.is_empty() {
        let oack = VecDeque::from([Packet::Oack(accepted).encode()]);
        exchange(&socket, &mut buf, timeout, &oack, |ack| {
            (ack == 0).then_some(1)
        })
        .await?;
    }

    let mut file: Source = tokio::io::BufReader::with_capacity(READ_CHUNK.max(blksize), reader);
    // `pending` holds the sent, unacknowledged DATA packets; `base` is the number (not
    // wrapped) of its first one. Acknowledged packets go to `spare` for reuse.
    let mut pending: VecDeque<Vec<u8>> = VecDeque::with_capacity(window);
    let mut spare: Vec<Vec<u8>> = Vec::with_capacity(window);
    let mut base: u64 = 1;
    let mut last_read = false;
    loop {
        while pending.len() < window && !last_read {
            let mut packet = spare.pop().unwrap_or_default();
            let block = (base + pending.len() as u64) as u16;
            let n = read_data_packet(&mut file, &mut packet, block, blksize).await?;
            last_read = n < blksize;
            pending.push_back(packet);
        }
        if pending.is_empty() {
            return Ok(());
        }
        let first = base;
        let count = pending.len();
        let acked = exchange(&socket, &mut buf, timeout, &pending, |ack| {
            (0..count as u64)
                .find(|i| (first + i) as u16 == ack)
                .map(|i| i as usize + 1)
        })
        .await?;
        spare.extend(pending.drain(..acked));
        base += acked as u64;
    }
}

/// Sends `packets`, then waits for an ACK that `accept` maps to a number of acknowledged
/// packets; sends them all again on timeout, up to [`MAX_RETRIES`] times.
async fn exchange(
    socket: &UdpSocket,
    buf: &mut [u8],
    timeout: Duration,
    packets: &VecDeque<Vec<u8>>,
    accept: impl Fn(u16) -> Option<usize>,
) -> Result<usize, TransferError> {
    for _attempt in 0..=MAX_RETRIES {
        for p in packets {
            socket.send(p).await?;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let len = match tokio::time::timeout_at(deadline, socket.recv(buf)).await {
                Err(_) => break,
                Ok(Ok(len)) => len,
                // e.g. ICMP port unreachable: the client went away.
                Ok(Err(e)) => return Err(e.into()),
            };
            match packet::parse(buf.get(..len).unwrap_or(&[])) {
                Ok(Packet::Ack { block }) => {
                    if let Some(n) = accept(block) {
                        return Ok(n);
                    }
                    // A duplicate or stale ACK: ignore it (no Sorcerer's Apprentice).
                }
                Ok(Packet::Error { code, message }) => {
                    return Err(TransferError::ClientError {
                        code: code.code(),
                        message,
                    });
                }
                Ok(other) => tracing::debug!("tftp: unexpected {other:?} during a transfer"),
                Err(e) => tracing::debug!("tftp: bad packet during a transfer: {e}"),
            }
        }
    }
    Err(TransferError::TimedOut)
}

/// The next datagram of a server socket, or `None` once `cancel` fires. Receive errors
/// (ICMP port unreachable and the like surface here on some systems) are logged at
/// debug level and skipped: a server never stops on a client's behaviour.
pub(crate) async fn recv_or_cancel(
    socket: &UdpSocket,
    buf: &mut [u8],
    cancel: &CancellationToken,
    what: &str,
) -> Option<(usize, SocketAddr)> {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return None,
            r = socket.recv_from(buf) => match r {
                Ok(x) => return Some(x),
                Err(e) => tracing::debug!("{what}: recv_from: {e}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_accepts_plain_names_and_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("ipxe")).unwrap();
        std::fs::write(root.join("ipxe/undionly.kpxe"), b"x").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("out")).unwrap();
        std::os::unix::fs::symlink("ipxe/undionly.kpxe", root.join("in")).unwrap();
        let croot = root.canonicalize().unwrap();

        let ok = resolve(&root, "/ipxe/undionly.kpxe").unwrap();
        assert_eq!(ok, croot.join("ipxe/undionly.kpxe"));
        assert_eq!(resolve(&root, "ipxe/./undionly.kpxe").unwrap(), ok);
        assert_eq!(resolve(&root, "//in").unwrap(), ok);

        let refused = |name: &str| resolve(&root, name).unwrap_err().to_string();
        assert_eq!(
            refused("../secret"),
            "file name `../secret` has a `..` component"
        );
        assert_eq!(
            refused("ipxe/../../secret"),
            "file name `ipxe/../../secret` has a `..` component"
        );
        assert_eq!(refused("a\\b"), "file name `a\\b` contains a backslash");
        assert_eq!(refused("a\0b"), "file name `a\0b` contains NUL");
        assert_eq!(refused("out"), "file name `out` resolves outside the root");
        assert_eq!(refused("/"), "empty file name");
        assert_eq!(refused(""), "empty file name");
        assert_eq!(refused("nope"), "file `nope` not found");
        assert!(matches!(
            resolve(&root, "out").unwrap_err().to_packet(),
            Packet::Error {
                code: ErrorCode::AccessViolation,
                ..
            }
        ));
        assert!(matches!(
            resolve(&root, "nope").unwrap_err().to_packet(),
            Packet::Error {
                code: ErrorCode::FileNotFound,
                ..
            }
        ));
    }
}
