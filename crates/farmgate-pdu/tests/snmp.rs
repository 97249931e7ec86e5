//! The SNMP drivers and client against a real net-snmp agent (`/usr/sbin/snmpd`) whose
//! outlet tables are served by a `pass_persist` script keeping them in a JSON file, and
//! against net-snmp's own client tools (`snmpget`, `snmpset`, `snmpgetnext`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use farmgate_pdu::snmp::{SnmpClient, Value, Version};
use farmgate_pdu::{PduDriver, PortMeasure, PowerError, driver_for};
use farmgate_wire::{PduRecord, PortState, YamlValue};
use serde_json::json;

/// The pass_persist helper: serves `objects` from the JSON state file; a SET of an OID
/// listed in `refuse` (or unknown) answers not-writable, one in `ignore` is acknowledged
/// but changes nothing, and `links` copy a written value, mapped, to other OIDs.
const PASS_SCRIPT: &str = r#"
import json, os, sys
state_path = sys.argv[1]
def key(o):
    return tuple(int(x) for x in o.strip('.').split('.'))
def load():
    with open(state_path) as f:
        return json.load(f)
def save(s):
    with open(state_path + '.tmp', 'w') as f:
        json.dump(s, f)
    os.replace(state_path + '.tmp', state_path)
def answer(oid, obj):
    sys.stdout.write('%s\n%s\n%s\n' % (oid, obj[0], obj[1]))
while True:
    line = sys.stdin.readline()
    if not line:
        break
    cmd = line.strip()
    if cmd == 'PING':
        sys.stdout.write('PONG\n')
    elif cmd in ('get', 'getnext'):
        oid = sys.stdin.readline().strip()
        objs = load()['objects']
        if cmd == 'get':
            found = oid if oid in objs else None
        else:
            later = sorted((k for k in objs if key(k) > key(oid)), key=key)
            found = later[0] if later else None
        if found is None:
            sys.stdout.write('NONE\n')
        else:
            answer(found, objs[found])
    elif cmd == 'set':
        oid = sys.stdin.readline().strip()
        typ, _, val = sys.stdin.readline().strip().partition(' ')
        s = load()
        if oid in s.get('refuse', []) or oid not in s['objects']:
            sys.stdout.write('not-writable\n')
        elif typ != 'integer':
            sys.stdout.write('wrong-type\n')
        elif oid in s.get('ignore', []):
            sys.stdout.write('DONE\n')
        else:
            s['objects'][oid] = ['integer', int(val)]
            for target, mapping in s.get('links', {}).get(oid, []):
                if val in mapping:
                    s['objects'][target] = ['integer', mapping[val]]
            save(s)
            sys.stdout.write('DONE\n')
    elif cmd:
        sys.stdout.write('NONE\n')
    sys.stdout.flush()
"#;

/// A running snmpd on 127.0.0.1, killed on drop.
struct Agent {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Agent {
    /// Starts snmpd serving `state` (see PASS_SCRIPT) under each of `subtrees`.
    async fn start(state: serde_json::Value, subtrees: &[&str]) -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let script = dir.path().join("outlets.py");
        std::fs::write(&script, PASS_SCRIPT).expect("writing the pass script");
        let state_path = dir.path().join("state.json");
        std::fs::write(&state_path, state.to_string()).expect("writing the state");
        let mut conf = String::from("rwcommunity private 127.0.0.1\n");
        for tree in subtrees {
            conf.push_str(&format!(
                "pass_persist {tree} /usr/bin/python3 {} {}\n",
                script.display(),
                state_path.display()
            ));
        }
        let conf_path = dir.path().join("snmpd.conf");
        std::fs::write(&conf_path, conf).expect("writing snmpd.conf");
        let persist = dir.path().join("persist");
        std::fs::create_dir_all(&persist).expect("persistent dir");
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("a free UDP port")
            .port();
        let log = std::fs::File::create(dir.path().join("snmpd.log")).expect("log file");
        let child = Command::new("/usr/sbin/snmpd")
            .args(["-f", "-Lo", "-C", "-c"])
            .arg(&conf_path)
            .arg(format!("udp:127.0.0.1:{port}"))
            .env("SNMP_PERSISTENT_DIR", &persist)
            .env("MIBS", "")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("starting /usr/sbin/snmpd (apt-get install snmpd)");
        let agent = Agent {
            child: Some(child),
            port,
            dir,
        };
        // Ready when it answers sysUpTime.0.
        let probe = SnmpClient::new("127.0.0.1", port, "private", Version::V2c)
            .with_timeout(Duration::from_millis(200))
            .with_retries(0);
        let uptime = "1.3.6.1.2.1.1.3.0".parse().expect("OID");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if probe.get(std::slice::from_ref(&uptime)).await.is_ok() {
                return agent;
            }
            assert!(
                Instant::now() < deadline,
                "snmpd did not answer within 15 s; log:\n{}",
                agent.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("snmpd.log")).unwrap_or_default()
    }

