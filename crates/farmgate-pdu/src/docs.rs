//! What each driver is for and the configuration keys it takes, for `farmctl pdu
//! drivers` and `GET /api/v1/pdu-drivers`. A test checks that every driver accepts
//! exactly the keys listed here.

use farmgate_wire::{PduConfigKey, PduDriverInfo};

/// (driver, what it drives, [(key, meaning)]).
type Doc = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

const SNMP_COMMON: [(&str, &str); 5] = [
    (
        "hostname",
        "host or host:port of the PDU's SNMP agent (port 161 by default); required",
    ),
    ("community", "SNMP community (default private)"),
    ("version", "SNMP version: 1 or 2c (default 2c)"),
    (
        "timeout",
        "seconds to wait for an answer, per try (default 2)",
    ),
    ("retries", "tries after the first one (default 2)"),
];

const DOCS: &[Doc] = &[
    (
        "vpdu",
        "CI-tron's virtual PDU TCP protocol (an existing vpdu server)",
        &[
            (
                "hostname",
                "host or host:port of the vpdu server (default localhost)",
            ),
            ("port", "TCP port when not in hostname (default 9191)"),
            ("timeout", "seconds per exchange (default 5)"),
        ],
    ),
    (
        "dummy",
        "in-memory ports that forget their state (tests)",
        &[("ports", "number of ports (default 16)")],
    ),
    (
        "shell",
        "your own shell commands; {port} is replaced by the port id",
        &[
            ("on", "command switching a port on; required"),
            ("off", "command switching a port off; required"),
            (
                "status",
                "command printing on or off (without it, states read Unknown)",
            ),
            ("ports", "port count (ports 0..n-1) or a list of port ids"),
            ("timeout", "seconds a command may take (default 10)"),
        ],
    ),
    (
        "qemu",
        "each port is a QEMU machine that netboots like a physical DUT",
        &[
            ("ports", "number of machines (default 4)"),
            ("memory", "MiB of memory (default 512)"),
            ("cpus", "virtual CPUs (default 1)"),
            (
                "disk_size",
                "size of a qcow2 disk per machine, e.g. 4G (default: no disk)",
            ),
            ("accel", "tcg (default), kvm, or auto"),
            ("network", "user (default, no root) or tap"),
            ("net", "user network, CIDR (default 10.42.0.0/24)"),
            (
                "host",
                "the gateway's address on the user network (default 10.42.0.1)",
            ),
            (
                "boot_url",
                "boot script URL given by QEMU's DHCP ({mac} is replaced)",
            ),
            (
                "tap_name",
                "tap device name with network: tap (default fgtap{port})",
            ),
            ("bridge", "bridge the tap joins (the DUTs' network)"),
            ("nic_model", "QEMU NIC model (default virtio-net-pci)"),
            ("console", "host:port of SALAD's network console port"),
            ("state_dir", "where pid files and disks go"),
            ("qemu", "the QEMU binary (default qemu-system-x86_64)"),
            ("extra_args", "more QEMU arguments"),
            (
                "timeout",
                "seconds a QEMU start or stop may take (default 20)",
            ),
        ],
    ),
    (
        "snmp",
        "any SNMP v1/v2c PDU, with the OIDs and values given here",
        &[
            SNMP_COMMON[0],
            SNMP_COMMON[1],
            SNMP_COMMON[2],
            SNMP_COMMON[3],
            SNMP_COMMON[4],
            ("outlet_count", "number of outlets (or outlet_count_oid)"),
            (
                "outlet_count_oid",
                "OID whose value is the number of outlets",
            ),
            (
                "state_oid",
                "base OID of the outlet state column (outlet number appended); required",
            ),
            ("set_oid", "base OID written to switch (default state_oid)"),
            ("on_value", "integer written to switch on; required"),
            ("off_value", "integer written to switch off; required"),
            ("state_on_value", "integer read when on (default on_value)"),
            (
                "state_off_value",
                "integer read when off (default off_value)",
            ),
            ("port_base", "number of the first outlet (default 1)"),
            ("power_oid", "base OID of the outlet power column"),
            (
                "power_scale",
                "factor turning power_oid's value into watts (default 1)",
            ),
            ("energy_oid", "base OID of the outlet energy column"),
            (
                "energy_scale",
                "factor turning energy_oid's value into watt-hours (default 1)",
            ),
            ("current_oid", "base OID of the outlet current column"),
            (
                "current_scale",
                "factor turning current_oid's value into amperes (default 1)",
            ),
        ],
    ),
    (
        "apc_masterswitch",
        "APC switched rack PDUs (PowerNet-MIB sPDUOutletCtl)",
        &[
            SNMP_COMMON[0],
            SNMP_COMMON[1],
            SNMP_COMMON[2],
            SNMP_COMMON[3],
            SNMP_COMMON[4],
            (
                "outlet_count",
                "number of outlets (read from the PDU otherwise)",
            ),
        ],
    ),
    (
        "cyberpower",
        "CyberPower ePDUs (CPS-MIB): switching, power, energy, current",
        &[
            SNMP_COMMON[0],
            SNMP_COMMON[1],
            SNMP_COMMON[2],
            SNMP_COMMON[3],
            SNMP_COMMON[4],
            (
                "outlet_count",
                "number of outlets (read from the PDU otherwise)",
            ),
        ],
    ),
    (
        "shelly",
        "Shelly relays: generation 1 (REST) and 2+ (RPC), with power and energy",
        &[
            ("hostname", "host or host:port of the device; required"),
            ("generation", "1, 2, 3 or 4 (asked from /shelly otherwise)"),
            ("username", "user for basic auth (gen 1); gen 2+ uses admin"),
            (
                "password",
                "password (basic auth on gen 1, digest on gen 2+)",
            ),
            (
                "ports",
                "number of relays (asked from the device otherwise)",
            ),
            ("timeout", "seconds per request (default 5)"),
        ],
    ),
    (
        "tasmota",
        "Tasmota devices (Power<N> commands, energy from Status 8)",
        &[
            ("hostname", "host or host:port of the device; required"),
            ("username", "user (default admin)"),
            (
                "password",
                "password (sent as Tasmota's user/password parameters)",
            ),
            (
                "ports",
                "number of relays (asked from the device otherwise)",
            ),
            ("timeout", "seconds per request (default 5)"),
        ],
    ),
    (
        "serial_relay",
        "a USB serial power switch taking one ASCII digit (echo 0 > /dev/ttyACM0); cannot read back",
        &[
            ("device", "the serial device, e.g. /dev/ttyACM0; required"),
            ("baud", "speed (default 115200)"),
            (
                "state_file",
                "file keeping the last state written, across restarts",
            ),
            ("timeout", "seconds a write may take (default 5)"),
        ],
    ),
];

