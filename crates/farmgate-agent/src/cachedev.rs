//! boot2container's cache partition (`b2c.cache_device`) and swap file (`b2c.swap`).
//!
//! The cache holds images, containers and volumes; it is mounted at `/storage`. Without a
//! cache everything stays in RAM, under `/storage` on the initramfs' file system.
//!
//! - `none`: no cache.
//! - `auto`: the ext file system labelled [`CACHE_LABEL`] (`B2C_CACHE`), looked for on every
//!   partition and on every disk without partitions. When there is none, the first *blank*
//!   disk (in name order) gets one GPT partition (`sfdisk`), formatted ext4 with that label
//!   (`mkfs.ext4`). A disk is blank when the kernel knows no partition on it and none of the
//!   signatures [`identify`] knows (partition tables, file systems, swap, RAID, LVM, LUKS) is
//!   on it, nor a backup GPT header at its end; removable, read-only, held (device-mapper,
//!   RAID) and small (< 32 MiB) disks are never partitioned. When there is no blank disk,
//!   the agent runs without a cache ([`CacheOutcome::NoBlankDisk`] says why, disk by disk).
//! - `reset`: like `auto`, but an existing `B2C_CACHE` file system is formatted again (a
//!   way to wipe a corrupt cache).
//! - `/dev/X`: that device; formatted ext4 (label `B2C_CACHE`) when it has no ext file
//!   system. A device with a partition table is refused (name one of its partitions).
//! - the name of a `b2c.filesystem`: its `src` is mounted with its `type` and `opts`; it is
//!   never formatted.
//!
//! `b2c.swap=SIZE` makes a swap file `/storage/swapfile` of that size (`mkswap`, `swapon`),
//! only when a cache is mounted.
//!
//! Block devices are found in `/sys/class/block`; signatures are read from the devices by
//! this module (no `blkid`). Every root and program path is in [`CacheEnv`], so that tests
//! run on loop devices of a host.

use std::cmp::Ordering;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::mount::MsFlags;

use crate::cmdline::{CacheDevice, Filesystem};

/// The label of boot2container's cache file system.
pub const CACHE_LABEL: &str = "B2C_CACHE";

/// The name of the swap file in the cache.
pub const SWAP_FILE_NAME: &str = "swapfile";

/// How many bytes at the start of a device [`identify`] looks at (the farthest signature,
/// btrfs', ends at 64 KiB + 72).
pub const HEAD_LEN: usize = 128 * 1024;

/// How many bytes at the end of a disk [`has_backup_gpt`] looks at.
pub const TAIL_LEN: usize = 4096;

/// Disks smaller than this are never partitioned by `auto`.
pub const MIN_BLANK_DISK_BYTES: u64 = 32 << 20;

/// The smallest swap file `b2c.swap` accepts (mkswap needs 10 pages).
pub const MIN_SWAP_BYTES: u64 = 64 * 1024;

/// Where [`CacheTools::find`] looks for programs, in order.
pub const TOOL_DIRS: [&str; 4] = ["/sbin", "/usr/sbin", "/bin", "/usr/bin"];

// ---------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------

/// The programs the cache needs (all from e2fsprogs, fdisk and util-linux on Debian).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheTools {
    /// `mkfs.ext4` (e2fsprogs): `mkfs.ext4 -F -L B2C_CACHE <device>`.
    pub mkfs_ext4: PathBuf,
    /// `sfdisk` (fdisk): partitions a blank disk with the script `label: gpt\n,,L\n`.
    pub sfdisk: PathBuf,
    /// `mkswap` (util-linux or busybox).
    pub mkswap: PathBuf,
    /// `swapon` (util-linux or busybox).
    pub swapon: PathBuf,
    /// `partx` (util-linux): tells the kernel about the new partition when re-reading the
    /// partition table did not (kernels built without the GPT parser). Optional: when it
    /// is missing, the agent only waits for the kernel.
    pub partx: PathBuf,
}

impl CacheTools {
    /// Each program from the first of [`TOOL_DIRS`] holding it; a program found nowhere
    /// keeps its bare name (looked up in `PATH` when run, and named in the error).
    pub fn find() -> CacheTools {
        CacheTools {
            mkfs_ext4: locate("mkfs.ext4"),
            sfdisk: locate("sfdisk"),
            mkswap: locate("mkswap"),
            swapon: locate("swapon"),
            partx: locate("partx"),
        }
    }
}

impl Default for CacheTools {
    fn default() -> Self {
        CacheTools::find()
    }
}