    fn state(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.state_path()).expect("reading the state");
        serde_json::from_str(&text).expect("state JSON")
    }

    fn state_path(&self) -> PathBuf {
        self.dir.path().join("state.json")
    }

    /// The integer the script holds for `oid`.
    fn object(&self, oid: &str) -> serde_json::Value {
        self.state()["objects"][format!(".{oid}")][1].clone()
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

fn record(driver: &str, config: &[(&str, &str)]) -> PduRecord {
    PduRecord {
        driver: driver.into(),
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), YamlValue::String(v.to_string())))
            .collect::<BTreeMap<_, _>>(),
        reserved_port_ids: vec![],
        port_labels: Default::default(),
    }
}

fn driver(pdu: &str, drv: &str, config: &[(&str, &str)]) -> Box<dyn PduDriver> {
    driver_for(pdu, &record(drv, config)).expect("driver config")
}

fn obj(typ: &str, value: i64) -> serde_json::Value {
    json!([typ, value])
}

const APC_CTL: &str = "1.3.6.1.4.1.318.1.1.4.4.2.1.3";
const CP_CMD: &str = "1.3.6.1.4.1.3808.1.1.3.3.3.1.1.4";
const CP_STATE: &str = "1.3.6.1.4.1.3808.1.1.3.3.5.1.1.4";
const CP_STATUS: &str = "1.3.6.1.4.1.3808.1.1.3.3.5.1.1";

#[tokio::test]
async fn apc_masterswitch_switches_and_reads_back_over_snmpv1() {
    let mut objects = serde_json::Map::new();
    objects.insert(".1.3.6.1.4.1.318.1.1.4.4.1.0".into(), obj("integer", 4));
    for n in 1..=4 {
        objects.insert(format!(".{APC_CTL}.{n}"), obj("integer", 2));
    }
    let agent = Agent::start(
        json!({"objects": objects, "refuse": [format!(".{APC_CTL}.4")]}),
        &[".1.3.6.1.4.1.318"],
    )
    .await;
    let pdu = driver(
        "apc1",
        "apc_masterswitch",
        &[
            ("hostname", &agent.host()),
            ("version", "1"),
            ("timeout", "1"),
        ],
    );
    assert_eq!(pdu.driver_name(), "apc_masterswitch");
    assert_eq!(pdu.ports().await.expect("ports"), ["1", "2", "3", "4"]);
    assert_eq!(pdu.get("1").await.expect("get"), PortState::Off);

    pdu.set("1", PortState::On).await.expect("switch on");
    assert_eq!(pdu.get("1").await.expect("get"), PortState::On);
    assert_eq!(
        agent.object(&format!("{APC_CTL}.1")),
        json!(1),
        "the agent holds outletOn"
    );
    assert_eq!(
        pdu.get("2").await.expect("get"),
        PortState::Off,
        "other outlets untouched"
    );
    pdu.set("1", PortState::Off).await.expect("switch off");
    assert_eq!(agent.object(&format!("{APC_CTL}.1")), json!(2));

    // The agent refuses outlet 4: an error naming PDU, OID and status, never Ok. (SNMPv1
    // has no notWritable: the agent translates it to noSuchName, RFC 2576.)
    let e = pdu
        .set("4", PortState::On)
        .await
        .expect_err("a refused SET returned Ok");
    let msg = e.to_string();
    assert!(matches!(e, PowerError::Refused { .. }), "{msg}");
    assert!(
        msg.contains("apc1") && msg.contains(&format!("{APC_CTL}.4")) && msg.contains("noSuchName"),
        "{msg}"
    );
    assert_eq!(pdu.get("4").await.expect("get"), PortState::Off);

    let e = pdu.get("5").await.expect_err("outlet 5 does not exist");
    assert!(
        matches!(e, PowerError::BadPort { .. }) && e.to_string().contains("1 to 4"),
        "{e}"
    );
    assert_eq!(
        pdu.measure("1").await.expect("measure"),
        None,
        "MasterSwitch measures nothing"
    );
    let e = pdu
        .set("1", PortState::Unknown)
        .await
        .expect_err("Unknown is not settable");
    assert!(matches!(e, PowerError::BadState { .. }), "{e}");
}

