//! Arbitrary bytes (lossy UTF-8) as a kernel command line: `parse` must return errors, never
//! panic; what parses must be consistent (every container has an image, every named thing a
//! name), and merging the same text again must succeed and append the repeatable options.
#![no_main]

use farmgate_agent::cmdline::{self, B2cConfig, ContainerSpec, MountSource};
use libfuzzer_sys::fuzz_target;

fn check_container(c: &ContainerSpec) {
    assert!(!c.image.reference.is_empty(), "empty image in {c:?}");
    assert!(!c.image.reference.contains(char::is_whitespace), "{c:?}");
    for v in &c.volumes {
        assert!(v.target.starts_with('/'), "{v:?}");
        if let MountSource::Named(n) | MountSource::HostPath(n) = &v.source {
            assert!(!n.is_empty(), "{v:?}");
        }
        assert_eq!(v.read_only, v.options.iter().any(|o| o == "ro"));
    }
    // Splitting the raw value again gives the same result.
    let again = cmdline::parse_container("b2c.container", &c.raw).expect("reparse");
    assert_eq!(&again, c);
}

fn check(config: &B2cConfig) {
    for c in config
        .containers
        .iter()
        .chain(&config.post_containers)
        .chain(&config.services)
    {
        check_container(c);
    }
    for m in &config.minio {
        assert!(!m.alias.is_empty() && !m.url.is_empty(), "{m:?}");
    }
    for v in &config.volumes {
        assert!(!v.name.is_empty(), "{v:?}");
        for p in v.pull_from.iter().chain(&v.push_to) {
            assert!(!p.alias.is_empty() && !p.path.is_empty(), "{p:?}");
        }
    }
    for f in &config.filesystems {
        assert!(!f.name.is_empty() && !f.src.is_empty(), "{f:?}");
    }
    for i in &config.ifaces {
        assert!(!i.name.is_empty(), "{i:?}");
    }
    assert!(!config.shutdown_cmd.is_empty() && !config.reboot_cmd.is_empty());
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = cmdline::split_kernel_cmdline(&text);
    let _ = cmdline::shell_split(&text);
    let _ = cmdline::parse_container("b2c.run", &text);
    if let Ok(config) = cmdline::parse(&text) {
        check(&config);
        let mut merged = config.clone();
        merged
            .merge_extra(&text)
            .expect("text that parsed must merge");
        check(&merged);
        assert_eq!(merged.containers.len(), 2 * config.containers.len());
        assert_eq!(merged.volumes.len(), 2 * config.volumes.len());
        assert_eq!(merged.minio.len(), 2 * config.minio.len());
    }
});
