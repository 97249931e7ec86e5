//! DHCP codec: realistic PXE and iPXE DISCOVERs, reply encoding byte by byte, hostile
//! inputs, and every prefix and single-byte mutation of a valid message.

use std::net::Ipv4Addr;

use farmgate_netboot::dhcp::{self, DhcpError, DhcpMessage, MessageType};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// The fixed header of a client's broadcast DISCOVER, with xid 0x1a2b3c4d and MAC [`MAC`].
fn client_header(secs: u16) -> Vec<u8> {
    let mut b = vec![1, 1, 6, 0];
    b.extend_from_slice(&0x1a2b_3c4du32.to_be_bytes());
    b.extend_from_slice(&secs.to_be_bytes());
    b.extend_from_slice(&0x8000u16.to_be_bytes());
    b.extend_from_slice(&[0; 16]); // ciaddr, yiaddr, siaddr, giaddr
    b.extend_from_slice(&MAC);
    b.extend_from_slice(&[0; 10]);
    b.extend_from_slice(&[0; 64 + 128]);
    b.extend_from_slice(&[99, 130, 83, 99]);
    assert_eq!(b.len(), 240);
    b
}

fn opt(b: &mut Vec<u8>, code: u8, data: &[u8]) {
    b.push(code);
    b.push(data.len() as u8);
    b.extend_from_slice(data);
}

/// A DISCOVER as x86-64 UEFI PXE firmware sends it.
fn pxe_discover() -> Vec<u8> {
    let mut b = client_header(4);
    opt(&mut b, 53, &[1]);
    opt(&mut b, 57, &1464u16.to_be_bytes());
    opt(
        &mut b,
        55,
        &[
            1, 2, 3, 4, 5, 6, 12, 13, 15, 17, 18, 22, 23, 28, 40, 41, 42, 43, 50, 51, 54, 58, 59,
            60, 66, 67, 97, 128, 129, 130, 131, 132, 133, 134, 135,
        ],
    );
    let mut uuid = vec![0];
    uuid.extend_from_slice(&[0xab; 16]);
    opt(&mut b, 97, &uuid);
    opt(&mut b, 94, &[1, 3, 16]);
    opt(&mut b, 93, &[0, 7]);
    opt(&mut b, 60, b"PXEClient:Arch:00007:UNDI:003016");
    b.push(255);
    b.resize(548, 0);
    b
}

/// A DISCOVER as iPXE sends it (BIOS build), with pads before the end.
fn ipxe_discover() -> Vec<u8> {
    let mut b = client_header(0);
    opt(&mut b, 53, &[1]);
    opt(&mut b, 57, &1472u16.to_be_bytes());
    opt(&mut b, 93, &[0, 0]);
    opt(&mut b, 94, &[1, 2, 1]);
    opt(&mut b, 60, b"PXEClient:Arch:00000:UNDI:002001");
    opt(&mut b, 77, b"iPXE");
    opt(
        &mut b,
        55,
        &[1, 3, 6, 7, 12, 15, 17, 26, 43, 60, 66, 67, 119, 128, 175],
    );
    opt(
        &mut b,
        175,
        &[
            0xb1, 0x05, 0x01, 0x80, 0x86, 0x10, 0x0e, 0xeb, 0x03, 0x01, 0x00, 0x00,
        ],
    );
    opt(&mut b, 12, b"dut-7");
    b.extend_from_slice(&[0, 0, 0]);
    b.push(255);
    b
}

