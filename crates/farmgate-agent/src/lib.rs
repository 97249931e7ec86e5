//! farm-agent: what runs on a DUT in farmgate's place of boot2container.
//!
//! - [`cmdline`]: the `b2c.*` options of the kernel command line, parsed with errors that
//!   name the option;
//! - [`oci`]: OCI/Docker images pulled (manifest lists, layers, whiteouts) and unpacked
//!   into a root file system, through the gateway's registry cache;
//! - [`hwtags`]: the machine's hardware as registration tags;
//! - [`register`]: the console found by SALAD's ping/pong, the machine announced on it
//!   and registered with the gateway;
//! - [`run`]: containers run with crun, in boot2container's pipeline;
//! - [`volume`]: volumes mirrored with S3 buckets.

pub mod agent;
pub mod boot;
pub mod cachedev;
pub mod cmdline;
pub mod hwtags;
pub mod net;
pub mod ntp;
pub mod oci;
pub mod register;
pub mod run;
pub mod volume;
