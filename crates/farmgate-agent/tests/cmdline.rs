//! The `b2c.*` kernel command line: every option, its default and a bad value; the CI-tron
//! example; kernel and shell quoting; repeatable options; extra arguments merged in.

use std::collections::BTreeSet;
use std::time::Duration;

use farmgate_agent::cmdline::{
    B2cConfig, BucketPath, CacheDevice, CmdlineError, EnvVar, Expiration, ImageTransport,
    MountSource, NtpPeer, Route, Trigger, parse, parse_container, shell_split,
    split_kernel_cmdline,
};

const EXAMPLE: &str = r#"console=ttyS0 b2c.minio="job,http://10.42.0.1:9000,AKEY,SKEY" b2c.volume="job-volume,mirror=job/job-bucket-1,pull_on=pipeline_start,push_on=changes,expiration=pipeline_end" b2c.container="-ti --tls-verify=false -v job-volume:/job docker://10.42.0.1:8002/docker.io/library/alpine:latest sh -c 'echo hi > /job/out.txt'" b2c.ntp_peer=auto b2c.cache_device=none b2c.poweroff_delay=5 b2c.pipefail"#;

/// The option named in an error.
fn option_of(err: &CmdlineError) -> &str {
    match err {
        CmdlineError::MissingValue { option } | CmdlineError::InvalidValue { option, .. } => option,
        CmdlineError::UnterminatedQuote { .. } => "",
    }
}

/// Asserts `cmdline` fails on `option`, with `needle` in the message.
fn assert_bad(cmdline: &str, option: &str, needle: &str) {
    let err = parse(cmdline).expect_err(cmdline);
    assert_eq!(option_of(&err), option, "{err}");
    let msg = err.to_string();
    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
}

#[test]
fn example_command_line() {
    let c = parse(EXAMPLE).unwrap();
    assert_eq!(c.minio.len(), 1);
    let m = &c.minio[0];
    assert_eq!(
        (
            m.alias.as_str(),
            m.url.as_str(),
            m.access_key.as_str(),
            m.secret_key.as_str()
        ),
        ("job", "http://10.42.0.1:9000", "AKEY", "SKEY")
    );
    assert!(!format!("{m:?}").contains("SKEY"), "secret in Debug");
    assert_eq!(c.volumes.len(), 1);
    let v = &c.volumes[0];
    assert_eq!(v.name, "job-volume");
    let bucket = BucketPath {
        alias: "job".into(),
        path: "job-bucket-1".into(),
    };
    assert_eq!(v.pull_from.as_ref(), Some(&bucket));
    assert_eq!(v.push_to.as_ref(), Some(&bucket));
    assert_eq!(v.pull_on, BTreeSet::from([Trigger::PipelineStart]));
    assert_eq!(v.push_on, BTreeSet::from([Trigger::Changes]));
    assert_eq!(v.expiration, Expiration::PipelineEnd);
    assert_eq!(c.containers.len(), 1);
    let ct = &c.containers[0];
    assert!(ct.tty && ct.interactive);
    assert_eq!(ct.tls_verify, Some(false));
    assert_eq!(ct.volumes.len(), 1);
    assert_eq!(
        ct.volumes[0].source,
        MountSource::Named("job-volume".into())
    );
    assert_eq!(ct.volumes[0].target, "/job");
    assert!(!ct.volumes[0].read_only);
    assert_eq!(ct.image.transport, ImageTransport::Docker);
    assert_eq!(
        ct.image.reference,
        "10.42.0.1:8002/docker.io/library/alpine:latest"
    );
    assert_eq!(
        ct.image.to_string(),
        "docker://10.42.0.1:8002/docker.io/library/alpine:latest"
    );
    assert_eq!(ct.args, ["sh", "-c", "echo hi > /job/out.txt"]);
    assert!(ct.unsupported.is_empty());
    assert_eq!(c.ntp_peer, NtpPeer::Auto);
    assert_eq!(c.cache_device, CacheDevice::None);
    assert_eq!(c.poweroff_delay, Duration::from_secs(5));
    assert!(c.pipefail);
    assert!(c.unknown.is_empty());
}

