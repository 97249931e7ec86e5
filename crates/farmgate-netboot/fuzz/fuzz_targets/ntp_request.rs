//! Arbitrary datagrams as NTP client requests to the gateway's server: `answer` must never
//! panic; it answers exactly the client-mode requests of versions 1 to 4, and an answer is a
//! 48-byte server-mode packet echoing the request's version and transmit timestamp.
#![no_main]

use std::time::{Duration, SystemTime};

use farmgate_netboot::ntp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let reply = ntp::answer(data, now, 3);
    let is_request = data.len() >= ntp::PACKET_LEN
        && (1..=4).contains(&((data[0] >> 3) & 7))
        && data[0] & 7 == 3;
    assert_eq!(reply.is_some(), is_request, "answered {:?}", data.get(..1));
    let Some(b) = reply else { return };
    assert_eq!(b.len(), ntp::PACKET_LEN);
    assert_eq!(b[0] & 7, 4, "mode");
    assert_eq!(b[0] >> 6, 0, "leap indicator");
    assert_eq!((b[0] >> 3) & 7, (data[0] >> 3) & 7, "version echoed");
    assert_eq!(b[1], 3, "stratum");
    assert_eq!(b[24..32], data[40..48], "originate = request's transmit");
    let ts = ntp::timestamp(now).to_be_bytes();
    assert_eq!(b[32..40], ts, "receive");
    assert_eq!(b[40..48], ts, "transmit");
});
