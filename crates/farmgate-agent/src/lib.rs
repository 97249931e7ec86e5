//! farm-agent: what runs on a DUT in farmgate's place of boot2container.
//!
//! - [`cmdline`]: the `b2c.*` options of the kernel command line, parsed with errors that
//!   name the option;
//! - [`oci`]: OCI/Docker images pulled (manifest lists, layers, whiteouts) and unpacked
//!   into a root file system, through the gateway's registry cache;
//! - [`hwtags`]: the machine's hardware as registration tags.

pub mod cmdline;
pub mod hwtags;
pub mod oci;