#[tokio::test]
async fn cyberpower_switches_reads_state_column_and_measures() {
    let mut objects = serde_json::Map::new();
    let mut links = serde_json::Map::new();
    objects.insert(".1.3.6.1.4.1.3808.1.1.3.1.8.0".into(), obj("integer", 3));
    for n in 1..=3 {
        objects.insert(format!(".{CP_CMD}.{n}"), obj("integer", 2));
        objects.insert(format!(".{CP_STATE}.{n}"), obj("integer", 2));
        links.insert(
            format!(".{CP_CMD}.{n}"),
            json!([[format!(".{CP_STATE}.{n}"), {"1": 1, "2": 2}]]),
        );
    }
    // Outlets 1 and 2 measure (load 0.1 A, power W, energy 0.1 kWh); outlet 3 does not.
    for (n, load, watts, energy) in [(1, 4, 37, 125), (2, 0, 0, 7)] {
        objects.insert(format!(".{CP_STATUS}.7.{n}"), obj("gauge", load));
        objects.insert(format!(".{CP_STATUS}.8.{n}"), obj("gauge", watts));
        objects.insert(format!(".{CP_STATUS}.13.{n}"), obj("gauge", energy));
    }
    let agent = Agent::start(
        json!({"objects": objects, "links": links}),
        &[".1.3.6.1.4.1.3808"],
    )
    .await;
    let pdu = driver("cp1", "cyberpower", &[("hostname", &agent.host())]);
    assert_eq!(pdu.ports().await.expect("ports"), ["1", "2", "3"]);

    for port in ["1", "3"] {
        pdu.set(port, PortState::On).await.expect("switch on");
        assert_eq!(pdu.get(port).await.expect("get"), PortState::On);
        assert_eq!(
            agent.object(&format!("{CP_CMD}.{port}")),
            json!(1),
            "immediateOn written"
        );
        assert_eq!(
            agent.object(&format!("{CP_STATE}.{port}")),
            json!(1),
            "outletStatusOn"
        );
    }
    pdu.set("1", PortState::Off).await.expect("switch off");
    assert_eq!(pdu.get("1").await.expect("get"), PortState::Off);
    assert_eq!(pdu.get("2").await.expect("get"), PortState::Off);

    let m = pdu
        .measure("1")
        .await
        .expect("measure")
        .expect("cyberpower measures");
    assert_eq!(m.power_w, Some(37.0));
    assert_eq!(m.energy_wh, Some(12_500.0));
    let amps = m.current_a.expect("current");
    assert!((amps - 0.4).abs() < 1e-9, "{amps}");
    assert_eq!(
        pdu.measure("3").await.expect("measure"),
        Some(PortMeasure::default()),
        "an outlet without meter columns measures nothing"
    );
}

