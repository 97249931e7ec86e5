//! Arbitrary datagrams as SNMP messages: decoding must return errors, never panic; what
//! decodes must encode and decode back to the same message.
#![no_main]

use farmgate_pdu::snmp::ber;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = ber::decode(data) else { return };
    let again = ber::encode(&msg);
    assert_eq!(
        ber::decode(&again).as_ref(),
        Ok(&msg),
        "encode/decode round trip"
    );
    assert_eq!(ber::encode(&msg), again, "encoding is deterministic");
});
