//! Hardware tags: fixture trees (Renoir laptop, QEMU machine, ARM board), the real host,
//! and odd inputs.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

use farmgate_agent::hwtags::{self, HwError, MAX_VALUE_LEN};

/// Writes `content` at `root/rel`, creating the parent directories.
fn put(root: &Path, rel: &str, content: impl AsRef<[u8]>) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("fixture path has a parent")).expect("mkdir");
    std::fs::write(&path, content).expect("write fixture file");
}

/// Creates `root/rel` as a symlink to `target` (which need not exist).
fn link(root: &Path, rel: &str, target: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("fixture path has a parent")).expect("mkdir");
    symlink(target, &path).expect("symlink");
}

fn pci(root: &Path, addr: &str, vendor: &str, device: &str, class: &str, driver: Option<&str>) {
    let d = format!("sys/bus/pci/devices/{addr}");
    put(root, &format!("{d}/vendor"), format!("{vendor}\n"));
    put(root, &format!("{d}/device"), format!("{device}\n"));
    put(root, &format!("{d}/class"), format!("{class}\n"));
    put(root, &format!("{d}/subsystem_vendor"), "0x17aa\n");
    put(root, &format!("{d}/subsystem_device"), "0x5082\n");
    put(root, &format!("{d}/revision"), "0xc1\n");
    if let Some(drv) = driver {
        link(
            root,
            &format!("{d}/driver"),
            &format!("../../../bus/pci/drivers/{drv}"),
        );
    }
}

fn disk(root: &Path, name: &str, sectors: u64, rotational: u8, removable: u8) {
    put(
        root,
        &format!("sys/block/{name}/size"),
        format!("{sectors}\n"),
    );
    put(
        root,
        &format!("sys/block/{name}/queue/rotational"),
        format!("{rotational}\n"),
    );
    put(
        root,
        &format!("sys/block/{name}/removable"),
        format!("{removable}\n"),
    );
}

fn netif(root: &Path, name: &str, mac: &str, physical: bool) {
    put(
        root,
        &format!("sys/class/net/{name}/address"),
        format!("{mac}\n"),
    );
    put(root, &format!("sys/class/net/{name}/operstate"), "up\n");
    if physical {
        link(
            root,
            &format!("sys/class/net/{name}/device"),
            "../../../0000:02:00.0",
        );
    }
}

fn route(root: &Path, iface: &str, gw_le: &str, net_le: &str, mask_le: &str) {
    put(
        root,
        "proc/net/route",
        format!(
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
             {iface}\t00000000\t{gw_le}\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
             {iface}\t{net_le}\t00000000\t0001\t0\t0\t100\t{mask_le}\t0\t0\t0\n"
        ),
    );
}

fn fib_trie(root: &Path, net: &str, local: &str) {
    put(
        root,
        "proc/net/fib_trie",
        format!(
            "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n\
             \x20    +-- 127.0.0.0/8 2 0 2\n        |-- 127.0.0.1\n           /32 host LOCAL\n\
             \x20    +-- {net}/24 2 0 2\n        |-- {net}\n           /24 link UNICAST\n\
             \x20       |-- {local}\n           /32 host LOCAL\n"
        ),
    );
}

fn x86_cpuinfo(vendor: &str, family: u32, model: &str, flags: &str, cores: &[u32]) -> String {
    let mut s = String::new();
    for (i, core) in cores.iter().enumerate() {
        s.push_str(&format!(
            "processor\t: {i}\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: 96\n\
             model name\t: {model}\nphysical id\t: 0\nsiblings\t: {n}\ncore id\t\t: {core}\n\
             flags\t\t: {flags}\n\n",
            n = cores.len()
        ));
    }
    s
}

fn assert_safe(tags: &[String]) {
    for t in tags {
        assert!(
            t.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.:+-".contains(c)),
            "unsafe character in tag {t:?}"
        );
        assert!(t.len() <= 32 + MAX_VALUE_LEN, "tag too long: {t:?}");
    }
}