#[test]
fn pxe_firmware_discover_parses_and_round_trips() {
    let bytes = pxe_discover();
    let m = dhcp::parse(&bytes).unwrap();
    assert_eq!(m.op, dhcp::BOOTREQUEST);
    assert_eq!(m.xid, 0x1a2b_3c4d);
    assert_eq!(m.secs, 4);
    assert_eq!(m.flags, dhcp::FLAG_BROADCAST);
    assert_eq!(m.message_type(), Some(MessageType::Discover));
    assert_eq!(m.client_mac().as_deref(), Some("52:54:00:12:34:56"));
    assert_eq!(m.client_arch(), Some(dhcp::ARCH_X86_64_EFI));
    assert_eq!(
        m.vendor_class().as_deref(),
        Some("PXEClient:Arch:00007:UNDI:003016")
    );
    assert!(m.is_pxe_client());
    assert!(!m.is_ipxe());
    assert_eq!(m.user_class(), None);
    assert_eq!(m.hostname(), None);
    assert_eq!(m.requested_ip(), None);
    let prl = m.parameter_request_list().unwrap();
    assert_eq!(prl.len(), 35);
    assert!(prl.contains(&67) && prl.contains(&66));
    assert_eq!(m.options().len(), 7);

    let encoded = m.encode();
    assert_eq!(dhcp::parse(&encoded).unwrap(), m);
    // Same bytes up to the end option; the original pads to 548, the encoding to 300.
    let end = encoded.iter().rposition(|&b| b == 255).unwrap();
    assert_eq!(encoded[..=end], bytes[..=end]);
    assert_eq!(encoded.len(), 300.max(end + 1));
}

#[test]
fn ipxe_discover_parses_and_round_trips() {
    let bytes = ipxe_discover();
    let m = dhcp::parse(&bytes).unwrap();
    assert_eq!(m.message_type(), Some(MessageType::Discover));
    assert_eq!(m.client_arch(), Some(dhcp::ARCH_X86_BIOS));
    assert_eq!(m.user_class().as_deref(), Some("iPXE"));
    assert!(m.is_ipxe());
    assert_eq!(m.hostname().as_deref(), Some("dut-7"));
    assert_eq!(
        m.vendor_class().as_deref(),
        Some("PXEClient:Arch:00000:UNDI:002001")
    );
    assert_eq!(m.parameter_request_list().unwrap().last(), Some(&175));
    let again = dhcp::parse(&m.encode()).unwrap();
    assert_eq!(again, m);

    // Option 175 alone, or an RFC 3004 user class, also mark iPXE.
    let mut only_175 = m.clone();
    only_175.remove_option(dhcp::OPT_USER_CLASS);
    assert!(only_175.is_ipxe());
    let mut rfc3004 = only_175.clone();
    rfc3004.remove_option(dhcp::OPT_IPXE_ENCAP);
    assert!(!rfc3004.is_ipxe());
    rfc3004.set_option(77, b"\x03abc\x04iPXE").unwrap();
    assert!(rfc3004.is_ipxe());
    rfc3004.set_option(77, b"\x09iPXE").unwrap();
    assert!(!rfc3004.is_ipxe());
}

