//! Arbitrary sequences of datagrams given to the DHCP server's request handling (one
//! lease table across the sequence): it must never panic, every reply must parse, and
//! every address it hands out must be in the pool and never to two MACs at once.
#![no_main]

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use farmgate_netboot::dhcp;
use farmgate_netboot::dhcp_server::{DhcpServerConfig, answer_sequence};
use libfuzzer_sys::fuzz_target;

fn config() -> DhcpServerConfig {
    DhcpServerConfig {
        interface: None,
        listen: "0.0.0.0:67".parse().expect("address"),
        client_port: 68,
        server_ip: Ipv4Addr::new(10, 42, 0, 1),
        prefix_len: 24,
        // A small pool, so exhaustion and reuse are reached.
        pool: (Ipv4Addr::new(10, 42, 0, 10), Ipv4Addr::new(10, 42, 0, 13)),
        router: None,
        dns: vec![],
        lease_time: Duration::from_secs(3600),
        bios_boot_file: "undionly.kpxe".into(),
        efi_boot_file: "ipxe.efi".into(),
        arm64_efi_boot_file: None,
        ipxe_script_url: "http://10.42.0.1/api/v1/dut/{mac}/boot.ipxe".into(),
        leases_file: None,
    }
}

fuzz_target!(|data: &[u8]| {
    // Datagrams separated by the byte sequence 0xFF 0x00 0xFF.
    let mut datagrams = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(3).position(|w| w == [0xff, 0x00, 0xff]) {
        datagrams.push(&rest[..i]);
        rest = &rest[i + 3..];
    }
    datagrams.push(rest);
    datagrams.truncate(64);
    let cfg = config();
    let mut holder: HashMap<Ipv4Addr, String> = HashMap::new();
    let answers = answer_sequence(&cfg, &datagrams);
    assert_eq!(answers.len(), datagrams.len());
    for (input, answer) in datagrams.iter().zip(answers) {
        // A machine that releases or declines its address gives it back.
        if let Ok(q) = dhcp::parse(input)
            && matches!(
                q.message_type(),
                Some(dhcp::MessageType::Release | dhcp::MessageType::Decline)
            )
            && let Some(mac) = q.client_mac()
        {
            holder.retain(|_, m| *m != mac);
        }
        let Some((reply, _dest)) = answer else { continue };
        let m = dhcp::parse(&reply).expect("the server's replies parse");
        let Some(mac) = m.client_mac() else { continue };
        if matches!(m.message_type(), Some(dhcp::MessageType::Ack))
            && m.yiaddr != Ipv4Addr::UNSPECIFIED
        {
            let a = m.yiaddr;
            assert!(
                u32::from(a) >= u32::from(cfg.pool.0) && u32::from(a) <= u32::from(cfg.pool.1),
                "{a} is outside the pool"
            );
            if let Some(other) = holder.insert(a, mac.clone()) {
                assert_eq!(other, mac, "{a} acknowledged to two machines");
            }
        }
    }
});