fn locate(name: &str) -> PathBuf {
    TOOL_DIRS
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Where [`prepare`] looks and acts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEnv {
    /// The sysfs root (`/sys`); block devices are in `<sys_root>/class/block`.
    pub sys_root: PathBuf,
    /// The device directory (`/dev`); `/dev/X` on the command line means `<dev_root>/X`.
    pub dev_root: PathBuf,
    /// Where the cache is mounted (`/storage`); created when missing.
    pub mount_point: PathBuf,
    /// The programs run.
    pub tools: CacheTools,
    /// For tests and for admins who want to pin the cache disk: when set, `auto` and
    /// `reset` only consider these whole disks (`sdb` or `/dev/sdb`), in this order, and
    /// consider them whatever their kind (loop devices included). When unset, every disk
    /// except virtual ones (loop, ram, zram, sr, fd, nbd, dm-, md, mtdblock, ubiblock,
    /// eMMC boot and RPMB areas), in name order.
    pub only_devices: Option<Vec<String>>,
    /// How long to wait for a new partition's device after partitioning.
    pub settle_timeout: Duration,
}

impl Default for CacheEnv {
    fn default() -> Self {
        CacheEnv {
            sys_root: PathBuf::from("/sys"),
            dev_root: PathBuf::from("/dev"),
            mount_point: PathBuf::from("/storage"),
            tools: CacheTools::find(),
            only_devices: None,
            settle_timeout: Duration::from_secs(10),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Outcome and errors
// ---------------------------------------------------------------------------------------

/// What [`prepare`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// `b2c.cache_device=none`: no cache, everything in RAM.
    None {
        /// What became of `b2c.swap`.
        swap: SwapOutcome,
    },
    /// A cache is mounted.
    Mounted {
        /// The device (or `b2c.filesystem` source) mounted.
        device: PathBuf,
        /// Its ext label, when it has one.
        label: Option<String>,
        /// Where it is mounted.
        mount_point: PathBuf,
        /// The file system type mounted.
        fs_type: String,
        /// Whether `mkfs.ext4` made the file system now.
        formatted: bool,
        /// Whether the partition was created now, on a blank disk.
        created_partition: bool,
        /// What became of `b2c.swap`.
        swap: SwapOutcome,
    },
    /// `auto`/`reset` found neither a `B2C_CACHE` file system nor a blank disk: the agent
    /// runs without a cache.
    NoBlankDisk {
        /// Why, disk by disk.
        reason: String,
        /// What became of `b2c.swap`.
        swap: SwapOutcome,
    },
}

impl CacheOutcome {
    /// What became of `b2c.swap`.
    pub fn swap(&self) -> &SwapOutcome {
        match self {
            CacheOutcome::None { swap }
            | CacheOutcome::Mounted { swap, .. }
            | CacheOutcome::NoBlankDisk { swap, .. } => swap,
        }
    }

    /// The lines the agent prints, e.g.
    /// `farm-agent: cache: /dev/vda1 (B2C_CACHE) mounted at /storage`.
    pub fn describe(&self) -> String {
        let mut out = match self {
            CacheOutcome::None { .. } => {
                "farm-agent: cache: none (b2c.cache_device=none): images, \
                 containers and volumes stay in RAM"
                    .to_string()
            }
            CacheOutcome::Mounted {
                device,
                label,
                mount_point,
                fs_type,
                formatted,
                created_partition,
                ..
            } => {
                let mut s = format!("farm-agent: cache: {}", device.display());
                if let Some(l) = label.as_deref().filter(|l| !l.is_empty()) {
                    s.push_str(&format!(" ({l})"));
                }
                s.push_str(&format!(" mounted at {}", mount_point.display()));
                match (created_partition, formatted) {
                    (true, _) => s.push_str(&format!(
                        " (new partition on a blank disk, formatted {fs_type})"
                    )),
                    (false, true) => s.push_str(&format!(" (formatted {fs_type} now)")),
                    (false, false) => {}
                }
                s
            }
            CacheOutcome::NoBlankDisk { reason, .. } => format!(
                "farm-agent: cache: none: no {CACHE_LABEL} file system and no blank disk to make \
                 one ({reason}); images, containers and volumes stay in RAM"
            ),
        };
        if let Some(line) = self.swap().describe() {
            out.push('\n');
            out.push_str(&line);
        }
        out
    }
}

/// What became of `b2c.swap`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwapOutcome {
    /// No `b2c.swap`.
    NotRequested,
    /// The swap file is in use.
    Active {
        /// The swap file.
        path: PathBuf,
        /// Its size.
        bytes: u64,
        /// Whether an existing swap file of that size was used again (not rewritten).
        reused: bool,
    },
    /// The swap file could not be made or used; the cache is mounted all the same.
    Failed {
        /// The swap file.
        path: PathBuf,
        /// The size asked.
        bytes: u64,
        /// What failed (the step, the program and its output).
        error: String,
    },
    /// No swap file: there is no cache to hold it.
    Skipped {
        /// The `b2c.swap` value.
        size: String,
        /// Why.
        reason: String,
    },
}

impl SwapOutcome {
    /// The line the agent prints, if any.
    pub fn describe(&self) -> Option<String> {
        match self {
            SwapOutcome::NotRequested => None,
            SwapOutcome::Active {
                path,
                bytes,
                reused,
            } => Some(format!(
                "farm-agent: swap: {} ({} bytes{}) in use",
                path.display(),
                bytes,
                if *reused { ", existing file" } else { "" }
            )),
            SwapOutcome::Failed { path, error, .. } => Some(format!(
                "farm-agent: swap: {} not in use: {error}",
                path.display()
            )),
            SwapOutcome::Skipped { size, reason } => Some(format!(
                "farm-agent: swap: b2c.swap={size} ignored: {reason}"
            )),
        }
    }
}

/// What a failed mount's error number usually means on a DUT.
fn mount_hint(errno: nix::errno::Errno) -> &'static str {
    match errno {
        nix::errno::Errno::ENOENT | nix::errno::Errno::ENODEV => {
            " (the kernel may lack the file system's driver or a module it needs, e.g. crc32c for ext4: see the kernel's messages)"
        }
        _ => "",
    }
}

/// Why the cache could not be prepared; every error names the device and the step.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// `b2c.cache_device` names nothing usable.
    #[error("cache: b2c.cache_device={value}: {reason}")]
    BadCacheDevice {
        /// The value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// `b2c.swap` is not a size.
    #[error("cache: b2c.swap={value}: {reason}")]
    BadSwapSize {
        /// The value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// The list of block devices could not be read.
    #[error("cache: cannot list block devices in {}: {source}", path.display())]
    Sysfs {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A file operation on a device or path failed.
    #[error("cache: {}: {step}: {source}", device.display())]
    Io {
        /// The device or path.
        device: PathBuf,
        /// What was being done.
        step: String,
        /// The error.
        source: io::Error,
    },
    /// A program failed.
    #[error("cache: {}: {step} failed: `{command}` {status}{}", device.display(), fmt_output(output))]
    Program {
        /// The device worked on.
        device: PathBuf,
        /// The step (`partitioning`, `formatting`, …).
        step: String,
        /// The command line run.
        command: String,
        /// How it ended (`exited with status 1`, `could not be started: …`).
        status: String,
        /// Its standard output and error (the end of them).
        output: String,
    },
    /// The agent refuses to use the device as asked.
    #[error("cache: {}: refused: {reason}", device.display())]
    Refused {
        /// The device.
        device: PathBuf,
        /// Why.
        reason: String,
    },
    /// The new partition's device did not appear.
    #[error(
        "cache: {}: partition {number} did not appear in {} within {waited:?} after partitioning \
         (re-reading the partition table and `partx -a` did not make the kernel see it)",
        disk.display(), sys_dir.display()
    )]
    PartitionMissing {
        /// The disk partitioned.
        disk: PathBuf,
        /// The partition number.
        number: u32,
        /// Where it was looked for.
        sys_dir: PathBuf,
        /// How long.
        waited: Duration,
    },
    /// mount(2) failed.
    #[error("cache: {}: mounting it ({fs_type}) on {} failed: {errno}{}", device.display(), mount_point.display(), mount_hint(*errno))]
    Mount {
        /// The device or source.
        device: PathBuf,
        /// The file system type.
        fs_type: String,
        /// The mount point.
        mount_point: PathBuf,
        /// The error.
        errno: nix::errno::Errno,
    },
}

fn fmt_output(output: &str) -> String {
    if output.is_empty() {
        String::new()
    } else {
        format!(": {output}")
    }
}

// ---------------------------------------------------------------------------------------
// Signatures
// ---------------------------------------------------------------------------------------

/// Something found at the start of a block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    /// An ext2/3/4 file system.
    Ext {
        /// 2, 3 or 4 (guessed from the feature flags).
        version: u8,
        /// The volume label (up to 16 bytes, NUL-padded on disk).
        label: String,
    },
    /// A Linux swap area.
    Swap {
        /// Its label.
        label: String,
    },
    /// A GPT header at LBA 1 (512- or 4096-byte sectors).
    Gpt,
    /// An MBR (DOS) partition table.
    Mbr,
    /// A boot sector (0x55AA) that is neither an MBR nor a FAT/NTFS/exFAT boot sector.
    BootSector,
    /// A FAT file system.
    Vfat,
    /// An exFAT file system.
    Exfat,
    /// An NTFS file system.
    Ntfs,
    /// An XFS file system.
    Xfs,
    /// A btrfs file system.
    Btrfs,
    /// An F2FS file system.
    F2fs,
    /// A squashfs image.
    Squashfs,
    /// A LUKS encrypted volume.
    Luks,
    /// An ISO 9660 file system.
    Iso9660,
    /// An LVM2 physical volume.
    Lvm2,
    /// A Linux MD RAID member (superblock 1.1 or 1.2).
    MdRaid,
}