#[test]
fn reply_is_encoded_byte_by_byte() {
    let mut req_bytes = pxe_discover();
    req_bytes[24..28].copy_from_slice(&[10, 0, 9, 1]); // giaddr: relayed
    let req = dhcp::parse(&req_bytes).unwrap();
    let server = Ipv4Addr::new(10, 0, 0, 1);
    let mut offer = DhcpMessage::reply(
        &req,
        MessageType::Offer,
        Ipv4Addr::new(10, 0, 9, 50),
        server,
    );
    offer
        .set_subnet_mask(Ipv4Addr::new(255, 255, 255, 0))
        .set_routers(&[Ipv4Addr::new(10, 0, 9, 1)])
        .set_dns_servers(&[Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)])
        .set_lease_time(3600)
        .set_vendor_class("PXEClient")
        .set_tftp_server_name("10.0.0.1")
        .set_boot_file("ipxe.efi")
        .set_next_server(Ipv4Addr::new(10, 0, 0, 7));
    let b = offer.encode();

    assert_eq!(b[0..4], [2, 1, 6, 0]); // op BOOTREPLY, htype, hlen, hops
    assert_eq!(b[4..8], [0x1a, 0x2b, 0x3c, 0x4d]); // xid
    assert_eq!(b[8..10], [0, 0]); // secs
    assert_eq!(b[10..12], [0x80, 0]); // flags copied
    assert_eq!(b[12..16], [0, 0, 0, 0]); // ciaddr
    assert_eq!(b[16..20], [10, 0, 9, 50]); // yiaddr
    assert_eq!(b[20..24], [10, 0, 0, 7]); // siaddr: next server
    assert_eq!(b[24..28], [10, 0, 9, 1]); // giaddr copied
    assert_eq!(b[28..34], MAC);
    assert_eq!(b[34..44], [0; 10]);
    assert_eq!(&b[44..53], b"10.0.0.1\0"); // sname
    assert!(b[53..108].iter().all(|&x| x == 0));
    assert_eq!(&b[108..117], b"ipxe.efi\0"); // file
    assert!(b[117..236].iter().all(|&x| x == 0));
    assert_eq!(b[236..240], [99, 130, 83, 99]);
    let mut expected = Vec::new();
    opt(&mut expected, 53, &[2]);
    opt(&mut expected, 54, &[10, 0, 0, 1]);
    opt(&mut expected, 1, &[255, 255, 255, 0]);
    opt(&mut expected, 3, &[10, 0, 9, 1]);
    opt(&mut expected, 6, &[10, 0, 0, 2, 10, 0, 0, 3]);
    opt(&mut expected, 51, &3600u32.to_be_bytes());
    opt(&mut expected, 60, b"PXEClient");
    opt(&mut expected, 66, b"10.0.0.1");
    opt(&mut expected, 67, b"ipxe.efi");
    expected.push(255);
    // 309 bytes: over the 300-byte minimum, so no padding.
    assert_eq!(b[240..], expected[..]);

    let back = dhcp::parse(&b).unwrap();
    assert_eq!(back, offer);
    assert_eq!(back.message_type(), Some(MessageType::Offer));
    assert_eq!(back.server_id(), Some(server));
    assert_eq!(back.boot_file().as_deref(), Some("ipxe.efi"));
    assert_eq!(back.tftp_server_name().as_deref(), Some("10.0.0.1"));

    // Setting an option again replaces it in place.
    offer.set_lease_time(60);
    assert_eq!(offer.options()[5].data, 60u32.to_be_bytes());
    assert_eq!(offer.options().len(), 9);
}

#[test]
fn ack_and_nak_follow_rfc_2131_table_3() {
    let mut req = dhcp::parse(&ipxe_discover()).unwrap();
    req.set_message_type(MessageType::Request);
    req.set_option(dhcp::OPT_REQUESTED_IP, &[10, 0, 9, 50])
        .unwrap();
    req.ciaddr = Ipv4Addr::new(10, 0, 9, 50);
    assert_eq!(req.requested_ip(), Some(Ipv4Addr::new(10, 0, 9, 50)));
    let server = Ipv4Addr::new(10, 0, 0, 1);

    let ack = DhcpMessage::reply(&req, MessageType::Ack, Ipv4Addr::new(10, 0, 9, 50), server);
    let b = ack.encode();
    assert_eq!(b[12..16], [10, 0, 9, 50]); // ciaddr copied into an ACK
    assert_eq!(b[16..20], [10, 0, 9, 50]);
    assert_eq!(b[240..246], [53, 1, 5, 54, 4, 10]);

    let nak = DhcpMessage::reply(&req, MessageType::Nak, Ipv4Addr::new(10, 0, 9, 50), server);
    let b = nak.encode();
    assert_eq!(b[12..24], [0; 12]); // ciaddr, yiaddr, siaddr zero
    assert_eq!(b[28..34], MAC);
    assert_eq!(b[240..250], [53, 1, 6, 54, 4, 10, 0, 0, 1, 255]);
}