fn renoir_laptop(root: &Path) {
    put(
        root,
        "proc/cpuinfo",
        x86_cpuinfo(
            "AuthenticAMD",
            23,
            "AMD Ryzen 7 4800U with Radeon Graphics",
            "fpu vme lm sse4_2 avx avx2 aes svm sha_ni",
            &[0, 0, 1, 1],
        ),
    );
    put(
        root,
        "proc/meminfo",
        "MemTotal:       15731712 kB\nMemFree: 1 kB\n",
    );
    pci(root, "0000:00:00.0", "0x1022", "0x1630", "0x060000", None);
    pci(
        root,
        "0000:02:00.0",
        "0x8086",
        "0x2723",
        "0x028000",
        Some("iwlwifi"),
    );
    pci(
        root,
        "0000:03:00.0",
        "0x1002",
        "0x1636",
        "0x030000",
        Some("amdgpu"),
    );
    pci(
        root,
        "0000:03:00.1",
        "0x1002",
        "0x1637",
        "0x040300",
        Some("snd_hda_intel"),
    );
    disk(root, "nvme0n1", 1_000_215_216, 0, 0);
    disk(root, "loop0", 1000, 1, 0);
    disk(root, "zram0", 1000, 0, 0);
    put(root, "sys/class/dmi/id/sys_vendor", "LENOVO\n");
    put(root, "sys/class/dmi/id/product_name", "20UES00K00\n");
    put(
        root,
        "sys/class/dmi/id/product_version",
        "ThinkPad T14s Gen 1\n",
    );
    put(root, "sys/class/dmi/id/board_vendor", "LENOVO\n");
    put(root, "sys/class/dmi/id/board_name", "20UES00K00\n");
    put(root, "sys/class/dmi/id/bios_vendor", "LENOVO\n");
    put(root, "sys/class/dmi/id/bios_version", "R1CET65W(1.34 )\n");
    netif(root, "lo", "00:00:00:00:00:00", false);
    netif(root, "wlp2s0", "DE:AD:BE:EF:CA:FE", true);
    // default via 192.168.1.1 dev wlp2s0; 192.168.1.0/24 dev wlp2s0.
    route(root, "wlp2s0", "0101A8C0", "0001A8C0", "00FFFFFF");
    fib_trie(root, "192.168.1.0", "192.168.1.42");
}

#[test]
fn renoir_apu_laptop() {
    let dir = tempfile::tempdir().expect("tempdir");
    renoir_laptop(dir.path());
    let hw = hwtags::collect(dir.path()).expect("collect");
    assert!(hw.warnings.is_empty(), "{:?}", hw.warnings);
    let gpu = hw
        .pci
        .iter()
        .find(|d| d.address == "0000:03:00.0")
        .expect("gpu");
    assert_eq!(gpu.driver.as_deref(), Some("amdgpu"));
    assert_eq!(gpu.revision, Some(0xc1));
    assert_eq!(gpu.subsystem_vendor, Some(0x17aa));
    assert_eq!(hw.cpu.cores, 2);
    assert_eq!(hw.cpu.threads, 4);
    assert_eq!(hw.disks.len(), 1);
    assert_eq!(hw.disks[0].size_bytes, 1_000_215_216 * 512);
    let dmi = hw.dmi.as_ref().expect("dmi");
    assert_eq!(dmi.bios_version.as_deref(), Some("R1CET65W(1.34 )"));

    let tags = hwtags::tags(&hw);
    assert_eq!(
        tags,
        [
            "amdgpu:APU",
            "amdgpu:architecture:GCN5.1",
            "amdgpu:codename:RENOIR",
            "amdgpu:family:RV",
            "amdgpu:gfxversion:gfx9",
            "amdgpu:pciid:0x1002:0x1636",
            "cpu:arch:x86_64",
            "cpu:cores:2",
            "cpu:family:23",
            "cpu:flag:aes",
            "cpu:flag:avx",
            "cpu:flag:avx2",
            "cpu:flag:sha_ni",
            "cpu:flag:sse4_2",
            "cpu:flag:svm",
            "cpu:model:AMD_Ryzen_7_4800U_with_Radeon_Graphics",
            "cpu:threads:4",
            "cpu:vendor:AuthenticAMD",
            "disk:count:1",
            "disk:nvme",
            "disk:ssd",
            "dmi:board:20UES00K00",
            "dmi:product:20UES00K00",
            "dmi:vendor:LENOVO",
            "mem:size:15GiB",
            "pci:0x1002:0x1636",
            "pci:0x8086:0x2723",
        ]
    );
    assert_safe(&tags);
    assert_eq!(hwtags::base_name(&hw), "gfx9");

    let reg = hwtags::registration(&hw, Some("/dev/ttyUSB0"));
    assert_eq!(reg.id, "de:ad:be:ef:ca:fe");
    assert_eq!(reg.ip_address.as_deref(), Some("192.168.1.42"));
    assert_eq!(reg.base_name.as_deref(), Some("gfx9"));
    assert_eq!(reg.local_tty_device.as_deref(), Some("ttyUSB0"));
    assert_eq!(reg.tags, tags);
    // The body is what the gateway accepts (deny_unknown_fields on its side).
    let json = serde_json::to_string(&reg).expect("serialize");
    let back: farmgate_wire::DutRegistration = serde_json::from_str(&json).expect("parse back");
    assert_eq!(back, reg);
}

