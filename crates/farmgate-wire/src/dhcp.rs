//! DHCPv4 protocol constants (RFC 2131, options of RFC 2132 and RFC 4578) and the walk over
//! an options area, shared by the gateway's DHCP server and the DUT agent's DHCP client.
//!
//! [`options`] is total: whatever the bytes, it yields options and at most one error, and
//! never panics.

use std::fmt;

/// BOOTP client port.
pub const CLIENT_PORT: u16 = 68;
/// BOOTP server port.
pub const SERVER_PORT: u16 = 67;

/// The magic cookie 99.130.83.99 that starts the options.
pub const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// Offset of `xid` in the fixed header.
pub const XID_OFFSET: usize = 4;
/// Offset of `yiaddr` in the fixed header.
pub const YIADDR_OFFSET: usize = 16;
/// Offset of `siaddr` in the fixed header.
pub const SIADDR_OFFSET: usize = 20;
/// Offset of the 16-byte `chaddr` field in the fixed header.
pub const CHADDR_OFFSET: usize = 28;
/// Offset of the 64-byte `sname` field in the fixed header.
pub const SNAME_OFFSET: usize = 44;
/// Length of the `sname` field.
pub const SNAME_LEN: usize = 64;
/// Offset of the 128-byte `file` field in the fixed header.
pub const FILE_OFFSET: usize = 108;
/// Length of the `file` field.
pub const FILE_LEN: usize = 128;
/// Offset of the magic cookie (the length of the fixed header); the options start 4 bytes
/// later.
pub const COOKIE_OFFSET: usize = 236;
/// Offset of the first option: the length of the fixed header plus the magic cookie.
pub const OPTIONS_OFFSET: usize = 240;
/// The smallest BOOTP message (relays and old servers drop shorter ones).
pub const MIN_MESSAGE_LEN: usize = 300;

/// `op` of a message from a client.
pub const BOOTREQUEST: u8 = 1;
/// `op` of a message from a server.
pub const BOOTREPLY: u8 = 2;
/// `htype` of Ethernet.
pub const HTYPE_ETHERNET: u8 = 1;
/// The broadcast bit of `flags`: the client asks for broadcast replies (it has no address
/// yet).
pub const FLAG_BROADCAST: u16 = 0x8000;

/// Option 0: padding.
pub const OPT_PAD: u8 = 0;
/// Option 1: subnet mask.
pub const OPT_SUBNET_MASK: u8 = 1;
/// Option 3: routers.
pub const OPT_ROUTER: u8 = 3;
/// Option 6: DNS servers.
pub const OPT_DNS: u8 = 6;
/// Option 12: host name.
pub const OPT_HOSTNAME: u8 = 12;
/// Option 15: domain name.
pub const OPT_DOMAIN: u8 = 15;
/// Option 28: broadcast address.
pub const OPT_BROADCAST: u8 = 28;
/// Option 42: NTP servers.
pub const OPT_NTP: u8 = 42;
/// Option 50: requested IP address.
pub const OPT_REQUESTED_IP: u8 = 50;
/// Option 51: lease time in seconds.
pub const OPT_LEASE_TIME: u8 = 51;
/// Option 52: option overload (options continued in `file` and/or `sname`, see
/// [`OVERLOAD_FILE`] and [`OVERLOAD_SNAME`]).
pub const OPT_OVERLOAD: u8 = 52;
/// Option 53: DHCP message type.
pub const OPT_MESSAGE_TYPE: u8 = 53;
/// Option 54: server identifier.
pub const OPT_SERVER_ID: u8 = 54;
/// Option 55: parameter request list.
pub const OPT_PARAMETER_REQUEST_LIST: u8 = 55;
/// Option 57: maximum DHCP message size.
pub const OPT_MAX_MESSAGE_SIZE: u8 = 57;
/// Option 60: vendor class identifier.
pub const OPT_VENDOR_CLASS: u8 = 60;
/// Option 61: client identifier.
pub const OPT_CLIENT_ID: u8 = 61;
/// Option 66: TFTP server name.
pub const OPT_TFTP_SERVER_NAME: u8 = 66;
/// Option 67: boot file name.
pub const OPT_BOOT_FILE: u8 = 67;
/// Option 77: user class.
pub const OPT_USER_CLASS: u8 = 77;
/// Option 93: client system architecture (RFC 4578).
pub const OPT_CLIENT_ARCH: u8 = 93;
/// Option 175: iPXE's encapsulated options; its presence marks iPXE.
pub const OPT_IPXE_ENCAP: u8 = 175;
/// Option 255: end of the options.
pub const OPT_END: u8 = 255;