impl Signature {
    /// A short human name: `ext4 file system labelled "X"`, `GPT partition table`, ….
    pub fn describe(&self) -> String {
        match self {
            Signature::Ext { version, label } if label.is_empty() => {
                format!("ext{version} file system")
            }
            Signature::Ext { version, label } => {
                format!("ext{version} file system labelled {label:?}")
            }
            Signature::Swap { .. } => "swap area".into(),
            Signature::Gpt => "GPT partition table".into(),
            Signature::Mbr => "MBR partition table".into(),
            Signature::BootSector => "boot sector".into(),
            Signature::Vfat => "FAT file system".into(),
            Signature::Exfat => "exFAT file system".into(),
            Signature::Ntfs => "NTFS file system".into(),
            Signature::Xfs => "XFS file system".into(),
            Signature::Btrfs => "btrfs file system".into(),
            Signature::F2fs => "F2FS file system".into(),
            Signature::Squashfs => "squashfs image".into(),
            Signature::Luks => "LUKS volume".into(),
            Signature::Iso9660 => "ISO 9660 file system".into(),
            Signature::Lvm2 => "LVM2 physical volume".into(),
            Signature::MdRaid => "MD RAID member".into(),
        }
    }

    /// Whether it is a partition table (or a boot sector that may hold one).
    pub fn is_partition_table(&self) -> bool {
        matches!(
            self,
            Signature::Gpt | Signature::Mbr | Signature::BootSector
        )
    }
}

fn bytes_at(buf: &[u8], off: usize, len: usize) -> Option<&[u8]> {
    buf.get(off..off.checked_add(len)?)
}