/// Every driver of this build with its configuration keys.
pub fn driver_docs() -> Vec<PduDriverInfo> {
    DOCS.iter()
        .map(|(name, description, keys)| PduDriverInfo {
            name: name.to_string(),
            description: description.to_string(),
            config: keys
                .iter()
                .map(|(key, meaning)| PduConfigKey {
                    key: key.to_string(),
                    description: meaning.to_string(),
                })
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use farmgate_wire::{PduRecord, YamlValue};

    /// The keys a driver accepts, from the error it gives for an unknown one.
    fn accepted_keys(driver: &str) -> Vec<String> {
        let mut config = std::collections::BTreeMap::new();
        config.insert("zz_not_a_key".to_string(), YamlValue::String("x".into()));
        let rec = PduRecord {
            driver: driver.into(),
            config,
            reserved_port_ids: vec![],
            port_labels: Default::default(),
        };
        let msg = match crate::driver_for("P", &rec) {
            Ok(_) => panic!("{driver} accepted an unknown key"),
            Err(e) => e.to_string(),
        };
        let list = msg
            .split("this driver knows: ")
            .nth(1)
            .unwrap_or_else(|| panic!("{driver}: no key list in {msg:?}"))
            .trim_end_matches(')');
        let mut keys: Vec<String> = list.split(", ").map(str::to_string).collect();
        keys.sort();
        keys
    }

    #[test]
    fn every_driver_is_documented_with_exactly_the_keys_it_accepts() {
        let docs = driver_docs();
        let names: Vec<&str> = docs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            crate::driver_names(),
            "one entry per driver, same order"
        );
        for d in &docs {
            let mut documented: Vec<String> = d.config.iter().map(|k| k.key.clone()).collect();
            documented.sort();
            assert_eq!(
                documented,
                accepted_keys(&d.name),
                "keys of driver {}",
                d.name
            );
        }
    }
}