/// Bit of option 52's value: the `file` field holds options.
pub const OVERLOAD_FILE: u8 = 1;
/// Bit of option 52's value: the `sname` field holds options.
pub const OVERLOAD_SNAME: u8 = 2;

/// Client architecture 0: x86 BIOS (RFC 4578).
pub const ARCH_X86_BIOS: u16 = 0;
/// Client architecture 6: x86 (32-bit) EFI.
pub const ARCH_X86_EFI: u16 = 6;
/// Client architecture 7: x86-64 EFI.
pub const ARCH_X86_64_EFI: u16 = 7;
/// Client architecture 9: x86-64 EFI (EFI byte code number, used by x86-64 firmware).
pub const ARCH_X86_64_EFI_ALT: u16 = 9;
/// Client architecture 10: 32-bit ARM EFI.
pub const ARCH_ARM32_EFI: u16 = 10;
/// Client architecture 11: 64-bit ARM EFI.
pub const ARCH_ARM64_EFI: u16 = 11;

/// The DHCP message type (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// 1: a client looks for servers.
    Discover,
    /// 2: a server offers an address.
    Offer,
    /// 3: a client asks for an offered (or its previous) address.
    Request,
    /// 4: a client says the address is already in use.
    Decline,
    /// 5: a server confirms the address.
    Ack,
    /// 6: a server refuses the request.
    Nak,
    /// 7: a client gives the address back.
    Release,
    /// 8: a client asks for configuration only.
    Inform,
}

impl MessageType {
    /// The value of option 53.
    pub fn code(self) -> u8 {
        match self {
            MessageType::Discover => 1,
            MessageType::Offer => 2,
            MessageType::Request => 3,
            MessageType::Decline => 4,
            MessageType::Ack => 5,
            MessageType::Nak => 6,
            MessageType::Release => 7,
            MessageType::Inform => 8,
        }
    }

    /// The message type of an option 53 value, `None` for values RFC 2132 does not define.
    pub fn from_code(code: u8) -> Option<MessageType> {
        Some(match code {
            1 => MessageType::Discover,
            2 => MessageType::Offer,
            3 => MessageType::Request,
            4 => MessageType::Decline,
            5 => MessageType::Ack,
            6 => MessageType::Nak,
            7 => MessageType::Release,
            8 => MessageType::Inform,
            _ => return None,
        })
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            MessageType::Discover => "DHCPDISCOVER",
            MessageType::Offer => "DHCPOFFER",
            MessageType::Request => "DHCPREQUEST",
            MessageType::Decline => "DHCPDECLINE",
            MessageType::Ack => "DHCPACK",
            MessageType::Nak => "DHCPNAK",
            MessageType::Release => "DHCPRELEASE",
            MessageType::Inform => "DHCPINFORM",
        };
        f.write_str(name)
    }
}

/// One option found by [`options`]: never pad (0) nor end (255).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawOption<'a> {
    /// Offset of the option code in the message.
    pub offset: usize,
    /// The option code.
    pub code: u8,
    /// The option data (at most 255 bytes).
    pub data: &'a [u8],
}

/// Why an options area cannot be walked to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionError {
    /// The area ends right after an option code, before its length byte.
    MissingLength {
        /// The option code.
        code: u8,
        /// Offset of the option code in the message.
        offset: usize,
    },
    /// An option's length runs past the end of the area.
    PastEnd {
        /// The option code.
        code: u8,
        /// Offset of the option code in the message.
        offset: usize,
        /// The length byte.
        len: u8,
        /// Offset of the end of the area in the message.
        end: usize,
    },
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            OptionError::MissingLength { code, offset } => write!(
                f,
                "option {code} at offset {offset}: the length byte is missing at the end"
            ),
            OptionError::PastEnd {
                code,
                offset,
                len,
                end,
            } => write!(
                f,
                "option {code} at offset {offset}: length {len} runs past the end of the \
                 options at offset {end}"
            ),
        }
    }
}

impl std::error::Error for OptionError {}

