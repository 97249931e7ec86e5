//! DHCPv4 messages (RFC 2131, options of RFC 2132): pure parsing and encoding, no I/O.
//!
//! A [`DhcpMessage`] holds the fixed BOOTP header and the options in the order they came.
//! Typed accessors read the options a netboot server needs: the message type (53), the
//! requested address (50), the PXE client architecture (93, RFC 4578), the user class (77,
//! where iPXE says `iPXE`), the vendor class (60, `PXEClient:Arch:…`), the host name (12)
//! and the parameter request list (55). [`DhcpMessage::reply`] and its setters build an
//! OFFER, ACK or NAK for a request.
//!
//! Parsing rules:
//!
//! * [`parse`] never panics: every malformed input gives a [`DhcpError`] that says what is
//!   wrong and at which byte offset.
//! * Pad options (0) are skipped; parsing stops at the end option (255) and ignores the
//!   bytes after it (usually padding). A message whose options run to the end of the
//!   datagram without an end option is accepted.
//! * An option that appears several times is kept as several entries; [`DhcpMessage::option`]
//!   returns their concatenation, as RFC 3396 asks for long options split into pieces.
//! * Option overload (52) is not interpreted: the `sname` and `file` header fields are
//!   always kept as the raw 64 and 128 bytes, and option 52 is kept like any other option.
//!   Netboot clients do not overload these fields in practice.
//!
//! [`DhcpMessage::encode`] writes the options in order (never longer than 255 bytes each:
//! the setters split longer data into several entries) followed by the end option, and pads
//! the message with zeros to the 300-byte minimum of BOOTP. Encoding a parsed message and
//! parsing it again gives an equal message.

use std::borrow::Cow;
use std::net::Ipv4Addr;

pub use farmgate_wire::dhcp::{
    ARCH_ARM32_EFI, ARCH_ARM64_EFI, ARCH_X86_64_EFI, ARCH_X86_64_EFI_ALT, ARCH_X86_BIOS,
    ARCH_X86_EFI, BOOTREPLY, BOOTREQUEST, COOKIE_OFFSET, FLAG_BROADCAST, HTYPE_ETHERNET,
    MAGIC_COOKIE, MIN_MESSAGE_LEN, MessageType, OPT_BOOT_FILE, OPT_CLIENT_ARCH, OPT_DNS, OPT_END,
    OPT_HOSTNAME, OPT_IPXE_ENCAP, OPT_LEASE_TIME, OPT_MESSAGE_TYPE, OPT_OVERLOAD, OPT_PAD,
    OPT_PARAMETER_REQUEST_LIST, OPT_REQUESTED_IP, OPT_ROUTER, OPT_SERVER_ID, OPT_SUBNET_MASK,
    OPT_TFTP_SERVER_NAME, OPT_USER_CLASS, OPT_VENDOR_CLASS, OPTIONS_OFFSET,
};
use farmgate_wire::dhcp::{CHADDR_OFFSET, FILE_OFFSET, OptionError, SNAME_OFFSET, XID_OFFSET};

/// Why a datagram is not a DHCP message, or an option cannot be set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DhcpError {
    /// The datagram ends inside the fixed header or the magic cookie.
    #[error(
        "truncated message: {len} bytes, but the fixed BOOTP header and magic cookie need {OPTIONS_OFFSET}"
    )]
    Truncated {
        /// Length of the datagram.
        len: usize,
    },
    /// `hlen` is larger than the 16-byte `chaddr` field.
    #[error("hlen at offset 2: {hlen} is larger than the 16-byte chaddr field")]
    HardwareAddressTooLong {
        /// The `hlen` found.
        hlen: u8,
    },
    /// The magic cookie is not 99.130.83.99.
    #[error(
        "magic cookie at offset {COOKIE_OFFSET}: {}.{}.{}.{} instead of 99.130.83.99",
        found[0], found[1], found[2], found[3]
    )]
    BadCookie {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// The datagram ends right after an option code, before its length byte.
    #[error("option {code} at offset {offset}: the length byte is missing at the end")]
    MissingLength {
        /// The option code.
        code: u8,
        /// Offset of the option code.
        offset: usize,
    },
    /// An option's length runs past the end of the datagram.
    #[error(
        "option {code} at offset {offset}: length {len} runs past the end (the message is {total} bytes)"
    )]
    OptionPastEnd {
        /// The option code.
        code: u8,
        /// Offset of the option code.
        offset: usize,
        /// The length byte.
        len: u8,
        /// Length of the datagram.
        total: usize,
    },
    /// Pad (0) and end (255) carry no data and cannot be set as options.
    #[error("option {0} cannot be set: codes 0 (pad) and 255 (end) carry no data")]
    ReservedOptionCode(u8),
}

