//! Arbitrary datagrams as DHCP messages: parsing must return errors, never panic; encoding
//! what parsed must parse back to the same message; the typed accessors must not panic.
#![no_main]

use farmgate_netboot::dhcp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = dhcp::parse(data) else { return };
    assert_eq!(
        dhcp::parse(&m.encode()).as_ref(),
        Ok(&m),
        "encode/parse round trip"
    );
    let _ = (m.message_type(), m.client_mac(), m.requested_ip(), m.client_arch());
    let _ = (m.user_class(), m.vendor_class(), m.is_ipxe(), m.hostname());
    let _ = (m.parameter_request_list(), m.boot_file(), m.tftp_server_name());
});