#[test]
fn qemu_machine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    put(
        root,
        "proc/cpuinfo",
        x86_cpuinfo(
            "GenuineIntel",
            6,
            "QEMU Virtual CPU version 2.5+",
            "fpu de pse lm sse4_2 hypervisor",
            &[0, 1],
        ),
    );
    put(root, "proc/meminfo", "MemTotal:        2030000 kB\n");
    pci(root, "0000:00:00.0", "0x8086", "0x1237", "0x060000", None);
    pci(
        root,
        "0000:00:01.0",
        "0x1234",
        "0x1111",
        "0x030000",
        Some("bochs-drm"),
    );
    pci(
        root,
        "0000:00:02.0",
        "0x1af4",
        "0x1000",
        "0x020000",
        Some("virtio-pci"),
    );
    pci(
        root,
        "0000:00:03.0",
        "0x1af4",
        "0x1001",
        "0x010000",
        Some("virtio-pci"),
    );
    put(root, "sys/bus/virtio/devices/virtio0/vendor", "0x1af4\n");
    put(root, "sys/bus/virtio/devices/virtio1/vendor", "0x1af4\n");
    disk(root, "vda", 41_943_040, 1, 0);
    disk(root, "sr0", 0, 1, 1); // empty CD-ROM drive: skipped
    put(root, "sys/class/dmi/id/sys_vendor", "QEMU\n");
    put(
        root,
        "sys/class/dmi/id/product_name",
        "Standard PC (i440FX + PIIX, 1996)\n",
    );
    netif(root, "eth0", "52:54:00:12:34:56", true);
    netif(root, "lo", "00:00:00:00:00:00", false);
    // default via 10.0.2.2 dev eth0; 10.0.2.0/24 dev eth0.
    route(root, "eth0", "0202000A", "0002000A", "00FFFFFF");
    fib_trie(root, "10.0.2.0", "10.0.2.15");

    let hw = hwtags::collect(root).expect("collect");
    assert!(hw.warnings.is_empty(), "{:?}", hw.warnings);
    assert_eq!(hw.virtio_bus_devices, 2);
    let tags = hwtags::tags(&hw);
    assert_eq!(
        tags,
        [
            "cpu:arch:x86_64",
            "cpu:cores:2",
            "cpu:family:6",
            "cpu:flag:hypervisor",
            "cpu:flag:sse4_2",
            "cpu:model:QEMU_Virtual_CPU_version_2.5+",
            "cpu:threads:2",
            "cpu:vendor:GenuineIntel",
            "disk:count:1",
            "disk:hdd",
            "dmi:product:Standard_PC_i440FX_+_PIIX_1996",
            "dmi:vendor:QEMU",
            "mem:size:2GiB",
            "pci:0x1234:0x1111",
            "pci:0x1af4:0x1000",
            "virtio:family:VIRTIO",
        ]
    );
    assert_safe(&tags);
    assert_eq!(hwtags::base_name(&hw), "virtio");
    let reg = hwtags::registration(&hw, None);
    assert_eq!(reg.id, "52:54:00:12:34:56");
    assert_eq!(reg.ip_address.as_deref(), Some("10.0.2.15"));
    assert_eq!(reg.local_tty_device, None);
}