/// One option as it appears on the wire: a code (never 0 or 255) and at most 255 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpOption {
    /// The option code.
    pub code: u8,
    /// The option data (at most 255 bytes).
    pub data: Vec<u8>,
}

/// A DHCPv4 message: the fixed BOOTP header and the options.
///
/// The header fields are public. `hlen` must stay at most 16 for [`encode`](Self::encode)
/// to produce a message that [`parse`] accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpMessage {
    /// 1 (BOOTREQUEST) from a client, 2 (BOOTREPLY) from a server.
    pub op: u8,
    /// Hardware address type (1: Ethernet).
    pub htype: u8,
    /// Hardware address length (6 for Ethernet, at most 16).
    pub hlen: u8,
    /// Relay agent hops.
    pub hops: u8,
    /// Transaction ID chosen by the client.
    pub xid: u32,
    /// Seconds since the client started.
    pub secs: u16,
    /// Flags; the top bit ([`FLAG_BROADCAST`]) asks for a broadcast reply.
    pub flags: u16,
    /// Client address (when it already has one).
    pub ciaddr: Ipv4Addr,
    /// "Your" address: the address given to the client.
    pub yiaddr: Ipv4Addr,
    /// Next server to boot from (the TFTP server).
    pub siaddr: Ipv4Addr,
    /// Relay agent address.
    pub giaddr: Ipv4Addr,
    /// Client hardware address; its first `hlen` bytes count.
    pub chaddr: [u8; 16],
    /// Server host name field, raw (NUL-terminated text in practice).
    pub sname: [u8; 64],
    /// Boot file name field, raw (NUL-terminated text in practice).
    pub file: [u8; 128],
    options: Vec<DhcpOption>,
}

fn ipv4_at(data: &[u8], offset: usize) -> Ipv4Addr {
    let mut b = [0u8; 4];
    if let Some(s) = data.get(offset..offset + 4) {
        b.copy_from_slice(s);
    }
    Ipv4Addr::from(b)
}

fn array_at<const N: usize>(data: &[u8], offset: usize) -> [u8; N] {
    let mut b = [0u8; N];
    if let Some(s) = data.get(offset..offset + N) {
        b.copy_from_slice(s);
    }
    b
}

/// Text up to the first NUL (lossy UTF-8), `None` when empty.
fn c_string(field: &[u8]) -> Option<String> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let text = field.get(..end).unwrap_or(&[]);
    (!text.is_empty()).then(|| String::from_utf8_lossy(text).into_owned())
}

/// Writes `text` NUL-terminated into `field` if it fits (with its NUL), else zeroes it.
fn set_c_string(field: &mut [u8], text: &str) {
    field.fill(0);
    let bytes = text.as_bytes();
    if bytes.len() < field.len()
        && let Some(dst) = field.get_mut(..bytes.len())
    {
        dst.copy_from_slice(bytes);
    }
}