#[test]
fn defaults_are_boot2containers() {
    let c = parse("console=ttyS0 quiet").unwrap();
    assert_eq!(c, B2cConfig::default());
    assert!(c.containers.is_empty() && c.post_containers.is_empty() && c.services.is_empty());
    assert!(!c.pipefail);
    assert_eq!(c.cache_device, CacheDevice::None);
    assert_eq!(c.swap, None);
    assert_eq!(c.ntp_peer, NtpPeer::None);
    assert!(c.minio.is_empty() && c.volumes.is_empty() && c.filesystems.is_empty());
    assert!(c.ifaces.is_empty());
    assert_eq!(c.poweroff_delay, Duration::ZERO);
    assert_eq!(c.shutdown_cmd, "poweroff -f");
    assert_eq!(c.reboot_cmd, "reboot -f");
    assert_eq!(c.extra_args_url, None);
    assert_eq!(c.hostname, None);
    assert_eq!(c.hostname_or_default(), "boot2container");
    assert_eq!(c.keymap, None);
    assert!(c.insmods.is_empty());
    assert!(!c.kernel_ip);
    assert!(c.init_args.is_empty());
}

// ----- kernel tokenizing -----

#[test]
fn kernel_words_quotes_and_double_dash() {
    let k = split_kernel_cmdline("  a=1\tb=\"x y\"\n\"c=d e\" flag -- init arg \"q r\"").unwrap();
    let pairs: Vec<(&str, Option<&str>)> = k
        .params
        .iter()
        .map(|p| (p.key.as_str(), p.value.as_deref()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("a", Some("1")),
            ("b", Some("x y")),
            ("c", Some("d e")),
            ("flag", None)
        ]
    );
    assert_eq!(k.init_args, ["init", "arg", "q r"]);
    let k = split_kernel_cmdline("k=").unwrap();
    assert_eq!(k.params[0].value.as_deref(), Some(""));
}

#[test]
fn b2c_after_double_dash_is_for_init() {
    let c = parse("b2c.hostname=a -- b2c.hostname=b single").unwrap();
    assert_eq!(c.hostname.as_deref(), Some("a"));
    assert_eq!(c.init_args, ["b2c.hostname=b", "single"]);
}

