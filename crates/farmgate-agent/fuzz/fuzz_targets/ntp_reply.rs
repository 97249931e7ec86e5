//! Arbitrary datagrams as NTP server replies: `parse_reply` must return errors, never panic;
//! what it accepts must satisfy its documented checks, and the 48-byte header must survive an
//! encode/decode round trip bit for bit.
#![no_main]

use farmgate_agent::ntp::{self, NtpPacket, PACKET_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let decoded = NtpPacket::decode(data);
    assert_eq!(decoded.is_ok(), data.len() >= PACKET_LEN);
    if let Ok(p) = &decoded {
        // decode keeps every bit of the header: encode gives the same 48 bytes back.
        assert_eq!(
            &p.encode()[..],
            &data[..PACKET_LEN],
            "decode/encode of {p:?}"
        );
        let _ = p.kiss_code();
    }
    let Ok(p) = ntp::parse_reply(data) else {
        return;
    };
    assert_eq!(
        decoded.as_ref().ok(),
        Some(&p),
        "parse_reply differs from decode"
    );
    assert!((1..=4).contains(&p.version), "{p:?}");
    assert!(
        p.mode == ntp::MODE_SERVER || p.mode == ntp::MODE_BROADCAST,
        "{p:?}"
    );
    assert!((1..=15).contains(&p.stratum), "{p:?}");
    assert!(p.leap != 3 && !p.transmit.is_zero(), "{p:?}");
    let wire = p.encode();
    let back = NtpPacket::decode(&wire).expect("48 encoded bytes decode");
    assert_eq!(back, p, "encode/decode round trip");
    assert_eq!(ntp::parse_reply(&wire).as_ref().ok(), Some(&p), "re-parse");
    // Timestamp conversions are total.
    let _ = (p.transmit.unix_fixed(), p.transmit.to_system_time());
    let _ = (p.receive.to_system_time(), p.reference.to_system_time());
});
