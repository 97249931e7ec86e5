//! Rendering the Jinja2 template of a job with the variables of its machine.

use std::collections::BTreeMap;

use farmgate_wire::DutRecord;
use minijinja::{Environment, UndefinedBehavior, Value};
use serde::Serialize;

use crate::description::{JobDescription, parse};
use crate::error::JobError;

/// Instructions a template may execute before it is stopped (a job template is user
/// input; real ones need a tiny fraction of this).
const FUEL: u64 = 5_000_000;

/// What replaces a secret in text shown to users.
pub const MASK: &str = "********";

/// The job's share bucket, as the template sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobBucket {
    /// URL of the object store (`minio_url`, `job.bucket.url`).
    pub url: String,
    /// Name of the bucket (`job_bucket`, `job.bucket.name`).
    pub name: String,
    /// Access key of the job's user (`job_bucket_access_key`).
    pub access_key: String,
    /// Secret key of the job's user (`job_bucket_secret_key`); masked in shown text.
    pub secret_key: String,
}

/// The variables a job template is rendered with.
///
/// Built with chained calls; a later call replaces the variables an earlier one set.
#[derive(Debug, Clone, Default)]
pub struct RenderContext {
    vars: BTreeMap<String, Value>,
    http_url: Option<String>,
    bucket: Option<JobBucket>,
    secrets: Vec<String>,
}

impl RenderContext {
    /// An empty context: every variable is undefined (and renders as nothing).
    pub fn new() -> RenderContext {
        RenderContext::default()
    }

    /// `machine_id`: the id (MAC address) of the DUT.
    pub fn machine_id(self, id: &str) -> Self {
        self.var("machine_id", id)
    }

    /// `machine` and `dut` (the record's fields), `machine_tags` (its tags then its
    /// manual tags), `local_tty_device` and `ready_for_service`.
    pub fn machine(self, record: &DutRecord) -> Self {
        let tags: Vec<&String> = record.tags.iter().chain(&record.manual_tags).collect();
        let value = Value::from_serialize(record);
        self.var_value("machine", value.clone())
            .var_value("dut", value)
            .var("machine_tags", tags)
            .var(
                "local_tty_device",
                record.local_tty_device.clone().unwrap_or_default(),
            )
            .var("ready_for_service", record.ready_for_service)
    }

    /// `local_tty_device`.
    pub fn local_tty_device(self, device: &str) -> Self {
        self.var("local_tty_device", device)
    }

    /// `ready_for_service`.
    pub fn ready_for_service(self, ready: bool) -> Self {
        self.var("ready_for_service", ready)
    }

    /// The job's bucket: `minio_url`, `job_bucket`, `job_bucket_access_key`,
    /// `job_bucket_secret_key` and `job.bucket.{url,name,access_key,secret_key}`. The
    /// secret key becomes a secret (see [`RenderContext::secrets`]).
    pub fn job_bucket(mut self, bucket: &JobBucket) -> Self {
        self.secrets.push(bucket.secret_key.clone());
        self.bucket = Some(bucket.clone());
        self.var("minio_url", bucket.url.as_str())
            .var("job_bucket", bucket.name.as_str())
            .var("job_bucket_access_key", bucket.access_key.as_str())
            .var("job_bucket_secret_key", bucket.secret_key.as_str())
    }

    /// `job.http.url`: the executor's URL, as the DUT reaches it.
    pub fn http_url(mut self, url: &str) -> Self {
        self.http_url = Some(url.to_string());
        self
    }

    /// `environ`: the variables forwarded by the client.
    pub fn environ(self, environ: &BTreeMap<String, String>) -> Self {
        self.var("environ", environ)
    }

    /// Every `EXECUTOR_JOB__<NAME>` variable of this process's environment, as the
    /// top-level variable `<name>` (lower case).
    pub fn executor_env_from_process(self) -> Self {
        self.executor_env(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    /// Like [`RenderContext::executor_env_from_process`], from the given variables.
    pub fn executor_env(mut self, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        for (k, v) in vars {
            if let Some(name) = k.strip_prefix("EXECUTOR_JOB__")
                && !name.is_empty()
            {
                self = self.var(name.to_lowercase(), v);
            }
        }
        self
    }

    /// Values masked by [`mask_secrets`] (added to those already known).
    pub fn secrets<S: Into<String>>(mut self, secrets: impl IntoIterator<Item = S>) -> Self {
        self.secrets.extend(secrets.into_iter().map(Into::into));
        self
    }

    /// Any variable, e.g. `boots_default_kernel`.
    pub fn var(self, name: impl Into<String>, value: impl Serialize) -> Self {
        self.var_value(name, Value::from_serialize(value))
    }

    fn var_value(mut self, name: impl Into<String>, value: Value) -> Self {
        self.vars.insert(name.into(), value);
        self
    }

    /// The secrets of this context.
    pub fn secret_values(&self) -> &[String] {
        &self.secrets
    }

    fn to_value(&self) -> Value {
        let mut vars = self.vars.clone();
        if !vars.contains_key("job") {
            let mut job: BTreeMap<&str, Value> = BTreeMap::new();
            if let Some(url) = &self.http_url {
                job.insert(
                    "http",
                    Value::from_serialize(BTreeMap::from([("url", url)])),
                );
            }
            if let Some(b) = &self.bucket {
                job.insert(
                    "bucket",
                    Value::from_serialize(BTreeMap::from([
                        ("url", &b.url),
                        ("name", &b.name),
                        ("access_key", &b.access_key),
                        ("secret_key", &b.secret_key),
                    ])),
                );
            }
            vars.insert("job".into(), Value::from_serialize(job));
        }
        Value::from_serialize(vars)
    }
}

/// Renders a job template (Jinja2; an optional first line `#!jinja2` is dropped).
/// Undefined variables render as nothing, as in CI-tron.
pub fn render(template: &str, ctx: &RenderContext) -> Result<String, JobError> {
    let (source, offset) = match template.strip_prefix("#!jinja2") {
        Some(rest) => match rest.find('\n') {
            Some(nl) => (&rest[nl + 1..], 1),
            None => ("", 1),
        },
        None => (template, 0),
    };
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Chainable);
    env.set_keep_trailing_newline(true);
    env.set_fuel(Some(FUEL));
    env.render_str(source, ctx.to_value())
        .map_err(|e| JobError::Render {
            line: e.line().map(|l| l + offset),
            message: match e.detail() {
                Some(detail) => format!("{}: {detail}", e.kind()),
                None => e.kind().to_string(),
            },
        })
}

/// Renders a job template and parses the result; returns both.
pub fn render_and_parse(
    template: &str,
    ctx: &RenderContext,
) -> Result<(String, JobDescription), JobError> {
    let text = render(template, ctx)?;
    let job = parse(&text)?;
    Ok((text, job))
}

/// `text` with every secret of `ctx` replaced by [`MASK`].
pub fn mask_secrets(text: &str, ctx: &RenderContext) -> String {
    let mut secrets: Vec<&str> = ctx
        .secrets
        .iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    // Longest first, so a secret containing another is masked whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut out = text.to_string();
    for s in secrets {
        out = out.replace(s, MASK);
    }
    out
}