#[test]
fn arm_board_without_dmi() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let mut cpuinfo = String::new();
    for i in 0..4 {
        cpuinfo.push_str(&format!(
            "processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n\
             CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n\
             CPU part\t: 0xd08\nCPU revision\t: 3\n\n"
        ));
    }
    cpuinfo.push_str(
        "Hardware\t: BCM2835\nRevision\t: c03114\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n",
    );
    put(root, "proc/cpuinfo", cpuinfo);
    put(root, "proc/meminfo", "MemTotal:        3884360 kB\n");
    put(
        root,
        "proc/device-tree/model",
        b"Raspberry Pi 4 Model B Rev 1.4\0",
    );
    disk(root, "mmcblk0", 62_333_952, 0, 0);
    disk(root, "ram0", 8192, 0, 0);
    netif(root, "eth0", "dc:a6:32:01:02:03", true);
    // default via 10.42.0.1 dev eth0; no fib_trie: no IP address.
    route(root, "eth0", "01002A0A", "00002A0A", "00FFFFFF");

    let hw = hwtags::collect(root).expect("collect");
    assert!(hw.warnings.is_empty(), "{:?}", hw.warnings);
    assert_eq!(hw.dmi, None);
    let tags = hwtags::tags(&hw);
    assert_eq!(
        tags,
        [
            "cpu:arch:aarch64",
            "cpu:cores:4",
            "cpu:family:0xd08",
            "cpu:flag:asimd",
            "cpu:threads:4",
            "cpu:vendor:ARM",
            "disk:count:1",
            "disk:ssd",
            "dt:model:Raspberry_Pi_4_Model_B_Rev_1.4",
            "mem:size:4GiB",
        ]
    );
    assert_safe(&tags);
    assert_eq!(hwtags::base_name(&hw), "aarch64");
    let reg = hwtags::registration(&hw, Some("ttyAMA0"));
    assert_eq!(reg.id, "dc:a6:32:01:02:03");
    assert_eq!(reg.ip_address, None);
    let route = hw.default_route.as_ref().expect("default route");
    assert_eq!(route.gateway, Some("10.42.0.1".parse().expect("ip")));
}

#[test]
fn unknown_amd_gpu_and_discrete_before_integrated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    put(
        root,
        "proc/cpuinfo",
        x86_cpuinfo(
            "GenuineIntel",
            6,
            "Intel(R) Core(TM) i7-1185G7 @ 3.00GHz",
            "lm avx512f",
            &[0],
        ),
    );
    put(root, "proc/meminfo", "MemTotal: 400000 kB\n");
    pci(
        root,
        "0000:00:02.0",
        "0x8086",
        "0x9a49",
        "0x030000",
        Some("i915"),
    );
    pci(root, "0000:01:00.0", "0x1002", "0xabcd", "0x038000", None);
    pci(
        root,
        "0000:02:00.0",
        "0x10de",
        "0x2484",
        "0x030000",
        Some("nouveau"),
    );
    let hw = hwtags::collect(root).expect("collect");
    let tags = hwtags::tags(&hw);
    assert_eq!(
        tags,
        [
            "amdgpu:pciid:0x1002:0xabcd",
            "cpu:arch:x86_64",
            "cpu:cores:1",
            "cpu:family:6",
            "cpu:flag:avx512f",
            "cpu:model:Intel_R_Core_TM_i7-1185G7_3.00GHz",
            "cpu:threads:1",
            "cpu:vendor:GenuineIntel",
            "disk:count:0",
            "intelgpu:pciid:0x8086:0x9a49",
            "mem:size:391MiB",
            "nvidia:pciid:0x10de:0x2484",
            "pci:0x1002:0xabcd",
            "pci:0x10de:0x2484",
            "pci:0x8086:0x9a49",
        ]
    );
    // The unknown AMD GPU is discrete and comes first in address order.
    assert_eq!(hwtags::base_name(&hw), "amdgpu");
    // Without a default route, the id falls back to a physical interface's MAC: none here.
    assert_eq!(hwtags::registration(&hw, None).id, "");
}