#[test]
fn unterminated_kernel_quote_is_an_error() {
    let err = parse(r#"console=ttyS0 b2c.container="docker://alpine sh"#).unwrap_err();
    match err {
        CmdlineError::UnterminatedQuote { offset, context } => {
            assert_eq!(offset, 28);
            assert!(context.starts_with("\"docker://alpine"), "{context}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn non_b2c_parameters_are_ignored_except_ip() {
    let c = parse("root=/dev/sda1 b2c=1 b2cx.y=2 loglevel=6 ip=dhcp").unwrap();
    assert!(c.kernel_ip);
    assert!(c.unknown.is_empty());
    assert_eq!(c.containers.len(), 0);
}

#[test]
fn unknown_b2c_options_are_kept() {
    let c = parse("b2c.frobnicate=3 b2c.other").unwrap();
    assert_eq!(c.unknown, ["b2c.frobnicate=3", "b2c.other"]);
}

// ----- one test per option -----

#[test]
fn container_and_run_keep_their_order() {
    let c = parse(
        "b2c.container=docker://a b2c.run=\"docker://b x\" b2c.container=c:1 b2c.run=oci-archive:/x.tar",
    )
    .unwrap();
    let refs: Vec<String> = c.containers.iter().map(|s| s.image.to_string()).collect();
    assert_eq!(
        refs,
        ["docker://a", "docker://b", "c:1", "oci-archive:/x.tar"]
    );
    assert_eq!(c.containers[1].args, ["x"]);
    assert_eq!(c.containers[2].image.transport, ImageTransport::Plain);
    assert_eq!(
        c.containers[3].image.transport,
        ImageTransport::Other("oci-archive".into())
    );
    assert_bad("b2c.container", "b2c.container", "needs a value");
    assert_bad("b2c.run=\"-ti --rm\"", "b2c.run", "no image");
    assert_bad("b2c.container=", "b2c.container", "no image");
}

#[test]
fn post_containers() {
    let c = parse("b2c.post_container=\"-v r:/results docker://reaper\" b2c.run_post=docker://p2")
        .unwrap();
    let refs: Vec<&str> = c
        .post_containers
        .iter()
        .map(|s| s.image.reference.as_str())
        .collect();
    assert_eq!(refs, ["reaper", "p2"]);
    assert!(c.containers.is_empty());
    assert_bad(
        "b2c.post_container=\"-v\"",
        "b2c.post_container",
        "-v needs a value",
    );
}

#[test]
fn services() {
    let c =
        parse("b2c.service=docker://s1 b2c.run_service=\"--name=srv docker://s2 --flag\"").unwrap();
    assert_eq!(c.services.len(), 2);
    assert_eq!(c.services[1].name.as_deref(), Some("srv"));
    assert_eq!(c.services[1].args, ["--flag"]);
    assert_bad("b2c.run_service=--rm", "b2c.run_service", "no image");
}

#[test]
fn pipefail() {
    assert!(parse("b2c.pipefail").unwrap().pipefail);
    assert!(!parse("b2c.pipefail=0").unwrap().pipefail);
    assert!(parse("b2c.pipefail=true").unwrap().pipefail);
    assert_bad("b2c.pipefail=maybe", "b2c.pipefail", "maybe");
}

#[test]
fn cache_device() {
    assert_eq!(
        parse("b2c.cache_device=auto").unwrap().cache_device,
        CacheDevice::Auto
    );
    assert_eq!(
        parse("b2c.cache_device=reset").unwrap().cache_device,
        CacheDevice::Reset
    );
    assert_eq!(
        parse("b2c.cache_device=none").unwrap().cache_device,
        CacheDevice::None
    );
    assert_eq!(
        parse("b2c.cache_device=/dev/mmcblk0p2")
            .unwrap()
            .cache_device,
        CacheDevice::Path("/dev/mmcblk0p2".into())
    );
    assert_bad("b2c.cache_device=", "b2c.cache_device", "empty");
    assert_bad("b2c.cache_device", "b2c.cache_device", "needs a value");
}

#[test]
fn swap() {
    assert_eq!(parse("b2c.swap=4G").unwrap().swap.as_deref(), Some("4G"));
    assert_bad("b2c.swap=lots", "b2c.swap", "\"lots\"");
}

#[test]
fn ntp_peer() {
    assert_eq!(parse("b2c.ntp_peer=none").unwrap().ntp_peer, NtpPeer::None);
    assert_eq!(
        parse("b2c.ntp_peer=\"10.42.0.1\"").unwrap().ntp_peer,
        NtpPeer::Host("10.42.0.1".into())
    );
    assert_bad("b2c.ntp_peer=", "b2c.ntp_peer", "empty");
    assert_bad("b2c.ntp_peer=\"a b\"", "b2c.ntp_peer", "white space");
}

#[test]
fn minio_is_repeatable_and_checked() {
    let c =
        parse("b2c.minio=a,http://h:9000,k,s b2c.minio=\"b,https://x,k2,s,with,commas\"").unwrap();
    assert_eq!(c.minio.len(), 2);
    assert_eq!(c.minio[1].secret_key, "s,with,commas");
    assert_eq!(
        c.minio_alias("b").map(|m| m.url.as_str()),
        Some("https://x")
    );
    assert_bad("b2c.minio=a,http://h", "b2c.minio", "2 comma-separated");
    assert_bad("b2c.minio=a,ftp://h,k,s", "b2c.minio", "ftp://h");
    assert_bad("b2c.minio=,http://h,k,s", "b2c.minio", "alias");
}

#[test]
fn volume_options() {
    let c = parse(
        "b2c.volume=\"v,pull_from=a/b/prefix,push_to=c/d,pull_on=pipeline_start|container_start,\
         push_on=container_end|pipeline_end,overwrite,remove,preserve,exclude=*.log,exclude=tmp/*,\
         encrypt_key=a/b=KEY,fscrypt_key=FSKEY,fscrypt_reset_key,filesystem=nfs,weird\" b2c.volume=plain",
    )
    .unwrap();
    let v = &c.volumes[0];
    assert_eq!(
        v.pull_from
            .as_ref()
            .map(|p| (p.alias.as_str(), p.path.as_str())),
        Some(("a", "b/prefix"))
    );
    assert_eq!(
        v.push_to
            .as_ref()
            .map(|p| (p.alias.as_str(), p.path.as_str())),
        Some(("c", "d"))
    );
    assert_eq!(
        v.pull_on,
        BTreeSet::from([Trigger::PipelineStart, Trigger::ContainerStart])
    );
    assert_eq!(
        v.push_on,
        BTreeSet::from([Trigger::ContainerEnd, Trigger::PipelineEnd])
    );
    assert!(v.overwrite && v.remove && v.preserve && v.fscrypt_reset_key);
    assert_eq!(v.exclude, ["*.log", "tmp/*"]);
    assert_eq!(v.encrypt_key.as_deref(), Some("a/b=KEY"));
    assert_eq!(v.fscrypt_key.as_deref(), Some("FSKEY"));
    assert_eq!(v.filesystem.as_deref(), Some("nfs"));
    assert_eq!(v.unknown, ["weird"]);
    assert_eq!(v.expiration, Expiration::Never);
    assert!(!format!("{v:?}").contains("FSKEY"), "key in Debug");
    let p = &c.volumes[1];
    assert_eq!(p.name, "plain");
    assert!(p.pull_from.is_none() && p.pull_on.is_empty() && !p.overwrite);
}

#[test]
fn volume_bad_values() {
    assert_bad(
        "b2c.volume=v,pull_on=sometimes",
        "b2c.volume",
        "\"sometimes\"",
    );
    assert_bad(
        "b2c.volume=v,expiration=tomorrow",
        "b2c.volume",
        "never or pipeline_end",
    );
    assert_bad(
        "b2c.volume=v,mirror=nobucket",
        "b2c.volume",
        "<minio alias>/<bucket>",
    );
    assert_bad("b2c.volume=,mirror=a/b", "b2c.volume", "name");
    assert_bad(
        "b2c.volume=v,pull_on",
        "b2c.volume",
        "pull_on needs a value",
    );
    assert_bad("b2c.volume=v,overwrite=yes", "b2c.volume", "takes no value");
    assert_bad(
        "b2c.volume=v,exclude=",
        "b2c.volume",
        "exclude= needs a value",
    );
}

#[test]
fn filesystem() {
    let c = parse("b2c.filesystem=\"nfs,type=nfs,src=10.0.0.1:/srv,opts=ro|vers=4\"").unwrap();
    let f = &c.filesystems[0];
    assert_eq!((f.name.as_str(), f.src.as_str()), ("nfs", "10.0.0.1:/srv"));
    assert_eq!(f.fs_type.as_deref(), Some("nfs"));
    assert_eq!(f.opts, ["ro", "vers=4"]);
    assert_bad("b2c.filesystem=nfs,type=nfs", "b2c.filesystem", "src=");
}

#[test]
fn iface() {
    let c = parse(
        "b2c.iface=eth0,auto b2c.iface=\"eth1,address=10.0.0.2/24,gateway=10.0.0.1,nameserver=1.1.1.1,\
         nameserver=9.9.9.9,route=10.8.0.0/16:10.0.0.254,forward\"",
    )
    .unwrap();
    assert_eq!(c.ifaces.len(), 2);
    assert!(c.ifaces[0].dhcp);
    let i = &c.ifaces[1];
    assert_eq!(i.address.as_deref(), Some("10.0.0.2/24"));
    assert_eq!(i.gateway.as_deref(), Some("10.0.0.1"));
    assert_eq!(i.nameservers, ["1.1.1.1", "9.9.9.9"]);
    assert_eq!(
        i.routes,
        [Route {
            destination: "10.8.0.0/16".into(),
            via: "10.0.0.254".into()
        }]
    );
    assert!(i.forward && !i.dhcp);
    assert_bad(
        "b2c.iface=eth0,route=10.8.0.0/16",
        "b2c.iface",
        "<destination>:<gateway>",
    );
    assert_bad("b2c.iface=,auto", "b2c.iface", "interface name");
}

#[test]
fn poweroff_delay() {
    assert_eq!(
        parse("b2c.poweroff_delay=15").unwrap().poweroff_delay,
        Duration::from_secs(15)
    );
    assert_eq!(
        parse("b2c.poweroff_delay=0.5").unwrap().poweroff_delay,
        Duration::from_millis(500)
    );
    assert_bad("b2c.poweroff_delay=-1", "b2c.poweroff_delay", "seconds");
    assert_bad("b2c.poweroff_delay=5s", "b2c.poweroff_delay", "seconds");
    assert_bad("b2c.poweroff_delay=1.2.3", "b2c.poweroff_delay", "seconds");
    assert_bad(
        "b2c.poweroff_delay=99999999999999999999999999",
        "b2c.poweroff_delay",
        "seconds",
    );
}

#[test]
fn shutdown_and_reboot_cmd() {
    let c = parse("b2c.shutdown_cmd=\"halt -f\" b2c.reboot_cmd=\"echo b > /proc/sysrq-trigger\"")
        .unwrap();
    assert_eq!(c.shutdown_cmd, "halt -f");
    assert_eq!(c.reboot_cmd, "echo b > /proc/sysrq-trigger");
    assert_bad("b2c.shutdown_cmd=", "b2c.shutdown_cmd", "empty");
    assert_bad("b2c.reboot_cmd", "b2c.reboot_cmd", "needs a value");
}

#[test]
fn extra_args_url() {
    let c = parse("b2c.extra_args_url=http://10.42.0.1:9000/job/extra").unwrap();
    assert_eq!(
        c.extra_args_url.as_deref(),
        Some("http://10.42.0.1:9000/job/extra")
    );
    assert_bad("b2c.extra_args_url=not-a-url", "b2c.extra_args_url", "URL");
}

#[test]
fn hostname() {
    let c = parse("b2c.hostname=dut-1.farm").unwrap();
    assert_eq!(c.hostname_or_default(), "dut-1.farm");
    assert_bad("b2c.hostname=\"bad name\"", "b2c.hostname", "host name");
}

#[test]
fn keymap() {
    assert_eq!(
        parse("b2c.keymap=fr").unwrap().keymap.as_deref(),
        Some("fr")
    );
    assert_bad("b2c.keymap=../x", "b2c.keymap", "'/'");
}

#[test]
fn insmods() {
    let c = parse("b2c.insmods=i915,,amdgpu").unwrap();
    assert_eq!(c.insmods, ["i915", "amdgpu"]);
    assert_bad("b2c.insmods=\"a,b c\"", "b2c.insmods", "white space");
}

#[test]
fn later_single_options_override() {
    let c = parse("b2c.hostname=a b2c.ntp_peer=auto b2c.hostname=b b2c.ntp_peer=none").unwrap();
    assert_eq!(c.hostname.as_deref(), Some("b"));
    assert_eq!(c.ntp_peer, NtpPeer::None);
}

// ----- container specs -----

#[test]
fn container_options_both_forms() {
    let s = parse_container(
        "b2c.container",
        "-it --rm --privileged -e A=1 --env=B -e C= -w /work --workdir=/w2 --entrypoint= \
         --entrypoint '[\"/bin/sh\"]' -u 1000:1000 --network=host --net none --pull=always \
         --name job -h box --ipc=host --pid host --device /dev/dri --device=/dev/kvm \
         --cap-add=SYS_ADMIN --cap-drop ALL --security-opt label=disable --dns=none \
         --mount type=bind,src=/a,dst=/b -v /dev:/dev:ro,z -v/data -vcache:/cache \
         --tls-verify docker://img:1 arg1 --arg2",
    )
    .unwrap();
    assert!(s.tty && s.interactive && s.rm && s.privileged);
    assert_eq!(
        s.env,
        [
            EnvVar::Set {
                key: "A".into(),
                value: "1".into()
            },
            EnvVar::Inherit("B".into()),
            EnvVar::Set {
                key: "C".into(),
                value: String::new()
            }
        ]
    );
    assert_eq!(s.workdir.as_deref(), Some("/w2"));
    assert_eq!(s.entrypoint.as_deref(), Some("[\"/bin/sh\"]"));
    assert_eq!(s.user.as_deref(), Some("1000:1000"));
    assert_eq!(s.network.as_deref(), Some("none"));
    assert_eq!(s.pull.as_deref(), Some("always"));
    assert_eq!(s.name.as_deref(), Some("job"));
    assert_eq!(s.hostname.as_deref(), Some("box"));
    assert_eq!(
        (s.ipc.as_deref(), s.pid.as_deref()),
        (Some("host"), Some("host"))
    );
    assert_eq!(s.devices, ["/dev/dri", "/dev/kvm"]);
    assert_eq!(s.cap_add, ["SYS_ADMIN"]);
    assert_eq!(s.cap_drop, ["ALL"]);
    assert_eq!(s.security_opt, ["label=disable"]);
    assert_eq!(s.dns, ["none"]);
    assert_eq!(s.mounts, ["type=bind,src=/a,dst=/b"]);
    assert_eq!(s.volumes.len(), 3);
    assert_eq!(s.volumes[0].source, MountSource::HostPath("/dev".into()));
    assert!(s.volumes[0].read_only);
    assert_eq!(s.volumes[0].options, ["ro", "z"]);
    assert_eq!(s.volumes[1].source, MountSource::Anonymous);
    assert_eq!(s.volumes[1].target, "/data");
    assert_eq!(s.volumes[2].source, MountSource::Named("cache".into()));
    assert_eq!(s.tls_verify, Some(true));
    assert_eq!(s.image.reference, "img:1");
    assert_eq!(s.args, ["arg1", "--arg2"]);
    assert!(s.unsupported.is_empty(), "{:?}", s.unsupported);
}

#[test]
fn unsupported_podman_options_are_kept_not_fatal() {
    let s = parse_container(
        "b2c.container",
        "--memory 4G --shm-size=1g --init --read-only=true -d -P -X --add-host a:1.2.3.4 alpine",
    )
    .unwrap();
    assert_eq!(
        s.unsupported,
        [
            "--memory=4G",
            "--shm-size=1g",
            "--init",
            "--read-only=true",
            "--detach",
            "--publish-all",
            "-X",
            "--add-host=a:1.2.3.4"
        ]
    );
    assert_eq!(s.image.reference, "alpine");
}

#[test]
fn double_dash_before_image() {
    let s = parse_container("b2c.container", "-t -- -weird-image arg").unwrap();
    assert_eq!(s.image.reference, "-weird-image");
    assert_eq!(s.args, ["arg"]);
}

#[test]
fn container_bad_values_name_the_option_and_text() {
    let cases = [
        ("-v", "-v needs a value"),
        ("--volume", "--volume needs a value"),
        ("-v a:b docker://x", "absolute path"),
        ("-v :/x docker://x", "empty source"),
        ("-v a:/b:ro:x docker://x", "too many"),
        ("-e =v docker://x", "KEY=VALUE"),
        ("--tls-verify=perhaps docker://x", "--tls-verify=perhaps"),
        ("--pull=sometimes docker://x", "--pull=sometimes"),
        ("-w relative docker://x", "absolute path"),
        ("--name= docker://x", "--name needs a non-empty value"),
        ("-ti", "no image"),
        ("docker://", "image \"docker://\""),
        ("--=x docker://x", "without a name"),
    ];
    for (spec, needle) in cases {
        let err = parse_container("b2c.run", spec).expect_err(spec);
        let msg = err.to_string();
        assert!(msg.starts_with("b2c.run: invalid value"), "{msg}");
        assert!(msg.contains(needle), "{spec}: {msg:?} lacks {needle:?}");
    }
}

// ----- shell quoting -----

#[test]
fn shell_split_quotes_and_escapes() {
    let words = shell_split(
        r#"a 'b c' "d \"e\" \$f \g" h\ i '' "" j\'k 'l"m' x\
y"#,
    )
    .unwrap();
    assert_eq!(
        words,
        [
            "a",
            "b c",
            r#"d "e" $f \g"#,
            "h i",
            "",
            "",
            "j'k",
            "l\"m",
            "xy"
        ]
    );
    assert!(shell_split("'open").unwrap_err().contains("single quote"));
    assert!(shell_split("\"open").unwrap_err().contains("double quote"));
    assert!(shell_split("end\\").unwrap_err().contains("backslash"));
}

#[test]
fn quotes_inside_kernel_values() {
    // Double quotes group on the kernel command line; single quotes go to the shell split.
    // The kernel has no escape for `"`: it pairs the first two double quotes, so the value
    // is cut after `'echo \x`, leaving a single quote open for the shell split.
    assert_bad(
        r#"b2c.container="docker://a sh -c 'echo \"x y\" | tr x z'""#,
        "b2c.container",
        "unterminated single quote",
    );
    let c = parse(r#"b2c.container="docker://a sh -c 'printf %s\\n a\ b'""#).unwrap();
    assert_eq!(c.containers[0].args, ["sh", "-c", r"printf %s\\n a\ b"]);
    let c = parse(r#"b2c.container="-e MSG=a\ b docker://a""#).unwrap();
    assert_eq!(
        c.containers[0].env,
        [EnvVar::Set {
            key: "MSG".into(),
            value: "a b".into()
        }]
    );
    assert_bad(
        r#"b2c.container="docker://a sh -c 'oops""#,
        "b2c.container",
        "single quote",
    );
}

// ----- extra arguments -----

#[test]
fn merge_extra_appends_and_overrides() {
    let mut c = parse(
        "b2c.extra_args_url=http://h/extra b2c.container=docker://first b2c.hostname=a b2c.minio=a,http://h,k,s",
    )
    .unwrap();
    c.merge_extra(
        "b2c.container=\"docker://second run\"\n\
         b2c.hostname=b\r\n\
         b2c.minio=\"b,http://h2,k2,s2\"\n\
         b2c.volume=v,mirror=b/bucket b2c.pipefail\n",
    )
    .unwrap();
    let refs: Vec<&str> = c
        .containers
        .iter()
        .map(|s| s.image.reference.as_str())
        .collect();
    assert_eq!(refs, ["first", "second"]);
    assert_eq!(c.hostname.as_deref(), Some("b"));
    assert_eq!(c.minio.len(), 2);
    assert_eq!(c.volumes.len(), 1);
    assert!(c.pipefail);
    assert_eq!(c.extra_args_url.as_deref(), Some("http://h/extra"));
}

#[test]
fn merge_extra_error_leaves_config_unchanged() {
    let mut c = parse("b2c.container=docker://first").unwrap();
    let before = c.clone();
    let err = c
        .merge_extra("b2c.container=docker://second b2c.volume=v,pull_on=never")
        .unwrap_err();
    assert_eq!(option_of(&err), "b2c.volume");
    assert_eq!(c, before);
    assert!(matches!(
        c.merge_extra("b2c.run=\"unterminated"),
        Err(CmdlineError::UnterminatedQuote { .. })
    ));
    assert_eq!(c, before);
}