fn le16(buf: &[u8], off: usize) -> Option<u16> {
    let b = bytes_at(buf, off, 2)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

fn le32(buf: &[u8], off: usize) -> Option<u32> {
    let b = bytes_at(buf, off, 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn has(buf: &[u8], off: usize, magic: &[u8]) -> bool {
    bytes_at(buf, off, magic.len()) == Some(magic)
}

fn label_of(raw: &[u8]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

const EXT_SB: usize = 1024;
const EXT_MAGIC: u16 = 0xEF53;

/// The ext2/3/4 superblock in `head` (the first bytes of a device), if any: magic 0xEF53
/// at byte 1024+56, label at 1024+120 (16 bytes). Total: any buffer, any length.
pub fn parse_ext(head: &[u8]) -> Option<Signature> {
    let sb = bytes_at(head, EXT_SB, 136)?;
    if le16(sb, 56)? != EXT_MAGIC {
        return None;
    }
    // s_log_block_size: block size 1 KiB << n, at most 64 KiB.
    if le32(sb, 24)? > 6 {
        return None;
    }
    let compat = le32(sb, 92)?;
    let incompat = le32(sb, 96)?;
    let ro_compat = le32(sb, 100)?;
    // extents, 64bit, flex_bg, ea_inode, dirdata, csum_seed, largedir, inline_data,
    // encrypt, casefold / huge_file, gdt_csum, dir_nlink, extra_isize, metadata_csum.
    let ext4_incompat = 0x0040 | 0x0080 | 0x0200 | 0x0400 | 0x1000 | 0x2000 | 0x4000 | 0x8000;
    let ext4_incompat = ext4_incompat | 0x10000 | 0x20000;
    let ext4_ro = 0x0008 | 0x0010 | 0x0020 | 0x0040 | 0x0400;
    let version = if incompat & ext4_incompat != 0 || ro_compat & ext4_ro != 0 {
        4
    } else if compat & 0x0004 != 0 {
        3
    } else {
        2
    };
    Some(Signature::Ext {
        version,
        label: label_of(bytes_at(sb, 120, 16)?),
    })
}

/// Every signature found in `head`, the first bytes of a device ([`HEAD_LEN`] are enough;
/// shorter buffers just find less). Total: any buffer, any length, never panics.
pub fn identify(head: &[u8]) -> Vec<Signature> {
    let mut found = Vec::new();
    if let Some(ext) = parse_ext(head) {
        found.push(ext);
    }
    // Swap: "SWAPSPACE2" in the last 10 bytes of the first page (page sizes 4 to 64 KiB);
    // the label is at 1024 + 28.
    for page in [4096usize, 8192, 16384, 65536] {
        if has(head, page - 10, b"SWAPSPACE2") || has(head, page - 10, b"SWAP-SPACE") {
            let label = bytes_at(head, 1024 + 28, 16)
                .map(label_of)
                .unwrap_or_default();
            found.push(Signature::Swap { label });
            break;
        }
    }
    if has(head, 512, b"EFI PART") || has(head, 4096, b"EFI PART") {
        found.push(Signature::Gpt);
    }
    if has(head, 510, &[0x55, 0xAA]) {
        if has(head, 3, b"NTFS    ") {
            found.push(Signature::Ntfs);
        } else if has(head, 3, b"EXFAT   ") {
            found.push(Signature::Exfat);
        } else if has(head, 82, b"FAT32") || has(head, 54, b"FAT1") || has(head, 54, b"FAT  ") {
            found.push(Signature::Vfat);
        } else if !found.contains(&Signature::Gpt) {
            // Four 16-byte entries at 446; each status byte is 0x00 or 0x80 in a table.
            let valid = (0..4).all(|i| matches!(head.get(446 + 16 * i), Some(0x00 | 0x80)));
            found.push(if valid {
                Signature::Mbr
            } else {
                Signature::BootSector
            });
        }
    }
    if has(head, 0, b"XFSB") {
        found.push(Signature::Xfs);
    }
    if has(head, 65536 + 64, b"_BHRfS_M") {
        found.push(Signature::Btrfs);
    }
    if has(head, 1024, &[0x10, 0x20, 0xF5, 0xF2]) {
        found.push(Signature::F2fs);
    }
    if has(head, 0, b"hsqs") {
        found.push(Signature::Squashfs);
    }
    if has(head, 0, b"LUKS\xBA\xBE") || has(head, 0, b"SKUL\xBA\xBE") {
        found.push(Signature::Luks);
    }
    if has(head, 32769, b"CD001") {
        found.push(Signature::Iso9660);
    }
    if [0usize, 512, 1024, 1536]
        .iter()
        .any(|&o| has(head, o, b"LABELONE"))
    {
        found.push(Signature::Lvm2);
    }
    let md = [0xFC, 0x4E, 0x2B, 0xA9];
    if has(head, 0, &md) || has(head, 4096, &md) {
        found.push(Signature::MdRaid);
    }
    found
}

/// Whether `tail`, the last bytes of a disk (up to [`TAIL_LEN`]), ends with a backup GPT
/// header (in the last 512- or 4096-byte sector). Total on any buffer.
pub fn has_backup_gpt(tail: &[u8]) -> bool {
    let n = tail.len();
    (n >= 512 && has(tail, n - 512, b"EFI PART")) || (n >= 4096 && has(tail, n - 4096, b"EFI PART"))
}

/// Reads up to `len` bytes at `offset` of `path` (fewer at its end).
fn read_range(path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// The signatures at the start of the device `path`.
pub fn read_signatures(path: &Path) -> Result<Vec<Signature>, CacheError> {
    let head = read_range(path, 0, HEAD_LEN).map_err(|source| CacheError::Io {
        device: path.to_path_buf(),
        step: "reading its first bytes (signatures)".into(),
        source,
    })?;
    Ok(identify(&head))
}

// ---------------------------------------------------------------------------------------
// Block devices
// ---------------------------------------------------------------------------------------

/// A partition the kernel knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    /// Its name (`sda1`, `nvme0n1p2`, `loop3p1`).
    pub name: String,
    /// Its device (`<dev_root>/<name>`).
    pub path: PathBuf,
    /// Its number.
    pub number: u32,
    /// Its size.
    pub size_bytes: u64,
}

/// A whole disk in `/sys/class/block`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// Its name (`sda`).
    pub name: String,
    /// Its device (`<dev_root>/<name>`).
    pub path: PathBuf,
    /// Its size (`size` is in 512-byte sectors whatever the disk's sector size).
    pub size_bytes: u64,
    /// `removable` is 1.
    pub removable: bool,
    /// `ro` is 1.
    pub read_only: bool,
    /// Devices built on it (`holders`: device-mapper, RAID).
    pub holders: Vec<String>,
    /// Its partitions, by number.
    pub partitions: Vec<PartitionInfo>,
}

fn read_attr(dir: &Path, name: &str) -> Option<String> {
    fs::read_to_string(dir.join(name))
        .ok()
        .map(|s| s.trim().to_string())
}

fn is_virtual(name: &str) -> bool {
    const PREFIXES: [&str; 10] = [
        "loop", "ram", "zram", "sr", "fd", "nbd", "dm-", "md", "mtdblock", "ubiblock",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p))
        || (name.starts_with("mmcblk") && (name.contains("boot") || name.contains("rpmb")))
}

/// Compares names with their numbers as numbers: `nvme2n1` < `nvme10n1`, `sda` < `sdb`.
fn natural_cmp(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(cb.iter()) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

fn strip_dev<'a>(name: &'a str, env: &CacheEnv) -> &'a str {
    let root = env.dev_root.to_string_lossy();
    name.strip_prefix(&*root)
        .or_else(|| name.strip_prefix("/dev"))
        .unwrap_or(name)
        .trim_start_matches('/')
}

fn block_dir(env: &CacheEnv) -> PathBuf {
    env.sys_root.join("class/block")
}

fn partitions_of(env: &CacheEnv, disk: &str) -> Vec<PartitionInfo> {
    let dir = block_dir(env).join(disk);
    let mut parts: Vec<PartitionInfo> = fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(disk) {
                return None;
            }
            let pdir = dir.join(&name);
            let number = read_attr(&pdir, "partition")?.parse().ok()?;
            let sectors: u64 = read_attr(&pdir, "size")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            Some(PartitionInfo {
                path: env.dev_root.join(&name),
                name,
                number,
                size_bytes: sectors.saturating_mul(512),
            })
        })
        .collect();
    parts.sort_by_key(|p| p.number);
    parts
}