/// The options of `area`, a part of a message that starts at offset `base` of it (the
/// options field at [`OPTIONS_OFFSET`], or an overloaded `file` or `sname` field).
///
/// Pad options are skipped; the walk stops at the end option (ignoring what follows it) or
/// at the end of the area (a missing end option is accepted). An option that does not fit
/// gives one `Err`, after which the walk stops. Offsets are `base` plus the position in
/// `area`.
pub fn options(area: &[u8], base: usize) -> Options<'_> {
    Options {
        area,
        base,
        at: 0,
        done: false,
    }
}

/// The iterator of [`options`].
#[derive(Debug, Clone)]
pub struct Options<'a> {
    area: &'a [u8],
    base: usize,
    at: usize,
    done: bool,
}

impl<'a> Iterator for Options<'a> {
    type Item = Result<RawOption<'a>, OptionError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let Some(&code) = self.area.get(self.at) else {
                self.done = true;
                break;
            };
            let offset = self.base.saturating_add(self.at);
            match code {
                OPT_PAD => self.at += 1,
                OPT_END => self.done = true,
                _ => {
                    let Some(&len) = self.area.get(self.at + 1) else {
                        self.done = true;
                        return Some(Err(OptionError::MissingLength { code, offset }));
                    };
                    let start = self.at + 2;
                    let end = start + usize::from(len);
                    let Some(data) = self.area.get(start..end) else {
                        self.done = true;
                        return Some(Err(OptionError::PastEnd {
                            code,
                            offset,
                            len,
                            end: self.base.saturating_add(self.area.len()),
                        }));
                    };
                    self.at = end;
                    return Some(Ok(RawOption { offset, code, data }));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Walked = Result<(usize, u8, Vec<u8>), OptionError>;

    fn walk(area: &[u8], base: usize) -> Vec<Walked> {
        options(area, base)
            .map(|r| r.map(|o| (o.offset, o.code, o.data.to_vec())))
            .collect()
    }

    #[test]
    fn pads_are_skipped_and_end_stops_the_walk() {
        let area = [0, 53, 1, 5, 0, 0, 12, 2, b'h', b'i', 255, 6, 4, 1, 2, 3, 4];
        assert_eq!(
            walk(&area, 240),
            vec![Ok((241, 53, vec![5])), Ok((246, 12, b"hi".to_vec()))]
        );
        // No end option: the walk ends with the area; an empty option is fine.
        assert_eq!(walk(&[61, 0], 0), vec![Ok((0, 61, vec![]))]);
        assert_eq!(walk(&[], 0), vec![]);
    }

    #[test]
    fn options_that_do_not_fit_are_one_error() {
        let e = walk(&[53, 1, 1, 12], 240);
        assert_eq!(e.len(), 2);
        assert_eq!(
            e[1],
            Err(OptionError::MissingLength {
                code: 12,
                offset: 243
            })
        );
        let e = walk(&[0, 0, 0, 53, 3, 1], 240);
        assert_eq!(
            e,
            vec![Err(OptionError::PastEnd {
                code: 53,
                offset: 243,
                len: 3,
                end: 246
            })]
        );
        assert_eq!(
            e[0].as_ref().unwrap_err().to_string(),
            "option 53 at offset 243: length 3 runs past the end of the options at offset 246"
        );
        assert_eq!(
            OptionError::MissingLength {
                code: 12,
                offset: 243
            }
            .to_string(),
            "option 12 at offset 243: the length byte is missing at the end"
        );
    }

    #[test]
    fn any_bytes_walk_without_panic_and_within_the_area() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for round in 0..3000usize {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            let len = (state >> 40) as usize % 300;
            let area: Vec<u8> = (0..len)
                .map(|i| (state.rotate_left(i as u32 % 64) >> 17) as u8)
                .collect();
            let mut errors = 0;
            for r in options(&area, round) {
                match r {
                    Ok(o) => {
                        assert!(o.code != OPT_PAD && o.code != OPT_END);
                        assert!(o.offset >= round && o.offset + 2 + o.data.len() <= round + len);
                    }
                    Err(_) => errors += 1,
                }
            }
            assert!(errors <= 1);
        }
    }

    #[test]
    fn message_types_round_trip() {
        for code in 0..=255u8 {
            if let Some(t) = MessageType::from_code(code) {
                assert_eq!(t.code(), code);
                assert!(t.to_string().starts_with("DHCP"));
            } else {
                assert!(code == 0 || code > 8, "{code}");
            }
        }
    }
}