#[test]
fn real_machine() {
    let hw = hwtags::collect(Path::new("/")).expect("collect on this host");
    let tags = hwtags::tags(&hw);
    assert_safe(&tags);

    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("read /proc/cpuinfo");
    let processors = cpuinfo
        .lines()
        .filter(|l| l.split(':').next().map(str::trim) == Some("processor"))
        .count();
    assert!(
        tags.contains(&format!("cpu:threads:{processors}")),
        "{tags:?}"
    );
    let nproc: usize = String::from_utf8(Command::new("nproc").output().expect("run nproc").stdout)
        .expect("utf-8")
        .trim()
        .parse()
        .expect("nproc prints a number");
    assert!(
        hw.cpu.threads >= nproc,
        "{} < nproc {nproc}",
        hw.cpu.threads
    );
    assert!(hw.cpu.cores >= 1 && hw.cpu.cores <= hw.cpu.threads);

    let uname = String::from_utf8(
        Command::new("uname")
            .arg("-m")
            .output()
            .expect("uname")
            .stdout,
    )
    .expect("utf-8");
    assert!(
        tags.contains(&format!("cpu:arch:{}", uname.trim())),
        "{tags:?}"
    );

    if let Some(model) = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')))
        .map(|(_, m)| m.trim().to_string())
    {
        let tag = tags
            .iter()
            .find(|t| t.starts_with("cpu:model:"))
            .expect("cpu:model tag");
        for word in model
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            assert!(tag.contains(word), "{word} missing from {tag}");
        }
    }
    if cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "avx2"))
    {
        assert!(tags.contains(&"cpu:flag:avx2".to_string()));
    }

    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("read /proc/meminfo");
    let kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("MemTotal");
    let gib = kib / 1024.0 / 1024.0;
    let mem_tag = tags
        .iter()
        .find(|t| t.starts_with("mem:size:"))
        .expect("mem tag");
    if gib >= 1.0 {
        let n: f64 = mem_tag
            .trim_start_matches("mem:size:")
            .trim_end_matches("GiB")
            .parse()
            .expect("GiB count");
        assert!((n - gib).abs() <= 0.5 + 1e-9, "{mem_tag} vs {gib} GiB");
    }

    // The default-route interface and its address agree with iproute2.
    if let Some(route) = &hw.default_route {
        let mac = std::fs::read_to_string(format!("/sys/class/net/{}/address", route.interface))
            .expect("mac of the default-route interface");
        let reg = hwtags::registration(&hw, None);
        assert_eq!(reg.id, mac.trim());
        if let Ok(out) = Command::new("ip")
            .args(["-4", "-o", "addr", "show", "dev", &route.interface])
            .output()
        {
            let text = String::from_utf8_lossy(&out.stdout);
            if out.status.success() && text.contains(" inet ") {
                let ip = reg
                    .ip_address
                    .expect("ip address of the default-route interface");
                assert!(text.contains(&format!("inet {ip}/")), "{ip} not in {text}");
            }
        }
    }
}

