//! The DUT agent's registration against a real gateway: the machine's own hardware tags
//! (this host's /proc and /sys) posted to `/api/v1/dut/`, as a new DUT would.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use farmgate_agent::{hwtags, register};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_registers_this_machine_with_its_hardware_tags() {
    let gw = Gateway::start(GatewayOptions::default()).await;
    let hw = hwtags::collect(Path::new("/")).expect("this host's hardware");
    let mut reg = hwtags::registration(&hw, Some("/dev/ttyS0"));
    reg.id = "52:54:00:ab:cd:ef".into();
    let tags = hwtags::tags(&hw);
    assert!(tags.iter().any(|t| t.starts_with("cpu:arch:")), "{tags:?}");
    reg.tags = tags.clone();
    let answer = register::register(&gw.url(), &reg, Duration::from_secs(20))
        .await
        .expect("registered");
    assert!(answer.is_object(), "{answer}");
    let duts: farmgate_wire::DutList = gw.get_json("/api/v1/duts").await;
    let dut = duts.duts.get("52:54:00:ab:cd:ef").expect("the new DUT");
    for t in &tags {
        assert!(
            dut.record.tags.contains(t),
            "tag {t} missing: {:?}",
            dut.record.tags
        );
    }
    assert_eq!(dut.record.local_tty_device.as_deref(), Some("ttyS0"));
    assert_eq!(
        dut.record.base_name.as_deref(),
        Some(hwtags::base_name(&hw).as_str())
    );
    // Registering again (a reboot into the default image) updates the same machine.
    reg.tags.push("extra:tag".into());
    register::register(&gw.url(), &reg, Duration::from_secs(20))
        .await
        .expect("registered again");
    let duts: farmgate_wire::DutList = gw.get_json("/api/v1/duts").await;
    assert_eq!(
        duts.duts
            .keys()
            .filter(|k| k.as_str() == "52:54:00:ab:cd:ef")
            .count(),
        1
    );
    assert!(
        duts.duts["52:54:00:ab:cd:ef"]
            .record
            .tags
            .contains(&"extra:tag".to_string())
    );
    // A gateway that is not there: an error naming the URL.
    let e = register::register("http://127.0.0.1:1", &reg, Duration::from_secs(5))
        .await
        .expect_err("nobody listens");
    assert!(
        e.to_string().contains("http://127.0.0.1:1/api/v1/dut/"),
        "{e}"
    );
    // A registration the gateway refuses: its reason is shown.
    let mut bad = reg.clone();
    bad.id = "not a mac".into();
    let e = register::register(&gw.url(), &bad, Duration::from_secs(5))
        .await
        .expect_err("refused");
    assert!(
        e.to_string().contains("400") || e.to_string().contains("answered"),
        "{e}"
    );
    gw.stop().await;
}
