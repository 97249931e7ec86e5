//! Arbitrary datagrams as replies to the agent's DHCP client: `parse_reply` must return
//! errors, never panic; what parses is an OFFER/ACK/NAK, and `lease()` on it must return an
//! error or a lease that is consistent with the reply.
//!
//! Each input is tried twice: as is (mostly rejected: wrong xid/MAC/cookie), and with the
//! transaction id, hardware address, `op` and magic cookie forced to the expected values so
//! the fuzzer spends its time in the options.
#![no_main]

use std::net::Ipv4Addr;

use farmgate_agent::net::dhcp::{self, MessageType};
use libfuzzer_sys::fuzz_target;

const XID: u32 = 0x1234_5678;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xfa, 0x12, 0x34];

fn check(data: &[u8]) {
    let Ok(reply) = dhcp::parse_reply(data, XID, &MAC) else {
        return;
    };
    assert!(data.len() >= 240);
    assert!(
        matches!(
            reply.kind,
            MessageType::Offer | MessageType::Ack | MessageType::Nak
        ),
        "{:?}",
        reply.kind
    );
    assert_eq!(
        reply.your_ip,
        Ipv4Addr::new(data[16], data[17], data[18], data[19])
    );
    let server_id = reply.server_id();
    let Ok(lease) = reply.lease() else { return };
    assert_eq!(lease.address, reply.your_ip);
    assert!(
        !lease.address.is_unspecified()
            && !lease.address.is_broadcast()
            && !lease.address.is_multicast(),
        "{lease:?}"
    );
    assert!(lease.prefix_len <= 32, "{lease:?}");
    assert_eq!(Some(lease.server), server_id, "{lease:?}");
    for t in [&lease.hostname, &lease.domain].into_iter().flatten() {
        assert!(!t.is_empty() && t.trim() == t, "{lease:?}");
    }
    if let Some(mask) = reply.options.get(&dhcp::OPT_SUBNET_MASK) {
        let mask = Ipv4Addr::new(mask[0], mask[1], mask[2], mask[3]);
        assert_eq!(dhcp::prefix_from_mask(mask), Some(lease.prefix_len));
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= 240 {
        let mut d = data.to_vec();
        d[0] = 2;
        d[4..8].copy_from_slice(&XID.to_be_bytes());
        d[28..34].copy_from_slice(&MAC);
        d[236..240].copy_from_slice(&dhcp::MAGIC_COOKIE);
        check(&d);
    }
});
