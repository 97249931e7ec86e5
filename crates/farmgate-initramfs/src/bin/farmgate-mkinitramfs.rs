//! `farmgate-mkinitramfs`: builds `<DIR>/vmlinuz` and `<DIR>/initramfs.cpio.gz` for
//! farmgate's QEMU DUTs from the host kernel and busybox-static. See the
//! `farmgate_initramfs` crate documentation for what the `/init` understands.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use farmgate_initramfs::{BuildOptions, build};

/// Build the farmgate test initramfs from host packages.
#[derive(Debug, Parser)]
#[command(name = "farmgate-mkinitramfs", version)]
struct Args {
    /// Output directory (gets `vmlinuz` and `initramfs.cpio.gz`).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Kernel image [default: the newest /boot/vmlinuz-*].
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Kernel modules directory [default: /lib/modules/VERSION, VERSION from the kernel file name vmlinuz-VERSION].
    #[arg(long, value_name = "PATH")]
    modules_dir: Option<PathBuf>,
    /// Static busybox binary.
    #[arg(long, value_name = "PATH", default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Extra kernel module to include (with dependencies); repeatable.
    #[arg(long = "module", value_name = "NAME")]
    modules: Vec<String>,
    /// Extra program to include at its path, with the shared libraries it needs (e.g.
    /// /usr/bin/crun); repeatable.
    #[arg(long = "binary", value_name = "PATH")]
    binaries: Vec<PathBuf>,
    /// Program to boot as `/init` instead of the shell init (e.g. farm-agent), included
    /// at its path with its libraries.
    #[arg(long, value_name = "PATH")]
    init: Option<PathBuf>,
    /// Architecture of the image (x86_64 or aarch64; default: the host's); every ELF
    /// file must be for it.
    #[arg(long, value_name = "ARCH", default_value = std::env::consts::ARCH)]
    arch: String,
    /// Take the kernel, modules, busybox and --binary programs (paths inside DIR) and
    /// the libraries from this directory instead of the host (e.g. an arm64 sysroot made
    /// by scripts/arm64-sysroot.sh); --init stays a host path.
    #[arg(long, value_name = "DIR")]
    sysroot: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let started = std::time::Instant::now();
    let mut opts = BuildOptions::new(args.out);
    opts.kernel = args.kernel;
    opts.modules_dir = args.modules_dir;
    opts.busybox = args.busybox;
    opts.extra_modules = args.modules;
    opts.extra_binaries = args.binaries;
    opts.init = args.init;
    opts.arch = args.arch;
    opts.sysroot = args.sysroot;
    match build(&opts) {
        Ok(summary) => {
            println!("{summary}; {:.2} s", started.elapsed().as_secs_f64());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("farmgate-mkinitramfs: error: {e}");
            ExitCode::FAILURE
        }
    }
}