/// The generic driver's agent: outlet count at .1.0, state column .2 (10 on, 20 off),
/// control column .3 (write 1 on, 0 off), power .4 (tenths of W), energy .5 (Counter64,
/// mWh). Outlet 2 acknowledges writes but never switches; outlet 3 refuses writes.
fn generic_state() -> serde_json::Value {
    let base = "1.3.6.1.4.1.99999";
    let mut objects = serde_json::Map::new();
    let mut links = serde_json::Map::new();
    objects.insert(format!(".{base}.1.0"), obj("integer", 4));
    for n in 1..=4 {
        objects.insert(format!(".{base}.2.{n}"), obj("integer", 20));
        objects.insert(format!(".{base}.3.{n}"), obj("integer", 0));
        objects.insert(format!(".{base}.4.{n}"), obj("integer", 1234 + n));
        objects.insert(
            format!(".{base}.5.{n}"),
            obj("counter64", 12_345_678_901_234 + n),
        );
        links.insert(
            format!(".{base}.3.{n}"),
            json!([[format!(".{base}.2.{n}"), {"1": 10, "0": 20}]]),
        );
    }
    json!({
        "objects": objects,
        "links": links,
        "ignore": [format!(".{base}.3.2")],
        "refuse": [format!(".{base}.3.3")],
    })
}

fn generic_config(host: &str) -> Vec<(&'static str, String)> {
    let base = "1.3.6.1.4.1.99999";
    vec![
        ("hostname", host.to_string()),
        ("community", "private".into()),
        ("version", "2c".into()),
        ("timeout", "1".into()),
        ("retries", "1".into()),
        ("outlet_count_oid", format!("{base}.1.0")),
        ("state_oid", format!(".{base}.2")),
        ("set_oid", format!("{base}.3")),
        ("on_value", "1".into()),
        ("off_value", "0".into()),
        ("state_on_value", "10".into()),
        ("state_off_value", "20".into()),
        ("power_oid", format!("{base}.4")),
        ("power_scale", "0.1".into()),
        ("energy_oid", format!("{base}.5")),
        ("energy_scale", "0.001".into()),
    ]
}

fn generic_driver(pdu: &str, host: &str) -> Box<dyn PduDriver> {
    let cfg = generic_config(host);
    let pairs: Vec<(&str, &str)> = cfg.iter().map(|(k, v)| (*k, v.as_str())).collect();
    driver(pdu, "snmp", &pairs)
}

#[tokio::test]
async fn generic_snmp_driver_checks_the_read_back() {
    let agent = Agent::start(generic_state(), &[".1.3.6.1.4.1.99999"]).await;
    let pdu = generic_driver("gen1", &agent.host());
    assert_eq!(pdu.driver_name(), "snmp");
    assert_eq!(pdu.ports().await.expect("ports"), ["1", "2", "3", "4"]);

    pdu.set("1", PortState::On).await.expect("switch on");
    assert_eq!(pdu.get("1").await.expect("get"), PortState::On);
    assert_eq!(
        agent.object("1.3.6.1.4.1.99999.3.1"),
        json!(1),
        "on_value written to set_oid"
    );
    assert_eq!(
        agent.object("1.3.6.1.4.1.99999.2.1"),
        json!(10),
        "state column reads state_on_value"
    );
    pdu.set("1", PortState::Off).await.expect("switch off");
    assert_eq!(pdu.get("1").await.expect("get"), PortState::Off);

    // Outlet 2 takes the write but stays off: after the read-back window, an error naming
    // PDU, port, expected and seen state.
    let started = Instant::now();
    let e = pdu
        .set("2", PortState::On)
        .await
        .expect_err("a set that did not take returned Ok");
    let msg = e.to_string();
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "read back for ~2 s, took {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        msg.contains("gen1")
            && msg.contains("port 2")
            && msg.contains("reads back off")
            && msg.contains("instead of on"),
        "{msg}"
    );

    let e = pdu
        .set("3", PortState::On)
        .await
        .expect_err("a refused SET returned Ok");
    let msg = e.to_string();
    assert!(
        msg.contains("gen1")
            && msg.contains("1.3.6.1.4.1.99999.3.3")
            && msg.contains("notWritable"),
        "{msg}"
    );

    let m = pdu
        .measure("4")
        .await
        .expect("measure")
        .expect("configured meters");
    let (w, wh) = (m.power_w.expect("power"), m.energy_wh.expect("energy"));
    assert!((w - 123.8).abs() < 1e-9, "{w}");
    assert!((wh - 12_345_678_901.238).abs() < 1e-3, "{wh}");
    assert_eq!(m.current_a, None);
}