#[test]
fn odd_inputs_do_not_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    // Truncated in the middle of a line, no trailing newline.
    put(
        root,
        "proc/cpuinfo",
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xe\nflags\t\t: fpu vme de ps",
    );
    put(root, "proc/meminfo", "MemTotal:   8000000 kB");
    pci(root, "0000:00:02.0", "0xZZZZ", "hello", "0x030000", None);
    pci(
        root,
        "0000:00:03.0",
        "0x1002",
        "0x1636",
        "not-a-class",
        None,
    );
    pci(root, "0000:00:04.0", "0x123456789", "0x1", "0x030000", None);
    put(root, "sys/class/dmi/id/sys_vendor", "A".repeat(1 << 20));
    let binary: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    put(root, "sys/class/dmi/id/product_name", &binary);
    put(root, "sys/class/dmi/id/board_name", "  \n\0");
    disk(root, "sda", 0, 1, 0);
    put(root, "sys/block/sdb/size", "lots\n");
    put(root, "sys/block/sdc/size", "99999999999999999999999999\n");
    put(
        root,
        "proc/net/route",
        "Iface\tDestination\ngarbage line\n\0\0\0\n",
    );
    put(root, "proc/net/fib_trie", "|-- 999.1.1.1\n/32 host LOCAL\n");
    std::fs::create_dir_all(root.join("sys/class/net/eth0")).expect("mkdir");

    let hw = hwtags::collect(root).expect("collect");
    let tags = hwtags::tags(&hw);
    assert_safe(&tags);
    assert!(tags.contains(&"cpu:arch:i686".to_string()), "{tags:?}");
    assert!(tags.contains(&"cpu:threads:1".to_string()));
    assert!(tags.contains(&"cpu:model:Intel_R_Xe".to_string()));
    assert!(tags.contains(&"mem:size:8GiB".to_string()));
    assert!(tags.contains(&"disk:count:0".to_string()));
    assert!(
        !tags
            .iter()
            .any(|t| t.starts_with("pci:") || t.contains("pciid")),
        "{tags:?}"
    );
    let vendor = tags
        .iter()
        .find(|t| t.starts_with("dmi:vendor:"))
        .expect("dmi vendor");
    assert_eq!(vendor.len(), "dmi:vendor:".len() + MAX_VALUE_LEN);
    assert!(tags.iter().any(|t| t.starts_with("dmi:product:")));
    assert!(!tags.iter().any(|t| t.starts_with("dmi:board")));
    // Every problem is reported with its file.
    for file in [
        "0000:00:02.0/vendor",
        "0000:00:02.0/device",
        "0000:00:03.0/class",
        "0000:00:04.0/vendor",
        "sdb/size",
        "sdc/size",
        "proc/net/route",
    ] {
        assert!(
            hw.warnings.iter().any(|w| w.contains(file)),
            "no warning about {file}: {:?}",
            hw.warnings
        );
    }
    assert_eq!(hw.default_route, None);
    assert_eq!(hwtags::base_name(&hw), "i686");
    let reg = hwtags::registration(&hw, None);
    assert_eq!(reg.id, "");
    assert_eq!(reg.ip_address, None);
}

#[test]
fn required_files_name_themselves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    match hwtags::collect(root) {
        Err(HwError::Read { path, .. }) => assert!(path.ends_with("proc/cpuinfo"), "{path:?}"),
        other => panic!("expected a read error on cpuinfo, got {other:?}"),
    }
    put(root, "proc/cpuinfo", "");
    put(root, "proc/meminfo", "MemFree: 12 kB\nMemTotal: lots kB\n");
    let err = hwtags::collect(root).expect_err("no MemTotal");
    assert!(err.to_string().contains("proc/meminfo"), "{err}");
    assert!(matches!(err, HwError::Parse { .. }));

    // An empty cpuinfo is not an error: just fewer tags.
    put(root, "proc/meminfo", "MemTotal: 1048576 kB\n");
    let hw = hwtags::collect(root).expect("collect");
    let tags = hwtags::tags(&hw);
    assert_eq!(tags, ["disk:count:0", "mem:size:1GiB"]);
    assert_eq!(hwtags::base_name(&hw), "unknown");
}
