//! Free loopback ports for servers a test starts in another process.
//!
//! A port found by binding port 0 comes from the kernel's ephemeral range, the same
//! range every outgoing connection takes its local port from: between the moment the
//! test releases it and the moment the child process binds it, any client connection on
//! the machine may take it ("Address already in use" in a loaded CI run). These helpers
//! pick ports *below* the ephemeral range instead, where only listeners go, at a random
//! place so that concurrent test processes do not walk the same sequence, and check them
//! by binding.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{TcpListener, UdpSocket};

/// The kernel's ephemeral range (Linux default when unreadable).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

fn pick(free: impl Fn(u16) -> bool) -> u16 {
    const LOW: u16 = 10_000;
    let high = ephemeral_low();
    if high > LOW + 1000 {
        let span = u64::from(high - LOW);
        let mut seed = random_u64();
        for _ in 0..200 {
            let port = LOW + (seed % span) as u16;
            if free(port) {
                return port;
            }
            seed = seed.rotate_left(17) ^ random_u64();
        }
    }
    // No room below the ephemeral range: fall back to a port the kernel chooses.
    0
}

/// A TCP (and UDP) port free on 127.0.0.1, outside the ephemeral range when possible.
pub fn free_port() -> u16 {
    let port = pick(|p| {
        TcpListener::bind(("127.0.0.1", p)).is_ok() && UdpSocket::bind(("127.0.0.1", p)).is_ok()
    });
    if port != 0 {
        return port;
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free TCP port on 127.0.0.1")
}

/// A UDP port free on 127.0.0.1, outside the ephemeral range when possible.
pub fn free_udp_port() -> u16 {
    let port = pick(|p| UdpSocket::bind(("127.0.0.1", p)).is_ok());
    if port != 0 {
        return port;
    }
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free UDP port on 127.0.0.1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_below_the_ephemeral_range_and_bindable() {
        let low = ephemeral_low();
        for _ in 0..20 {
            let p = free_port();
            if low > 11_000 {
                assert!((10_000..low).contains(&p), "port {p} not below {low}");
            }
            TcpListener::bind(("127.0.0.1", p)).expect("the chosen port binds");
            let u = free_udp_port();
            UdpSocket::bind(("127.0.0.1", u)).expect("the chosen UDP port binds");
        }
    }
}