fn block_device(env: &CacheEnv, name: &str) -> Option<BlockDevice> {
    let dir = block_dir(env).join(name);
    if !dir.is_dir() || dir.join("partition").exists() {
        return None;
    }
    let flag = |attr: &str| read_attr(&dir, attr).as_deref() == Some("1");
    let sectors: u64 = read_attr(&dir, "size")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut holders: Vec<String> = fs::read_dir(dir.join("holders"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    holders.sort();
    Some(BlockDevice {
        name: name.to_string(),
        path: env.dev_root.join(name),
        size_bytes: sectors.saturating_mul(512),
        removable: flag("removable"),
        read_only: flag("ro"),
        holders,
        partitions: partitions_of(env, name),
    })
}

/// The whole disks `auto` considers: [`CacheEnv::only_devices`] in its order, or every
/// non-virtual, non-hidden disk of `<sys_root>/class/block` in name order. Names of
/// `only_devices` that are not whole disks are left out.
pub fn discover(env: &CacheEnv) -> Result<Vec<BlockDevice>, CacheError> {
    let dir = block_dir(env);
    if let Some(only) = &env.only_devices {
        return Ok(only
            .iter()
            .filter_map(|n| block_device(env, strip_dev(n, env)))
            .collect());
    }
    let entries = fs::read_dir(&dir).map_err(|source| CacheError::Sysfs {
        path: dir.clone(),
        source,
    })?;
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !is_virtual(n))
        .filter(|n| read_attr(&dir.join(n), "hidden").as_deref() != Some("1"))
        .collect();
    names.sort_by(|a, b| natural_cmp(a, b));
    Ok(names.iter().filter_map(|n| block_device(env, n)).collect())
}

/// Why `disk` is not blank, or `None` when `auto` may partition it.
fn not_blank(disk: &BlockDevice) -> Option<String> {
    if disk.removable {
        return Some(
            "removable (never partitioned automatically; name it with b2c.cache_device=/dev/…)"
                .into(),
        );
    }
    if disk.read_only {
        return Some("read-only".into());
    }
    if disk.size_bytes < MIN_BLANK_DISK_BYTES {
        return Some(format!(
            "too small ({} bytes < {MIN_BLANK_DISK_BYTES})",
            disk.size_bytes
        ));
    }
    if !disk.partitions.is_empty() {
        let names: Vec<&str> = disk.partitions.iter().map(|p| p.name.as_str()).collect();
        return Some(format!("has partitions ({})", names.join(", ")));
    }
    if !disk.holders.is_empty() {
        return Some(format!("in use by {}", disk.holders.join(", ")));
    }
    let head = match read_range(&disk.path, 0, HEAD_LEN) {
        Ok(h) => h,
        Err(e) => return Some(format!("cannot be read ({}: {e})", disk.path.display())),
    };
    let sigs = identify(&head);
    if !sigs.is_empty() {
        let what: Vec<String> = sigs.iter().map(Signature::describe).collect();
        return Some(format!("has a {}", what.join(" and a ")));
    }
    let tail_at = disk.size_bytes.saturating_sub(TAIL_LEN as u64);
    match read_range(&disk.path, tail_at, TAIL_LEN) {
        Ok(tail) if has_backup_gpt(&tail) => Some("has a backup GPT header at its end".into()),
        Ok(_) => None,
        Err(e) => Some(format!("cannot be read ({}: {e})", disk.path.display())),
    }
}

// ---------------------------------------------------------------------------------------
// Programs
// ---------------------------------------------------------------------------------------

fn run(
    program: &Path,
    args: &[&str],
    stdin: Option<&str>,
    device: &Path,
    step: &str,
) -> Result<(), CacheError> {
    let command = std::iter::once(program.display().to_string())
        .chain(args.iter().map(|a| a.to_string()))
        .collect::<Vec<_>>()
        .join(" ");
    let fail = |status: String, output: String| CacheError::Program {
        device: device.to_path_buf(),
        step: step.to_string(),
        command: command.clone(),
        status,
        output,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("could not be started: {e}"), String::new()))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A program that exits early closes the pipe; its status says why.
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("could not be waited for: {e}"), String::new()))?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    let text = text.trim();
    // The end of the output holds the error.
    let tail: String = {
        let chars: Vec<char> = text.chars().collect();
        let skip = chars.len().saturating_sub(2000);
        chars[skip..].iter().collect()
    };
    let status = match out.status.code() {
        Some(c) => format!("exited with status {c}"),
        None => format!("was killed ({})", out.status),
    };
    Err(fail(status, tail.replace('\n', " | ")))
}

fn mkfs(env: &CacheEnv, device: &Path) -> Result<(), CacheError> {
    let dev = device.to_string_lossy();
    run(
        &env.tools.mkfs_ext4,
        &["-F", "-L", CACHE_LABEL, &dev],
        None,
        device,
        "formatting it ext4",
    )
}

/// Partitions `disk` (one GPT partition over the whole disk) and returns the partition's
/// device once the kernel shows it.
fn partition(env: &CacheEnv, disk: &BlockDevice) -> Result<PathBuf, CacheError> {
    let dev = disk.path.to_string_lossy();
    run(
        &env.tools.sfdisk,
        &["--quiet", &dev],
        Some("label: gpt\n,,L\n"),
        &disk.path,
        "partitioning it (one GPT partition)",
    )?;
    let start = Instant::now();
    let mut tried_partx = false;
    loop {
        if let Some(p) = partitions_of(env, &disk.name)
            .into_iter()
            .find(|p| p.number == 1)
            && p.path.exists()
        {
            return Ok(p.path);
        }
        let waited = start.elapsed();
        if waited >= env.settle_timeout {
            return Err(CacheError::PartitionMissing {
                disk: disk.path.clone(),
                number: 1,
                sys_dir: block_dir(env).join(&disk.name),
                waited,
            });
        }
        if !tried_partx && waited >= Duration::from_secs(1) {
            tried_partx = true;
            // Kernels without the GPT parser: add the partition by hand. A failure shows
            // up as the partition still missing.
            let _ = run(
                &env.tools.partx,
                &["--add", &dev],
                None,
                &disk.path,
                "adding the partition",
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------
// Mounting
// ---------------------------------------------------------------------------------------

fn mount_opts(opts: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in opts {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" | "defaults" => {}
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "dirsync" => flags |= MsFlags::MS_DIRSYNC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            "lazytime" => flags |= MsFlags::MS_LAZYTIME,
            other => data.push(other.to_string()),
        }
    }
    (flags, data.join(","))
}

fn mount_at(
    env: &CacheEnv,
    device: &Path,
    fs_type: &str,
    opts: &[String],
) -> Result<(), CacheError> {
    fs::create_dir_all(&env.mount_point).map_err(|source| CacheError::Io {
        device: env.mount_point.clone(),
        step: "creating the mount point".into(),
        source,
    })?;
    let (flags, data) = mount_opts(opts);
    let data = (!data.is_empty()).then_some(data.as_str());
    nix::mount::mount(Some(device), &env.mount_point, Some(fs_type), flags, data).map_err(|errno| {
        CacheError::Mount {
            device: device.to_path_buf(),
            fs_type: fs_type.to_string(),
            mount_point: env.mount_point.clone(),
            errno,
        }
    })
}

// ---------------------------------------------------------------------------------------
// Swap
// ---------------------------------------------------------------------------------------

/// Parses a `b2c.swap` size (`fallocate -l` syntax): a number, optionally followed by
/// `K`, `M`, `G`, `T`, `P` (powers of 1024, also `KiB`…) or `KB`, `MB`… (powers of 1000).
pub fn parse_size(value: &str) -> Result<u64, String> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    if num.is_empty() {
        return Err("expected a size such as 4G, 512M or 1073741824".into());
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{num:?} is not a number of bytes"))?;
    let unit_up = unit.to_ascii_uppercase();
    // The first character, not the first byte: the unit may be any text.
    let first_len = unit_up.chars().next().map_or(0, char::len_utf8);
    let (letter, rest) = unit_up.split_at(first_len);
    let power = match letter {
        "" => 0,
        "K" => 1,
        "M" => 2,
        "G" => 3,
        "T" => 4,
        "P" => 5,
        _ => return Err(format!("unknown unit {unit:?} (K, M, G, T, P, KiB…, KB…)")),
    };
    let base: u64 = match rest {
        "" | "IB" => 1024,
        "B" if power > 0 => 1000,
        _ => return Err(format!("unknown unit {unit:?} (K, M, G, T, P, KiB…, KB…)")),
    };
    let bytes = base
        .checked_pow(power)
        .and_then(|m| n.checked_mul(m))
        .ok_or_else(|| "too large".to_string())?;
    if bytes < MIN_SWAP_BYTES {
        return Err(format!(
            "{bytes} bytes is too small for a swap file (at least {MIN_SWAP_BYTES})"
        ));
    }
    Ok(bytes)
}

fn make_swap_file(path: &Path, bytes: u64, env: &CacheEnv) -> Result<bool, CacheError> {
    let io_err = |step: &str| {
        let step = step.to_string();
        move |source| CacheError::Io {
            device: path.to_path_buf(),
            step,
            source,
        }
    };
    // A swap file of the right size made by an earlier boot is used again.
    if let Ok(meta) = fs::metadata(path)
        && meta.is_file()
        && meta.len() == bytes
        && read_signatures(path)?
            .iter()
            .any(|s| matches!(s, Signature::Swap { .. }))
    {
        return Ok(true);
    }
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("removing the old swap file")(e)),
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("creating the swap file"))?;
    let len = i64::try_from(bytes).map_err(|_| CacheError::BadSwapSize {
        value: bytes.to_string(),
        reason: "too large".into(),
    })?;
    // swapon refuses files with holes: allocate every block.
    if let Err(errno) = nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, len) {
        if errno != nix::errno::Errno::EOPNOTSUPP {
            return Err(io_err("allocating the swap file")(io::Error::from(errno)));
        }
        let zeros = vec![0u8; 1 << 20];
        let mut left = bytes;
        let mut w = io::BufWriter::new(&file);
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            w.write_all(&zeros[..n])
                .map_err(io_err("writing the swap file"))?;
            left -= n as u64;
        }
        w.flush().map_err(io_err("writing the swap file"))?;
    }
    file.sync_all().map_err(io_err("syncing the swap file"))?;
    drop(file);
    run(
        &env.tools.mkswap,
        &[&path.to_string_lossy()],
        None,
        path,
        "making the swap area",
    )?;
    Ok(false)
}

