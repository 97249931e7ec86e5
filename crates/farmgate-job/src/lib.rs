//! CI-tron version 1 job descriptions.
//!
//! A job arrives as a Jinja2 template of a YAML document. [`render`] turns it into YAML
//! with the variables of the machine it runs on ([`RenderContext`]), [`parse`] checks
//! that YAML strictly (unknown keys, types and regular expressions are refused with the
//! field path and line number) and returns a [`JobDescription`]. While the job runs, a
//! [`LineMatcher`] looks for the job's console patterns in every console line, and
//! [`final_status`] turns what was seen into the job's [`farmgate_wire::JobStatus`].

mod deployment;
mod description;
mod error;
mod matcher;
mod render;

pub use deployment::{Artifact, Deployment, DeploymentStep, Storage, StorageFile};
pub use description::{
    ConsolePatterns, DEFAULT_OVERALL, DEFAULT_SESSION_END, JobDescription, Timeout, Timeouts,
    WatchdogPatterns, parse,
};
pub use error::JobError;
pub use matcher::{LineMatcher, PatternHit, final_status};
pub use render::{JobBucket, MASK, RenderContext, mask_secrets, render, render_and_parse};