/// Parses a DHCPv4 message (a UDP payload). Never panics.
pub fn parse(data: &[u8]) -> Result<DhcpMessage, DhcpError> {
    if data.len() < OPTIONS_OFFSET {
        return Err(DhcpError::Truncated { len: data.len() });
    }
    let [op, htype, hlen, hops] = array_at::<4>(data, 0);
    if hlen > 16 {
        return Err(DhcpError::HardwareAddressTooLong { hlen });
    }
    let cookie = array_at::<4>(data, COOKIE_OFFSET);
    if cookie != MAGIC_COOKIE {
        return Err(DhcpError::BadCookie { found: cookie });
    }
    let area = data.get(OPTIONS_OFFSET..).unwrap_or(&[]);
    let options = farmgate_wire::dhcp::options(area, OPTIONS_OFFSET)
        .map(|o| {
            o.map(|o| DhcpOption {
                code: o.code,
                data: o.data.to_vec(),
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| match e {
            OptionError::MissingLength { code, offset } => {
                DhcpError::MissingLength { code, offset }
            }
            OptionError::PastEnd {
                code, offset, len, ..
            } => DhcpError::OptionPastEnd {
                code,
                offset,
                len,
                total: data.len(),
            },
        })?;
    Ok(DhcpMessage {
        op,
        htype,
        hlen,
        hops,
        xid: u32::from_be_bytes(array_at(data, XID_OFFSET)),
        secs: u16::from_be_bytes(array_at(data, 8)),
        flags: u16::from_be_bytes(array_at(data, 10)),
        ciaddr: ipv4_at(data, 12),
        yiaddr: ipv4_at(data, 16),
        siaddr: ipv4_at(data, 20),
        giaddr: ipv4_at(data, 24),
        chaddr: array_at(data, CHADDR_OFFSET),
        sname: array_at(data, SNAME_OFFSET),
        file: array_at(data, FILE_OFFSET),
        options,
    })
}

impl DhcpMessage {
    /// An empty message with the given `op` (all header fields zero, no options).
    pub fn new(op: u8) -> DhcpMessage {
        DhcpMessage {
            op,
            htype: 0,
            hlen: 0,
            hops: 0,
            xid: 0,
            secs: 0,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: [0; 16],
            sname: [0; 64],
            file: [0; 128],
            options: Vec::new(),
        }
    }

    /// A reply of type `kind` (normally Offer, Ack or Nak) to `request`, from `server_ip`.
    ///
    /// Copies `xid`, `htype`, `hlen`, `chaddr`, `flags` and `giaddr`; `ciaddr` is copied
    /// into an ACK (RFC 2131 table 3) and zero otherwise. Sets option 53 to `kind` and the
    /// server identifier (54) to `server_ip`. For a NAK, `yiaddr` and `siaddr` stay zero
    /// (RFC 2131); otherwise `yiaddr` is the given address and `siaddr` (next server) is
    /// `server_ip`, which [`set_next_server`](Self::set_next_server) can change.
    pub fn reply(
        request: &DhcpMessage,
        kind: MessageType,
        yiaddr: Ipv4Addr,
        server_ip: Ipv4Addr,
    ) -> DhcpMessage {
        let mut m = DhcpMessage::new(BOOTREPLY);
        m.htype = request.htype;
        m.hlen = request.hlen;
        m.xid = request.xid;
        m.flags = request.flags;
        m.giaddr = request.giaddr;
        m.chaddr = request.chaddr;
        if kind == MessageType::Ack {
            m.ciaddr = request.ciaddr;
        }
        if kind != MessageType::Nak {
            m.yiaddr = yiaddr;
            m.siaddr = server_ip;
        }
        m.set_message_type(kind);
        m.set_server_id(server_ip);
        m
    }

    /// Encodes the message: header, magic cookie, options, end option, zero padding up to
    /// [`MIN_MESSAGE_LEN`] bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MIN_MESSAGE_LEN);
        out.extend_from_slice(&[self.op, self.htype, self.hlen, self.hops]);
        out.extend_from_slice(&self.xid.to_be_bytes());
        out.extend_from_slice(&self.secs.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        for a in [self.ciaddr, self.yiaddr, self.siaddr, self.giaddr] {
            out.extend_from_slice(&a.octets());
        }
        out.extend_from_slice(&self.chaddr);
        out.extend_from_slice(&self.sname);
        out.extend_from_slice(&self.file);
        out.extend_from_slice(&MAGIC_COOKIE);
        for o in &self.options {
            // The setters keep every entry at most 255 bytes long; min() only guards it.
            let len = o.data.len().min(255);
            out.push(o.code);
            out.push(len as u8);
            out.extend_from_slice(o.data.get(..len).unwrap_or(&[]));
        }
        out.push(OPT_END);
        if out.len() < MIN_MESSAGE_LEN {
            out.resize(MIN_MESSAGE_LEN, 0);
        }
        out
    }

    /// The options in wire order (pad and end excluded).
    pub fn options(&self) -> &[DhcpOption] {
        &self.options
    }

    /// The data of option `code`: the concatenation of all its entries (RFC 3396), `None`
    /// when absent.
    pub fn option(&self, code: u8) -> Option<Cow<'_, [u8]>> {
        let mut entries = self.options.iter().filter(|o| o.code == code);
        let first = entries.next()?;
        let rest: Vec<&DhcpOption> = entries.collect();
        if rest.is_empty() {
            return Some(Cow::Borrowed(&first.data));
        }
        let mut all = first.data.clone();
        for o in rest {
            all.extend_from_slice(&o.data);
        }
        Some(Cow::Owned(all))
    }

    /// Sets option `code` to `data`, replacing any previous entries of it (in the place of
    /// the first one, or at the end). Data longer than 255 bytes is split into several
    /// entries (RFC 3396). Codes 0 and 255 are refused.
    pub fn set_option(&mut self, code: u8, data: &[u8]) -> Result<&mut Self, DhcpError> {
        if code == OPT_PAD || code == OPT_END {
            return Err(DhcpError::ReservedOptionCode(code));
        }
        let at = self
            .options
            .iter()
            .position(|o| o.code == code)
            .unwrap_or(self.options.len());
        self.options.retain(|o| o.code != code);
        let mut pieces: Vec<DhcpOption> = data
            .chunks(255)
            .map(|c| DhcpOption {
                code,
                data: c.to_vec(),
            })
            .collect();
        if pieces.is_empty() {
            pieces.push(DhcpOption {
                code,
                data: Vec::new(),
            });
        }
        let at = at.min(self.options.len());
        self.options.splice(at..at, pieces);
        Ok(self)
    }

    /// Removes every entry of option `code`.
    pub fn remove_option(&mut self, code: u8) -> &mut Self {
        self.options.retain(|o| o.code != code);
        self
    }

    /// Sets an option whose code is a known constant other than pad and end.
    fn set_known(&mut self, code: u8, data: &[u8]) -> &mut Self {
        // Only called with codes other than 0 and 255, so this cannot fail.
        let _ = self.set_option(code, data);
        self
    }

    fn string_option(&self, code: u8) -> Option<String> {
        self.option(code)
            .map(|d| String::from_utf8_lossy(&d).into_owned())
    }

    fn ipv4_option(&self, code: u8) -> Option<Ipv4Addr> {
        let d = self.option(code)?;
        let b: [u8; 4] = d.as_ref().try_into().ok()?;
        Some(Ipv4Addr::from(b))
    }

    /// The message type (option 53); `None` when absent, not 1 byte, or an unknown value.
    pub fn message_type(&self) -> Option<MessageType> {
        match self.option(OPT_MESSAGE_TYPE)?.as_ref() {
            [code] => MessageType::from_code(*code),
            _ => None,
        }
    }

    /// The client hardware address as `aa:bb:cc:dd:ee:ff`, for Ethernet (htype 1, hlen 6)
    /// only.
    pub fn client_mac(&self) -> Option<String> {
        if self.htype != HTYPE_ETHERNET || self.hlen != 6 {
            return None;
        }
        let mac = self.chaddr.get(..6)?;
        Some(
            mac.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":"),
        )
    }

    /// The requested IP address (option 50), when 4 bytes long.
    pub fn requested_ip(&self) -> Option<Ipv4Addr> {
        self.ipv4_option(OPT_REQUESTED_IP)
    }

    /// The server identifier (option 54), when 4 bytes long.
    pub fn server_id(&self) -> Option<Ipv4Addr> {
        self.ipv4_option(OPT_SERVER_ID)
    }

    /// The first PXE client system architecture of option 93 (RFC 4578), e.g.
    /// [`ARCH_X86_BIOS`], [`ARCH_X86_64_EFI`], [`ARCH_ARM64_EFI`]; `None` when absent or
    /// shorter than 2 bytes.
    pub fn client_arch(&self) -> Option<u16> {
        let d = self.option(OPT_CLIENT_ARCH)?;
        let b: [u8; 2] = d.get(..2)?.try_into().ok()?;
        Some(u16::from_be_bytes(b))
    }

    /// The user class (option 77) as text (lossy UTF-8). iPXE sends `iPXE`.
    pub fn user_class(&self) -> Option<String> {
        self.string_option(OPT_USER_CLASS)
    }

    /// The vendor class identifier (option 60) as text, e.g.
    /// `PXEClient:Arch:00000:UNDI:002001`.
    pub fn vendor_class(&self) -> Option<String> {
        self.string_option(OPT_VENDOR_CLASS)
    }

    /// Whether the vendor class starts with `PXEClient` (PXE firmware or iPXE).
    pub fn is_pxe_client(&self) -> bool {
        self.option(OPT_VENDOR_CLASS)
            .is_some_and(|d| d.starts_with(b"PXEClient"))
    }

    /// Whether the client is iPXE: user class `iPXE` (sent raw, or as one of the RFC 3004
    /// length-prefixed instances) or option 175 present.
    pub fn is_ipxe(&self) -> bool {
        if self.options.iter().any(|o| o.code == OPT_IPXE_ENCAP) {
            return true;
        }
        let Some(uc) = self.option(OPT_USER_CLASS) else {
            return false;
        };
        if uc.as_ref() == b"iPXE" {
            return true;
        }
        let mut rest: &[u8] = &uc;
        while let Some((&len, tail)) = rest.split_first() {
            let Some(instance) = tail.get(..usize::from(len)) else {
                return false;
            };
            if instance == b"iPXE" {
                return true;
            }
            rest = tail.get(usize::from(len)..).unwrap_or(&[]);
        }
        false
    }

    /// The host name (option 12) as text.
    pub fn hostname(&self) -> Option<String> {
        self.string_option(OPT_HOSTNAME)
    }

    /// The option codes the client asks for (option 55).
    pub fn parameter_request_list(&self) -> Option<Vec<u8>> {
        self.option(OPT_PARAMETER_REQUEST_LIST)
            .map(|d| d.into_owned())
    }

    /// The boot file name: option 67, else the `file` header field; `None` when neither.
    pub fn boot_file(&self) -> Option<String> {
        self.string_option(OPT_BOOT_FILE)
            .or_else(|| c_string(&self.file))
    }

    /// The TFTP server name: option 66, else the `sname` header field.
    pub fn tftp_server_name(&self) -> Option<String> {
        self.string_option(OPT_TFTP_SERVER_NAME)
            .or_else(|| c_string(&self.sname))
    }

    /// Sets the message type (option 53).
    pub fn set_message_type(&mut self, kind: MessageType) -> &mut Self {
        self.set_known(OPT_MESSAGE_TYPE, &[kind.code()])
    }

    /// Sets the subnet mask (option 1).
    pub fn set_subnet_mask(&mut self, mask: Ipv4Addr) -> &mut Self {
        self.set_known(OPT_SUBNET_MASK, &mask.octets())
    }

    /// Sets the routers (option 3).
    pub fn set_routers(&mut self, routers: &[Ipv4Addr]) -> &mut Self {
        let data: Vec<u8> = routers.iter().flat_map(|a| a.octets()).collect();
        self.set_known(OPT_ROUTER, &data)
    }

    /// Sets the DNS servers (option 6).
    pub fn set_dns_servers(&mut self, servers: &[Ipv4Addr]) -> &mut Self {
        let data: Vec<u8> = servers.iter().flat_map(|a| a.octets()).collect();
        self.set_known(OPT_DNS, &data)
    }

    /// Sets the lease time in seconds (option 51).
    pub fn set_lease_time(&mut self, seconds: u32) -> &mut Self {
        self.set_known(OPT_LEASE_TIME, &seconds.to_be_bytes())
    }

    /// Sets the server identifier (option 54).
    pub fn set_server_id(&mut self, server: Ipv4Addr) -> &mut Self {
        self.set_known(OPT_SERVER_ID, &server.octets())
    }

    /// Sets the vendor class identifier (option 60); PXE firmware expects `PXEClient` in
    /// an offer.
    pub fn set_vendor_class(&mut self, class: &str) -> &mut Self {
        self.set_known(OPT_VENDOR_CLASS, class.as_bytes())
    }

    /// Sets the boot file name: option 67 and the `file` header field (NUL-terminated; the
    /// field is left zero when the name does not fit in its 128 bytes).
    pub fn set_boot_file(&mut self, name: &str) -> &mut Self {
        set_c_string(&mut self.file, name);
        self.set_known(OPT_BOOT_FILE, name.as_bytes())
    }

    /// Sets the TFTP server name: option 66 and the `sname` header field (NUL-terminated;
    /// left zero when the name does not fit in its 64 bytes).
    pub fn set_tftp_server_name(&mut self, name: &str) -> &mut Self {
        set_c_string(&mut self.sname, name);
        self.set_known(OPT_TFTP_SERVER_NAME, name.as_bytes())
    }

    /// Sets `siaddr`, the next server to boot from.
    pub fn set_next_server(&mut self, server: Ipv4Addr) -> &mut Self {
        self.siaddr = server;
        self
    }
}
