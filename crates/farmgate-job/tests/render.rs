//! Rendering templates with the machine's variables, and masking secrets.

use std::collections::BTreeMap;

use farmgate_job::{JobBucket, JobError, RenderContext, mask_secrets, render, render_and_parse};
use farmgate_wire::DutRecord;

fn record() -> DutRecord {
    DutRecord {
        base_name: Some("gfx1030".into()),
        ip_address: Some("10.42.0.12".into()),
        tags: vec!["amdgpu:codename:NAVI21".into()],
        manual_tags: vec!["lab:rack2".into()],
        local_tty_device: Some("ttyUSB3".into()),
        ready_for_service: true,
        ..DutRecord::default()
    }
}

#[test]
fn variables_are_rendered() {
    let environ = BTreeMap::from([("CI_JOB_ID".to_string(), "4242".to_string())]);
    let ctx = RenderContext::new()
        .machine_id("52:54:00:aa:bb:cc")
        .machine(&record())
        .http_url("http://10.42.0.1:8000")
        .environ(&environ)
        .executor_env([
            (
                "EXECUTOR_JOB__FDO_PROXY".to_string(),
                "http://proxy".to_string(),
            ),
            ("UNRELATED".to_string(), "no".to_string()),
        ])
        .var("boots_default_kernel", "http://gw/kernel".to_string());
    let template = "id={{ machine_id }} ip={{ machine.ip_address }} name={{ machine.base_name }}\n\
                    tags={{ machine_tags | join(',') }} tty={{ local_tty_device }} ready={{ ready_for_service }}\n\
                    http={{ job.http.url }} ci={{ environ.CI_JOB_ID }} proxy={{ fdo_proxy }}\n\
                    kernel={{ boots_default_kernel }} unrelated={{ unrelated }}.\n";
    assert_eq!(
        render(template, &ctx).expect("renders"),
        "id=52:54:00:aa:bb:cc ip=10.42.0.12 name=gfx1030\n\
         tags=amdgpu:codename:NAVI21,lab:rack2 tty=ttyUSB3 ready=True\n\
         http=http://10.42.0.1:8000 ci=4242 proxy=http://proxy\n\
         kernel=http://gw/kernel unrelated=.\n"
    );
}

#[test]
fn undefined_renders_empty_even_when_chained() {
    let out = render(
        "a={{ nope }} b={{ job.bucket.url }} c={{ x.y.z }}",
        &RenderContext::new(),
    )
    .expect("renders");
    assert_eq!(out, "a= b= c=");
}

#[test]
fn jinja2_shebang_is_dropped() {
    let ctx = RenderContext::new().machine_id("m1");
    assert_eq!(
        render("#!jinja2\nid: {{ machine_id }}\n", &ctx).expect("renders"),
        "id: m1\n"
    );
    assert_eq!(render("#!jinja2", &ctx).expect("renders"), "");
}

#[test]
fn render_errors_name_the_template_line() {
    let e = render("#!jinja2\nok\n{% if %}\n", &RenderContext::new()).expect_err("bad syntax");
    assert!(matches!(e, JobError::Render { .. }), "{e:?}");
    assert_eq!(e.line(), Some(3), "{e}");
    let e = render(
        "a\n{% for x in range(100000) %}{% for y in range(100000) %}{% endfor %}{% endfor %}",
        &RenderContext::new(),
    )
    .expect_err("runs out of fuel");
    assert!(e.to_string().contains("fuel"), "{e}");
}

#[test]
fn render_and_parse_a_templated_job() {
    let template = r#"#!jinja2
{% set tty = local_tty_device or "ttyS0" %}
console_patterns:
  session_end: {regex: "^{{ environ.END | default('bye') }}$"}
deployment:
  start:
    kernel:
      url: {{ job.http.url }}/kernel
      cmdline:
        - console={{ tty }},115200
        {% for tag in machine_tags %}
        - tag={{ tag }}
        {% endfor %}
"#;
    let ctx = RenderContext::new()
        .machine(&record())
        .http_url("http://gw")
        .environ(&BTreeMap::new());
    let (text, job) = render_and_parse(template, &ctx).expect("valid");
    assert!(text.contains("url: http://gw/kernel"), "{text}");
    assert_eq!(job.console_patterns.session_end.as_str(), "^bye$");
    assert_eq!(
        job.deployment.start.cmdline,
        "console=ttyUSB3,115200 tag=amdgpu:codename:NAVI21 tag=lab:rack2"
    );
    // A rendered job that is invalid names the line of the rendered text.
    let e = render_and_parse(
        "#!jinja2\nconsole_patterns: {}\ndeployment: {start: {}}\n{{ 'bogus' }}: 1\n",
        &ctx,
    )
    .expect_err("unknown key");
    assert_eq!(e.line(), Some(3), "{e}");
}

#[test]
fn secrets_are_masked() {
    let bucket = JobBucket {
        url: "http://10.42.0.1:9000".into(),
        name: "job-dut1-42-x7".into(),
        access_key: "dut1-42".into(),
        secret_key: "s3cr3t-key".into(),
    };
    let ctx = RenderContext::new()
        .job_bucket(&bucket)
        .secrets(["hunter2", "hunter2-long", ""]);
    let text = render(
        "b2c.minio=\"job,{{ minio_url }},{{ job_bucket_access_key }},{{ job_bucket_secret_key }}\" {{ job.bucket.name }} {{ job.bucket.secret_key }} pw=hunter2-long pw2=hunter2",
        &ctx,
    )
    .expect("renders");
    assert!(text.contains("s3cr3t-key"));
    assert_eq!(
        mask_secrets(&text, &ctx),
        "b2c.minio=\"job,http://10.42.0.1:9000,dut1-42,********\" job-dut1-42-x7 ******** pw=******** pw2=********"
    );
}

/// `executor_env_from_process` reads the real environment: run this test binary again
/// with an `EXECUTOR_JOB__*` variable set and check the child's rendering.
#[test]
fn executor_env_from_the_process() {
    if std::env::var_os("FARMGATE_JOB_TEST_CHILD").is_some() {
        let out = render(
            "{{ farm_name }}|{{ executor_job__farm_name }}",
            &RenderContext::new().executor_env_from_process(),
        )
        .expect("renders");
        assert_eq!(out, "valve-farm|");
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let status = std::process::Command::new(exe)
        .args(["executor_env_from_the_process", "--exact", "--nocapture"])
        .env("FARMGATE_JOB_TEST_CHILD", "1")
        .env("EXECUTOR_JOB__FARM_NAME", "valve-farm")
        .status()
        .expect("runs the child test");
    assert!(status.success(), "the child test failed: {status}");
}