#[tokio::test]
async fn generic_snmp_config_errors_name_pdu_driver_and_key() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[
                ("state_oid", "1.3.6.1"),
                ("outlet_count", "2"),
                ("on_value", "1"),
                ("off_value", "2"),
            ],
            "\"hostname\"",
        ),
        (
            &[
                ("hostname", "h"),
                ("outlet_count", "2"),
                ("on_value", "1"),
                ("off_value", "2"),
            ],
            "\"state_oid\"",
        ),
        (
            &[
                ("hostname", "h"),
                ("state_oid", "1.3.x"),
                ("outlet_count", "2"),
                ("on_value", "1"),
                ("off_value", "2"),
            ],
            "\"state_oid\"",
        ),
        (
            &[
                ("hostname", "h"),
                ("state_oid", "1.3.6"),
                ("on_value", "1"),
                ("off_value", "2"),
            ],
            "\"outlet_count\"",
        ),
        (
            &[
                ("hostname", "h"),
                ("state_oid", "1.3.6"),
                ("outlet_count", "2"),
                ("on_value", "1"),
                ("off_value", "2"),
                ("version", "3"),
            ],
            "\"version\"",
        ),
        (
            &[
                ("hostname", "h"),
                ("state_oid", "1.3.6"),
                ("outlet_count", "2"),
                ("on_value", "1"),
                ("off_value", "2"),
                ("power_scale", "2"),
            ],
            "\"power_scale\"",
        ),
        (
            &[
                ("hostname", "h"),
                ("state_oid", "1.3.6"),
                ("outlet_count", "2"),
                ("on_value", "1"),
                ("off_value", "2"),
                ("comunity", "x"),
            ],
            "unknown key",
        ),
    ];
    for (config, needle) in cases {
        let msg = match driver_for("P9", &record("snmp", config)) {
            Ok(_) => panic!("{config:?} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            msg.contains("P9") && msg.contains("snmp") && msg.contains(needle),
            "{config:?}: {msg}"
        );
    }
    let msg = match driver_for(
        "P8",
        &record("cyberpower", &[("hostname", "h"), ("state_oid", "1.3.6")]),
    ) {
        Ok(_) => panic!("a preset accepted state_oid"),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains("P8") && msg.contains("cyberpower") && msg.contains("state_oid"),
        "{msg}"
    );
}