#[test]
fn long_options_are_split_and_joined() {
    let mut m = DhcpMessage::new(dhcp::BOOTREPLY);
    let long = "x".repeat(300);
    m.set_boot_file(&long);
    assert_eq!(m.options().len(), 2);
    assert_eq!(m.options()[0].data.len(), 255);
    assert!(
        m.file.iter().all(|&b| b == 0),
        "too long for the file field"
    );
    let back = dhcp::parse(&m.encode()).unwrap();
    assert_eq!(back.boot_file().as_deref(), Some(long.as_str()));
    assert_eq!(
        m.set_option(0, b"x").unwrap_err().to_string(),
        "option 0 cannot be set: codes 0 (pad) and 255 (end) carry no data"
    );
    assert!(m.set_option(255, b"").is_err());
}

#[test]
fn hostile_inputs_are_errors() {
    assert_eq!(
        dhcp::parse(&[]).unwrap_err(),
        DhcpError::Truncated { len: 0 }
    );
    let good = pxe_discover();
    assert_eq!(
        dhcp::parse(&good[..239]).unwrap_err().to_string(),
        "truncated message: 239 bytes, but the fixed BOOTP header and magic cookie need 240"
    );

    let mut bad_cookie = good.clone();
    bad_cookie[239] = 98;
    assert_eq!(
        dhcp::parse(&bad_cookie).unwrap_err().to_string(),
        "magic cookie at offset 236: 99.130.83.98 instead of 99.130.83.99"
    );

    let mut long_hlen = good.clone();
    long_hlen[2] = 17;
    assert_eq!(
        dhcp::parse(&long_hlen).unwrap_err(),
        DhcpError::HardwareAddressTooLong { hlen: 17 }
    );

    let mut past_end = client_header(0);
    past_end.extend_from_slice(&[0, 0, 0, 53, 3, 1]);
    assert_eq!(
        dhcp::parse(&past_end).unwrap_err().to_string(),
        "option 53 at offset 243: length 3 runs past the end (the message is 246 bytes)"
    );

    let mut no_len = client_header(0);
    no_len.extend_from_slice(&[53, 1, 1, 12]);
    assert_eq!(
        dhcp::parse(&no_len).unwrap_err().to_string(),
        "option 12 at offset 243: the length byte is missing at the end"
    );

    // No end option, an unknown message type, a non-Ethernet address: accepted, but the
    // typed accessors say None.
    let mut odd = client_header(0);
    odd.extend_from_slice(&[53, 1, 9, 50, 3, 1, 2, 3, 93, 1, 7]);
    odd[1] = 6;
    let m = dhcp::parse(&odd).unwrap();
    assert_eq!(m.message_type(), None);
    assert_eq!(m.requested_ip(), None);
    assert_eq!(m.client_arch(), None);
    assert_eq!(m.client_mac(), None);
}

fn parse_and_round_trip(data: &[u8]) -> bool {
    match dhcp::parse(data) {
        Ok(m) => {
            assert_eq!(dhcp::parse(&m.encode()).as_ref(), Ok(&m), "{data:?}");
            // The accessors must not panic either.
            let _ = (
                m.message_type(),
                m.client_mac(),
                m.client_arch(),
                m.is_ipxe(),
            );
            let _ = (
                m.user_class(),
                m.vendor_class(),
                m.hostname(),
                m.boot_file(),
            );
            true
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            false
        }
    }
}

#[test]
fn every_prefix_and_single_byte_mutation_parses_without_panicking() {
    for bytes in [pxe_discover(), ipxe_discover()] {
        let mut ok = 0usize;
        let mut err = 0usize;
        for n in 0..=bytes.len() {
            if parse_and_round_trip(&bytes[..n]) {
                ok += 1;
            } else {
                err += 1;
            }
        }
        let mut mutated = bytes.clone();
        for i in 0..bytes.len() {
            for v in 0..=255u8 {
                mutated[i] = v;
                if parse_and_round_trip(&mutated) {
                    ok += 1;
                } else {
                    err += 1;
                }
            }
            mutated[i] = bytes[i];
        }
        // Both outcomes happen: short prefixes fail, the full message parses.
        assert!(ok > 0 && err > 0, "ok {ok}, err {err}");
    }
}