fn setup_swap(size: Option<(&str, u64)>, env: &CacheEnv) -> SwapOutcome {
    let Some((_, bytes)) = size else {
        return SwapOutcome::NotRequested;
    };
    let path = env.mount_point.join(SWAP_FILE_NAME);
    let reused = match make_swap_file(&path, bytes, env) {
        Ok(r) => r,
        Err(e) => {
            return SwapOutcome::Failed {
                path,
                bytes,
                error: e.to_string(),
            };
        }
    };
    match run(
        &env.tools.swapon,
        &[&path.to_string_lossy()],
        None,
        &path,
        "enabling the swap file",
    ) {
        Ok(()) => SwapOutcome::Active {
            path,
            bytes,
            reused,
        },
        Err(e) => SwapOutcome::Failed {
            path,
            bytes,
            error: e.to_string(),
        },
    }
}

fn skip_swap(size: Option<(&str, u64)>, reason: &str) -> SwapOutcome {
    match size {
        None => SwapOutcome::NotRequested,
        Some((v, _)) => SwapOutcome::Skipped {
            size: v.to_string(),
            reason: reason.to_string(),
        },
    }
}

// ---------------------------------------------------------------------------------------
// prepare
// ---------------------------------------------------------------------------------------

struct Mounted {
    device: PathBuf,
    label: Option<String>,
    fs_type: String,
    formatted: bool,
    created_partition: bool,
}

/// Finds, makes if needed and mounts the cache at [`CacheEnv::mount_point`], then makes
/// and enables the swap file `swap` asks for. See the module documentation for what each
/// `b2c.cache_device` value does. A swap file that cannot be made or enabled does not fail
/// the cache: [`SwapOutcome::Failed`] says why.
pub fn prepare(
    dev: &CacheDevice,
    filesystems: &[Filesystem],
    swap: Option<&str>,
    env: &CacheEnv,
) -> Result<CacheOutcome, CacheError> {
    // A bad size fails before anything is touched.
    let swap = match swap {
        None => None,
        Some(v) => Some((
            v,
            parse_size(v).map_err(|reason| CacheError::BadSwapSize {
                value: v.to_string(),
                reason,
            })?,
        )),
    };
    let mounted = match dev {
        CacheDevice::None => {
            return Ok(CacheOutcome::None {
                swap: skip_swap(
                    swap,
                    "no cache (b2c.cache_device=none) to hold the swap file",
                ),
            });
        }
        CacheDevice::Auto | CacheDevice::Reset => {
            match auto(matches!(dev, CacheDevice::Reset), env)? {
                Ok(m) => m,
                Err(reason) => {
                    return Ok(CacheOutcome::NoBlankDisk {
                        reason,
                        swap: skip_swap(swap, "no cache is mounted to hold the swap file"),
                    });
                }
            }
        }
        CacheDevice::Path(p) => match filesystems.iter().find(|f| &f.name == p) {
            Some(fs) => named_filesystem(fs, env)?,
            None => explicit(p, filesystems, env)?,
        },
    };
    let swap = setup_swap(swap, env);
    Ok(CacheOutcome::Mounted {
        device: mounted.device,
        label: mounted.label,
        mount_point: env.mount_point.clone(),
        fs_type: mounted.fs_type,
        formatted: mounted.formatted,
        created_partition: mounted.created_partition,
        swap,
    })
}