fn net_snmp(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .env("MIBS", "")
        .output()
        .unwrap_or_else(|e| panic!("running {tool} (apt-get install snmp): {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test]
async fn our_client_and_net_snmp_tools_see_the_same_values() {
    let agent = Agent::start(generic_state(), &[".1.3.6.1.4.1.99999"]).await;
    let host = agent.host();
    let common = [
        "-v2c",
        "-c",
        "private",
        "-t",
        "2",
        "-r",
        "1",
        "-On",
        host.as_str(),
    ];
    let client = SnmpClient::new("127.0.0.1", agent.port, "private", Version::V2c);
    let oids = [
        "1.3.6.1.4.1.99999.1.0",
        "1.3.6.1.4.1.99999.2.3",
        "1.3.6.1.4.1.99999.4.2",
        "1.3.6.1.4.1.99999.5.1",
    ];
    let parsed: Vec<_> = oids.iter().map(|o| o.parse().expect("OID")).collect();
    let ours = client.get(&parsed).await.expect("our GET");
    for (oid, (got_oid, value)) in oids.iter().zip(&ours) {
        let mut args = common.to_vec();
        args.extend(["-Oqv", oid]);
        let theirs = net_snmp("snmpget", &args);
        assert_eq!(got_oid.to_string(), *oid);
        assert_eq!(value.to_string(), theirs, "{oid}");
    }
    assert_eq!(ours[3].1, Value::Counter64(12_345_678_901_235));

    // GetNext walks the same way as snmpgetnext.
    let start = "1.3.6.1.4.1.99999.2.4";
    let mut args = common.to_vec();
    args.extend(["-Oq", start]);
    let theirs = net_snmp("snmpgetnext", &args);
    let next = client
        .get_next(&[start.parse().expect("OID")])
        .await
        .expect("our GETNEXT");
    assert_eq!(format!(".{} {}", next[0].0, next[0].1), theirs);

    // Their SET, our read; our SET, their read.
    let mut args = common.to_vec();
    args.extend(["1.3.6.1.4.1.99999.3.4", "i", "1"]);
    net_snmp("snmpset", &args);
    let pdu = generic_driver("gen2", &host);
    assert_eq!(pdu.get("4").await.expect("get"), PortState::On);
    pdu.set("4", PortState::Off).await.expect("switch off");
    let mut args = common.to_vec();
    args.extend(["-Oqv", "1.3.6.1.4.1.99999.2.4", "1.3.6.1.4.1.99999.3.4"]);
    assert_eq!(net_snmp("snmpget", &args), "20\n0");

    // Our client's SET answers notWritable where theirs fails too.
    let refused = client
        .set(&[(
            "1.3.6.1.4.1.99999.3.3".parse().expect("OID"),
            Value::Integer(1),
        )])
        .await
        .expect_err("refused");
    assert!(
        refused.to_string().contains("notWritable (17)"),
        "{refused}"
    );
    let mut args = common.to_vec();
    args.extend(["1.3.6.1.4.1.99999.3.3", "i", "1"]);
    let out = Command::new("snmpset")
        .args(&args)
        .env("MIBS", "")
        .output()
        .expect("snmpset");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("notWritable"),
        "{out:?}"
    );
}

#[tokio::test]
async fn wrong_community_and_stopped_agent_time_out_naming_pdu_and_host() {
    let mut agent = Agent::start(generic_state(), &[".1.3.6.1.4.1.99999"]).await;
    let host = agent.host();
    let mut cfg = generic_config(&host);
    for (k, v) in cfg.iter_mut() {
        match *k {
            "community" => *v = "not-the-community".into(),
            "timeout" => *v = "0.3".into(),
            "retries" => *v = "1".into(),
            _ => {}
        }
    }
    let pairs: Vec<(&str, &str)> = cfg.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let wrong = driver("gen3", "snmp", &pairs);
    let started = Instant::now();
    let e = wrong
        .ports()
        .await
        .expect_err("a wrong community got an answer");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let msg = e.to_string();
    assert!(matches!(e, PowerError::Timeout { .. }), "{msg}");
    assert!(
        msg.contains("gen3") && msg.contains(&host) && msg.contains("1.3.6.1.4.1.99999.1.0"),
        "{msg}"
    );

    // The right community works, until the agent stops.
    let pdu = driver(
        "gen4",
        "snmp",
        &[
            ("hostname", &host),
            ("timeout", "0.3"),
            ("retries", "0"),
            ("outlet_count", "4"),
            ("state_oid", "1.3.6.1.4.1.99999.2"),
            ("set_oid", "1.3.6.1.4.1.99999.3"),
            ("on_value", "1"),
            ("off_value", "0"),
            ("state_on_value", "10"),
            ("state_off_value", "20"),
        ],
    );
    assert_eq!(pdu.get("1").await.expect("get"), PortState::Off);
    agent.stop();
    let e = pdu
        .set("1", PortState::On)
        .await
        .expect_err("a stopped agent answered");
    let msg = e.to_string();
    assert!(matches!(e, PowerError::Timeout { .. }), "{msg}");
    assert!(
        msg.contains("gen4") && msg.contains(&host) && msg.contains("1.3.6.1.4.1.99999.3.1"),
        "{msg}"
    );
}