/// `auto`/`reset`: `Ok(Err(reason))` when there is no cache and no blank disk.
fn auto(reset: bool, env: &CacheEnv) -> Result<Result<Mounted, String>, CacheError> {
    let disks = discover(env)?;
    // 1. An existing B2C_CACHE file system, on a partition or a whole disk.
    for disk in &disks {
        let volumes: Vec<&Path> = if disk.partitions.is_empty() {
            vec![disk.path.as_path()]
        } else {
            disk.partitions.iter().map(|p| p.path.as_path()).collect()
        };
        for vol in volumes {
            // An unreadable volume is not ours to use; the blank-disk step reports it.
            let Ok(head) = read_range(vol, 0, HEAD_LEN) else {
                continue;
            };
            if let Some(Signature::Ext { label, .. }) = parse_ext(&head)
                && label == CACHE_LABEL
            {
                if reset {
                    mkfs(env, vol)?;
                }
                mount_at(env, vol, "ext4", &[])?;
                return Ok(Ok(Mounted {
                    device: vol.to_path_buf(),
                    label: Some(label),
                    fs_type: "ext4".into(),
                    formatted: reset,
                    created_partition: false,
                }));
            }
        }
    }
    // 2. The first blank disk.
    let mut reasons = Vec::new();
    if let Some(only) = &env.only_devices {
        for n in only {
            let name = strip_dev(n, env);
            if !disks.iter().any(|d| d.name == name) {
                reasons.push(format!(
                    "{name}: not a disk in {}",
                    block_dir(env).display()
                ));
            }
        }
    }
    let mut chosen = None;
    for disk in &disks {
        match not_blank(disk) {
            None => {
                chosen = Some(disk);
                break;
            }
            Some(why) => reasons.push(format!("{}: {why}", disk.name)),
        }
    }
    let Some(disk) = chosen else {
        if disks.is_empty() && reasons.is_empty() {
            reasons.push(format!("no disk in {}", block_dir(env).display()));
        }
        return Ok(Err(reasons.join("; ")));
    };
    let part = partition(env, disk)?;
    mkfs(env, &part)?;
    mount_at(env, &part, "ext4", &[])?;
    Ok(Ok(Mounted {
        device: part,
        label: Some(CACHE_LABEL.into()),
        fs_type: "ext4".into(),
        formatted: true,
        created_partition: true,
    }))
}

/// `b2c.cache_device=/dev/X`.
fn explicit(
    value: &str,
    filesystems: &[Filesystem],
    env: &CacheEnv,
) -> Result<Mounted, CacheError> {
    if !value.starts_with('/') {
        let names: Vec<&str> = filesystems.iter().map(|f| f.name.as_str()).collect();
        return Err(CacheError::BadCacheDevice {
            value: value.to_string(),
            reason: format!(
                "neither a /dev/… path nor the name of a b2c.filesystem (those are: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            ),
        });
    }
    let name = strip_dev(value, env);
    let path = if value.starts_with("/dev/") {
        env.dev_root.join(name)
    } else {
        PathBuf::from(value)
    };
    let meta = fs::metadata(&path).map_err(|source| CacheError::Io {
        device: path.clone(),
        step: "looking for the device".into(),
        source,
    })?;
    if !meta.file_type().is_block_device() {
        return Err(CacheError::Refused {
            device: path,
            reason: "not a block device".into(),
        });
    }
    let sigs = read_signatures(&path)?;
    let kernel_parts = partitions_of(env, name);
    if let Some(table) = sigs.iter().find(|s| s.is_partition_table()) {
        return Err(CacheError::Refused {
            device: path,
            reason: format!(
                "it has a {}: name one of its partitions, or wipe it first (wipefs -a)",
                table.describe()
            ),
        });
    }
    if !kernel_parts.is_empty() {
        let names: Vec<&str> = kernel_parts.iter().map(|p| p.name.as_str()).collect();
        return Err(CacheError::Refused {
            device: path,
            reason: format!("it has partitions ({}): name one of them", names.join(", ")),
        });
    }
    let existing = sigs.into_iter().find_map(|s| match s {
        Signature::Ext { label, .. } => Some(label),
        _ => None,
    });
    let (label, formatted) = match existing {
        Some(label) => (label, false),
        None => {
            mkfs(env, &path)?;
            (CACHE_LABEL.to_string(), true)
        }
    };
    mount_at(env, &path, "ext4", &[])?;
    Ok(Mounted {
        device: path,
        label: Some(label),
        fs_type: "ext4".into(),
        formatted,
        created_partition: false,
    })
}

/// `b2c.cache_device=<name of a b2c.filesystem>`: mounted as declared, never formatted.
fn named_filesystem(fs: &Filesystem, env: &CacheEnv) -> Result<Mounted, CacheError> {
    let src = if fs.src.starts_with("/dev/") {
        env.dev_root.join(strip_dev(&fs.src, env))
    } else {
        PathBuf::from(&fs.src)
    };
    let is_block = fs::metadata(&src)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    let sigs = if is_block {
        read_signatures(&src)?
    } else {
        Vec::new()
    };
    let ext = sigs.into_iter().find_map(|s| match s {
        Signature::Ext { label, .. } => Some(label),
        _ => None,
    });
    let fs_type = match (&fs.fs_type, &ext) {
        (Some(t), _) => t.clone(),
        (None, Some(_)) => "ext4".to_string(),
        (None, None) => {
            return Err(CacheError::BadCacheDevice {
                value: fs.name.clone(),
                reason: format!(
                    "b2c.filesystem {} has no type= and {} holds no ext file system",
                    fs.name, fs.src
                ),
            });
        }
    };
    mount_at(env, &src, &fs_type, &fs.opts)?;
    Ok(Mounted {
        device: src,
        label: ext,
        fs_type,
        formatted: false,
        created_partition: false,
    })
}

// ---------------------------------------------------------------------------------------
// Unit tests: the parsers, on valid, truncated and garbage buffers
// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random buffer.
    fn garbage(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 33) as u8
            })
            .collect()
    }

    fn ext_image(label: &[u8], incompat: u32) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[1024 + 24..1024 + 28].copy_from_slice(&2u32.to_le_bytes());
        b[1024 + 56..1024 + 58].copy_from_slice(&EXT_MAGIC.to_le_bytes());
        b[1024 + 92..1024 + 96].copy_from_slice(&0x4u32.to_le_bytes());
        b[1024 + 96..1024 + 100].copy_from_slice(&incompat.to_le_bytes());
        b[1024 + 120..1024 + 120 + label.len()].copy_from_slice(label);
        b
    }

    #[test]
    fn ext_label_and_version() {
        let b = ext_image(b"B2C_CACHE", 0x2c2);
        assert_eq!(
            identify(&b),
            vec![Signature::Ext {
                version: 4,
                label: "B2C_CACHE".into()
            }]
        );
        let b = ext_image(b"sixteen_bytes_ab", 0x2);
        assert_eq!(
            parse_ext(&b),
            Some(Signature::Ext {
                version: 3,
                label: "sixteen_bytes_ab".into()
            })
        );
        let mut b = ext_image(b"x", 0);
        b[1024 + 92] = 0;
        assert_eq!(
            parse_ext(&b),
            Some(Signature::Ext {
                version: 2,
                label: "x".into()
            })
        );
        // A bad block size is not ext.
        b[1024 + 24] = 40;
        assert_eq!(parse_ext(&b), None);
        // Invalid UTF-8 in the label is replaced, not a panic.
        let b = ext_image(&[0xff, 0xfe, b'a'], 0x40);
        assert!(
            matches!(parse_ext(&b), Some(Signature::Ext { label, .. }) if label.ends_with('a'))
        );
    }

    #[test]
    fn truncated_buffers_find_nothing_and_never_panic() {
        let full = ext_image(b"B2C_CACHE", 0x40);
        for n in 0..full.len() {
            let sigs = identify(&full[..n]);
            // The superblock needs 1024 + 136 bytes.
            assert_eq!(sigs.is_empty(), n < 1024 + 136, "length {n}: {sigs:?}");
        }
        for n in [0, 1, 9, 511, 512, 4095, 4096, 65599, 65608] {
            assert!(identify(&vec![0u8; n]).is_empty());
            assert!(!has_backup_gpt(&vec![0u8; n]));
        }
    }

    #[test]
    fn garbage_buffers_never_panic() {
        for seed in 0..64 {
            for len in [0, 3, 512, 1100, 1160, 4096, 33000, HEAD_LEN] {
                let g = garbage(len, seed);
                let _ = identify(&g);
                let _ = parse_ext(&g);
                let _ = has_backup_gpt(&g);
            }
        }
        // Random bytes almost never look like a superblock.
        assert!(parse_ext(&garbage(HEAD_LEN, 7)).is_none());
    }

    #[test]
    fn swap_gpt_mbr_and_others() {
        let mut b = vec![0u8; HEAD_LEN];
        b[4096 - 10..4096].copy_from_slice(b"SWAPSPACE2");
        b[1024 + 28..1024 + 32].copy_from_slice(b"swp1");
        assert_eq!(
            identify(&b),
            vec![Signature::Swap {
                label: "swp1".into()
            }]
        );
        // 64 KiB pages.
        let mut b = vec![0u8; HEAD_LEN];
        b[65536 - 10..65536].copy_from_slice(b"SWAPSPACE2");
        assert_eq!(identify(&b), vec![Signature::Swap { label: "".into() }]);

        // A protective MBR with a GPT: one signature, the GPT.
        let mut b = vec![0u8; 8192];
        b[446 + 4] = 0xEE;
        b[510] = 0x55;
        b[511] = 0xAA;
        b[512..520].copy_from_slice(b"EFI PART");
        assert_eq!(identify(&b), vec![Signature::Gpt]);
        assert!(Signature::Gpt.is_partition_table());
        // 4K-sector GPT.
        let mut b = vec![0u8; 8192];
        b[4096..4104].copy_from_slice(b"EFI PART");
        assert_eq!(identify(&b), vec![Signature::Gpt]);

        // DOS table.
        let mut b = vec![0u8; 1024];
        b[446] = 0x80;
        b[446 + 4] = 0x83;
        b[510] = 0x55;
        b[511] = 0xAA;
        assert_eq!(identify(&b), vec![Signature::Mbr]);
        // Bad status byte: some boot sector.
        b[446 + 16] = 0x12;
        assert_eq!(identify(&b), vec![Signature::BootSector]);
        // FAT32 boot sector.
        b[82..87].copy_from_slice(b"FAT32");
        assert_eq!(identify(&b), vec![Signature::Vfat]);

        let mut b = vec![0u8; HEAD_LEN];
        b[0..4].copy_from_slice(b"XFSB");
        b[65536 + 64..65536 + 72].copy_from_slice(b"_BHRfS_M");
        b[32769..32774].copy_from_slice(b"CD001");
        b[512..520].copy_from_slice(b"LABELONE");
        assert_eq!(
            identify(&b),
            vec![
                Signature::Xfs,
                Signature::Btrfs,
                Signature::Iso9660,
                Signature::Lvm2
            ]
        );
        let mut b = vec![0u8; 8192];
        b[4096..4100].copy_from_slice(&[0xFC, 0x4E, 0x2B, 0xA9]);
        b[0..6].copy_from_slice(b"LUKS\xBA\xBE");
        assert_eq!(identify(&b), vec![Signature::Luks, Signature::MdRaid]);
    }

    #[test]
    fn backup_gpt() {
        let mut t = vec![0u8; TAIL_LEN];
        t[TAIL_LEN - 512..TAIL_LEN - 504].copy_from_slice(b"EFI PART");
        assert!(has_backup_gpt(&t));
        assert!(has_backup_gpt(&t[TAIL_LEN - 512..]));
        assert!(!has_backup_gpt(&t[..TAIL_LEN - 1]));
        let mut t = vec![0u8; TAIL_LEN];
        t[0..8].copy_from_slice(b"EFI PART");
        assert!(has_backup_gpt(&t));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("16M"), Ok(16 << 20));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        for bad in [
            "",
            "G",
            "4X",
            "4GX",
            "-1G",
            "1é",
            "4Gé",
            "1.5G",
            "4 G",
            "99999999999999999999",
            "16E",
            "1K",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_size("20000000P").unwrap_err().contains("too large"));
    }

    #[test]
    fn natural_order_and_virtual_names() {
        let mut v = vec!["sdb", "nvme10n1", "sda", "nvme2n1", "sdaa", "vda"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["nvme2n1", "nvme10n1", "sda", "sdaa", "sdb", "vda"]);
        for n in [
            "loop0",
            "zram0",
            "sr0",
            "dm-1",
            "md127",
            "mmcblk0boot0",
            "mmcblk0rpmb",
        ] {
            assert!(is_virtual(n), "{n}");
        }
        for n in ["sda", "nvme0n1", "mmcblk0", "vda", "hda"] {
            assert!(!is_virtual(n), "{n}");
        }
    }

    #[test]
    fn mount_options() {
        let (f, d) = mount_opts(&[
            "noatime".into(),
            "ro".into(),
            "discard".into(),
            "x=1".into(),
        ]);
        assert_eq!(f, MsFlags::MS_NOATIME | MsFlags::MS_RDONLY);
        assert_eq!(d, "discard,x=1");
    }

    #[test]
    fn describe_lines() {
        let o = CacheOutcome::Mounted {
            device: "/dev/vda1".into(),
            label: Some(CACHE_LABEL.into()),
            mount_point: "/storage".into(),
            fs_type: "ext4".into(),
            formatted: false,
            created_partition: false,
            swap: SwapOutcome::NotRequested,
        };
        assert_eq!(
            o.describe(),
            "farm-agent: cache: /dev/vda1 (B2C_CACHE) mounted at /storage"
        );
        let o = CacheOutcome::None {
            swap: SwapOutcome::Skipped {
                size: "4G".into(),
                reason: "no cache".into(),
            },
        };
        assert!(
            o.describe()
                .ends_with("farm-agent: swap: b2c.swap=4G ignored: no cache")
        );
    }
}
