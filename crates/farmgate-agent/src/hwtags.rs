//! The machine's hardware, described as registration tags (CI-tron style).
//!
//! When an unknown DUT boots the farm's default image, the agent reads the hardware
//! ([`collect`]), turns it into tags ([`tags`]) and a base name ([`base_name`]) and sends a
//! [`farmgate_wire::DutRegistration`] ([`registration`]) to `POST /api/v1/dut/`.
//!
//! Everything is read below a root path (`/` in production), so that tests can use fixture
//! trees: `proc/cpuinfo`, `proc/meminfo`, `proc/net/route`, `proc/net/fib_trie`,
//! `sys/bus/pci/devices/*`, `sys/bus/virtio/devices/*`, `sys/block/*`, `sys/class/dmi/id/*`,
//! `sys/class/net/*` and `proc/device-tree/model` (or `sys/firmware/devicetree/base/model`).
//!
//! # Tag grammar
//!
//! A tag is `namespace:key[:value…]`. Every tag only contains `[A-Za-z0-9_.:+-]`. Values read
//! from the machine are *sanitised*: trimmed, every other character (including `:` and
//! spaces) replaced by `_`, runs of `_` collapsed, leading/trailing `_` removed, and cut to
//! [`MAX_VALUE_LEN`] characters; a value that is empty after that gives no tag. PCI ids are
//! written as CI-tron writes them: lowercase hexadecimal with `0x` and no padding
//! (`0x1002:0x1636`). [`tags`] returns the tags sorted and without duplicates.
//!
//! | tag | meaning | example |
//! |-----|---------|---------|
//! | `cpu:arch:A` | CPU architecture (`uname -m` style) | `cpu:arch:x86_64` |
//! | `cpu:vendor:V` | x86 `vendor_id`; on ARM the `CPU implementer` name (or its hex code) | `cpu:vendor:AuthenticAMD` |
//! | `cpu:family:F` | x86 `cpu family` (decimal); on ARM the `CPU part` (hex) | `cpu:family:23` |
//! | `cpu:model:M` | `model name`, spaces → `_` | `cpu:model:AMD_Ryzen_7_4800U_with_Radeon_Graphics` |
//! | `cpu:cores:N` | physical cores (distinct `physical id`/`core id`; threads if unknown) | `cpu:cores:8` |
//! | `cpu:threads:N` | logical CPUs (`processor` entries) | `cpu:threads:16` |
//! | `cpu:flag:F` | one of [`CPU_FLAGS`] present in `flags`/`Features` | `cpu:flag:avx2` |
//! | `mem:size:NGiB` | `MemTotal` rounded to the nearest GiB (`NMiB` below 1 GiB) | `mem:size:16GiB` |
//! | `disk:count:N` | block devices of non-zero size (loop, ram, zram excluded) | `disk:count:1` |
//! | `disk:ssd` | at least one non-rotational, non-removable disk | `disk:ssd` |
//! | `disk:hdd` | at least one rotational disk | `disk:hdd` |
//! | `disk:nvme` | at least one NVMe disk | `disk:nvme` |
//! | `dmi:vendor:V` | DMI `sys_vendor` | `dmi:vendor:LENOVO` |
//! | `dmi:product:P` | DMI `product_name` | `dmi:product:20U5` |
//! | `dmi:board:B` | DMI `board_name` | `dmi:board:20U5CTO1WW` |
//! | `dt:model:M` | device-tree model (boards without DMI) | `dt:model:Raspberry_Pi_4_Model_B_Rev_1.4` |
//! | `pci:0xVVVV:0xDDDD` | a display (class `0x03`) or network (class `0x02`) PCI function | `pci:0x1002:0x1636` |
//! | `virtio:family:VIRTIO` | virtio devices present (PCI vendor `0x1af4` or `sys/bus/virtio`) | `virtio:family:VIRTIO` |
//! | `amdgpu:pciid:0x1002:0xDDDD` | an AMD display controller | `amdgpu:pciid:0x1002:0x1636` |
//! | `amdgpu:family:F` | kernel `AMDGPU_FAMILY_*` short name (known ids only) | `amdgpu:family:RV` |
//! | `amdgpu:codename:C` | chip codename (known ids only) | `amdgpu:codename:RENOIR` |
//! | `amdgpu:architecture:A` | GCN1…GCN5.1, RDNA1…RDNA3 (known ids only) | `amdgpu:architecture:GCN5.1` |
//! | `amdgpu:gfxversion:G` | `gfx6`…`gfx11` (known ids only) | `amdgpu:gfxversion:gfx9` |
//! | `amdgpu:APU` | the AMD GPU is integrated in the CPU (known ids only) | `amdgpu:APU` |
//! | `intelgpu:pciid:0x8086:0xDDDD` | an Intel display controller | `intelgpu:pciid:0x8086:0x9a49` |
//! | `nvidia:pciid:0x10de:0xDDDD` | an NVIDIA display controller | `nvidia:pciid:0x10de:0x2484` |
//!
//! The AMD table ([`amd_gpu_info`]) is small and built in; an id it does not know gives only
//! the `amdgpu:pciid` tag.
//!
//! # Base name
//!
//! [`base_name`] is the most significant characteristic, used by the gateway to name the DUT
//! (`FARM_NAME-base_name-N`): the GPU that matters most (a discrete one before an integrated
//! one): an AMD GPU gives its gfx version (`gfx9`), or `amdgpu` when unknown; an NVIDIA GPU
//! `nvidia`; an Intel GPU `intelgpu`; else `virtio` on a virtio machine; else the CPU
//! architecture (`x86_64`, `aarch64`), else `unknown`. Always lowercase `[a-z0-9_.-]`.
//!
//! # IP address
//!
//! The IPv4 address of the default-route interface is read from `proc/net/fib_trie`: a local
//! (`/32 host LOCAL`) address that lies in one of the subnets `proc/net/route` gives for that
//! interface. Callers that know better may overwrite [`DefaultRoute::ipv4`] before calling
//! [`registration`].
//!
//! # Errors
//!
//! `proc/cpuinfo` and `proc/meminfo` are required: failing to read them, or a `meminfo`
//! without a parsable `MemTotal`, is a [`HwError`] naming the file. Every other file is
//! optional: a missing one is skipped silently; one that cannot be read or parsed (non-hex PCI
//! id, odd route table…) is skipped and noted in [`Hardware::warnings`] with its path.
//! Every file is read up to [`MAX_FILE_LEN`] bytes and decoded lossily, so huge or binary
//! content never panics.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Longest sanitised value kept in a tag, in characters.
pub const MAX_VALUE_LEN: usize = 64;

/// Largest part of a file that is read (bytes); the rest is ignored.
pub const MAX_FILE_LEN: u64 = 4 << 20;

/// CPU flags turned into `cpu:flag:*` tags when present.
pub const CPU_FLAGS: &[&str] = &[
    "sse4_2",
    "avx",
    "avx2",
    "avx512f",
    "aes",
    "sha_ni",
    "vmx",
    "svm",
    "hypervisor",
    "asimd",
    "sve",
    "sve2",
];

const PCI_VENDOR_AMD: u16 = 0x1002;
const PCI_VENDOR_INTEL: u16 = 0x8086;
const PCI_VENDOR_NVIDIA: u16 = 0x10de;
const PCI_VENDOR_VIRTIO: u16 = 0x1af4;

/// Why the hardware could not be described.
#[derive(Debug, thiserror::Error)]
pub enum HwError {
    /// A required file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A required file has content that cannot be used.
    #[error("cannot parse {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// Everything [`collect`] found about the machine.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Hardware {
    /// The CPU(s).
    pub cpu: Cpu,
    /// `MemTotal` of `proc/meminfo`, in KiB.
    pub mem_total_kib: u64,
    /// PCI functions, sorted by address.
    pub pci: Vec<PciDevice>,
    /// Number of devices on the virtio bus (`sys/bus/virtio/devices`).
    pub virtio_bus_devices: usize,
    /// Block devices (loop, ram and zram excluded), sorted by name.
    pub disks: Vec<Disk>,
    /// DMI identification (absent on many ARM boards).
    pub dmi: Option<Dmi>,
    /// Device-tree model string, if any.
    pub dt_model: Option<String>,
    /// Network interfaces, sorted by name.
    pub net: Vec<NetInterface>,
    /// The default-route interface, if any.
    pub default_route: Option<DefaultRoute>,
    /// Optional files that were present but could not be read or parsed (path: reason).
    pub warnings: Vec<String>,
}

/// CPU description from `proc/cpuinfo`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Cpu {
    /// Architecture, `uname -m` style (`x86_64`, `aarch64`, …), if it could be told.
    pub arch: Option<String>,
    /// Vendor (`AuthenticAMD`, `GenuineIntel`, `ARM`…).
    pub vendor: Option<String>,
    /// Family (x86 `cpu family`, ARM `CPU part`).
    pub family: Option<String>,
    /// Model name.
    pub model_name: Option<String>,
    /// Physical cores.
    pub cores: usize,
    /// Logical CPUs.
    pub threads: usize,
    /// Flags (x86 `flags`, ARM `Features`) of the first CPU.
    pub flags: BTreeSet<String>,
}

/// One PCI function from `sys/bus/pci/devices/*`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PciDevice {
    /// Address (`0000:00:08.1`).
    pub address: String,
    /// Vendor id, `None` if missing or not hexadecimal.
    pub vendor: Option<u16>,
    /// Device id, `None` if missing or not hexadecimal.
    pub device: Option<u16>,
    /// Class code (24 bits: class, subclass, prog-if).
    pub class: Option<u32>,
    /// Subsystem vendor id.
    pub subsystem_vendor: Option<u16>,
    /// Subsystem device id.
    pub subsystem_device: Option<u16>,
    /// Revision.
    pub revision: Option<u8>,
    /// Name of the bound driver (`driver` symlink).
    pub driver: Option<String>,
}

impl PciDevice {
    /// Base class (`0x03` display, `0x02` network, …).
    pub fn base_class(&self) -> Option<u8> {
        self.class.map(|c| ((c >> 16) & 0xff) as u8)
    }

    /// Whether this is a display controller (VGA, XGA, 3D, other).
    pub fn is_display(&self) -> bool {
        self.base_class() == Some(0x03)
    }

    /// Whether this is a network controller.
    pub fn is_network(&self) -> bool {
        self.base_class() == Some(0x02)
    }

    /// `0xvvvv:0xdddd`, if both ids are known.
    pub fn pciid(&self) -> Option<String> {
        Some(format!("{:#x}:{:#x}", self.vendor?, self.device?))
    }
}

/// One block device from `sys/block/*`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Disk {
    /// Kernel name (`nvme0n1`, `sda`, `vda`).
    pub name: String,
    /// Size in bytes (`size` × 512).
    pub size_bytes: u64,
    /// `queue/rotational` is 1.
    pub rotational: bool,
    /// `removable` is 1.
    pub removable: bool,
}

/// DMI identification from `sys/class/dmi/id`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Dmi {
    /// `sys_vendor`.
    pub sys_vendor: Option<String>,
    /// `product_name`.
    pub product_name: Option<String>,
    /// `product_version`.
    pub product_version: Option<String>,
    /// `board_vendor`.
    pub board_vendor: Option<String>,
    /// `board_name`.
    pub board_name: Option<String>,
    /// `bios_vendor`.
    pub bios_vendor: Option<String>,
    /// `bios_version`.
    pub bios_version: Option<String>,
}

/// One network interface from `sys/class/net/*`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NetInterface {
    /// Interface name.
    pub name: String,
    /// MAC address (lowercase), if any.
    pub mac: Option<String>,
    /// `operstate` (`up`, `down`, `unknown`…).
    pub operstate: Option<String>,
    /// Backed by a device (`device` symlink present), i.e. not virtual.
    pub physical: bool,
}

/// The interface of the default route.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DefaultRoute {
    /// Interface name.
    pub interface: String,
    /// Its MAC address (lowercase).
    pub mac: Option<String>,
    /// The gateway.
    pub gateway: Option<Ipv4Addr>,
    /// Its IPv4 address (from `proc/net/fib_trie`).
    pub ipv4: Option<Ipv4Addr>,
}

/// Facts about one AMD GPU PCI device id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AmdGpuInfo {
    /// Chip codename (`RENOIR`).
    pub codename: &'static str,
    /// Kernel `AMDGPU_FAMILY_*` short name (`RV`).
    pub family: &'static str,
    /// Architecture (`GCN5.1`).
    pub architecture: &'static str,
    /// GFX version (`gfx9`).
    pub gfxversion: &'static str,
    /// Integrated in the CPU.
    pub apu: bool,
}

const fn amd(
    codename: &'static str,
    family: &'static str,
    architecture: &'static str,
    gfxversion: &'static str,
    apu: bool,
) -> AmdGpuInfo {
    AmdGpuInfo {
        codename,
        family,
        architecture,
        gfxversion,
        apu,
    }
}

/// Built-in table of common AMD GPUs (PCI device id, vendor `0x1002`), from the public
/// device lists of the Linux amdgpu driver.
const AMD_GPUS: &[(u16, AmdGpuInfo)] = &[
    (0x6798, amd("TAHITI", "SI", "GCN1", "gfx6", false)),
    (0x67b1, amd("HAWAII", "CI", "GCN2", "gfx7", false)),
    (0x9874, amd("CARRIZO", "CZ", "GCN3", "gfx8", true)),
    (0x98e4, amd("STONEY", "CZ", "GCN3", "gfx8", true)),
    (0x67df, amd("POLARIS10", "VI", "GCN4", "gfx8", false)),
    (0x67ef, amd("POLARIS11", "VI", "GCN4", "gfx8", false)),
    (0x699f, amd("POLARIS12", "VI", "GCN4", "gfx8", false)),
    (0x687f, amd("VEGA10", "AI", "GCN5", "gfx9", false)),
    (0x66af, amd("VEGA20", "AI", "GCN5.1", "gfx9", false)),
    (0x15dd, amd("RAVEN", "RV", "GCN5", "gfx9", true)),
    (0x15d8, amd("RAVEN", "RV", "GCN5", "gfx9", true)),
    (0x1636, amd("RENOIR", "RV", "GCN5.1", "gfx9", true)),
    (0x1638, amd("RENOIR", "RV", "GCN5.1", "gfx9", true)),
    (0x164c, amd("RENOIR", "RV", "GCN5.1", "gfx9", true)),
    (0x731f, amd("NAVI10", "NV", "RDNA1", "gfx10", false)),
    (0x7340, amd("NAVI14", "NV", "RDNA1", "gfx10", false)),
    (0x73bf, amd("NAVI21", "NV", "RDNA2", "gfx10", false)),
    (0x73df, amd("NAVI22", "NV", "RDNA2", "gfx10", false)),
    (0x73ff, amd("NAVI23", "NV", "RDNA2", "gfx10", false)),
    (0x743f, amd("NAVI24", "NV", "RDNA2", "gfx10", false)),
    (0x163f, amd("VANGOGH", "VGH", "RDNA2", "gfx10", true)),
    (0x1681, amd("REMBRANDT", "YC", "RDNA2", "gfx10", true)),
    (0x744c, amd("NAVI31", "GC_11_0_0", "RDNA3", "gfx11", false)),
    (0x7480, amd("NAVI33", "GC_11_0_0", "RDNA3", "gfx11", false)),
];

/// What the built-in table knows about AMD GPU device id `device` (vendor `0x1002`).
pub fn amd_gpu_info(device: u16) -> Option<AmdGpuInfo> {
    AMD_GPUS
        .iter()
        .find(|(id, _)| *id == device)
        .map(|(_, info)| *info)
}

// ---------------------------------------------------------------------------------------
// Reading files
// ---------------------------------------------------------------------------------------

/// Reads at most [`MAX_FILE_LEN`] bytes of `path`, decoded lossily. `Ok(None)` if absent.
fn read_text(path: &Path) -> std::io::Result<Option<String>> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut buf = Vec::new();
    file.take(MAX_FILE_LEN).read_to_end(&mut buf)?;
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// Collects what goes wrong with optional files.
struct Reader<'a> {
    root: &'a Path,
    warnings: Vec<String>,
}

impl Reader<'_> {
    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// An optional file, trimmed; `None` if absent, unreadable (warned) or empty.
    fn optional(&mut self, path: &Path) -> Option<String> {
        match read_text(path) {
            Ok(Some(s)) => {
                let s = s.trim_matches(|c: char| c.is_whitespace() || c == '\0');
                (!s.is_empty()).then(|| s.to_string())
            }
            Ok(None) => None,
            Err(e) => {
                self.warn(path, &e.to_string());
                None
            }
        }
    }

    fn warn(&mut self, path: &Path, reason: &str) {
        self.warnings.push(format!("{}: {reason}", path.display()));
    }

    /// Entries of an optional directory, sorted by name.
    fn dir_entries(&mut self, path: &Path) -> Vec<(String, PathBuf)> {
        let rd = match std::fs::read_dir(path) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => {
                self.warn(path, &e.to_string());
                return Vec::new();
            }
        };
        let mut out: Vec<(String, PathBuf)> = rd
            .filter_map(|e| e.ok())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect();
        out.sort();
        out
    }

    /// An optional hexadecimal number (`0x1002` or `1002`); warns when present but not hex.
    fn hex(&mut self, path: &Path) -> Option<u64> {
        let text = self.optional(path)?;
        let digits = text
            .strip_prefix("0x")
            .or_else(|| text.strip_prefix("0X"))
            .unwrap_or(&text);
        match u64::from_str_radix(digits, 16) {
            Ok(v) => Some(v),
            Err(_) => {
                self.warn(
                    path,
                    &format!("not a hexadecimal number: {:?}", shorten(&text)),
                );
                None
            }
        }
    }

    fn hex_u16(&mut self, path: &Path) -> Option<u16> {
        let v = self.hex(path)?;
        match u16::try_from(v) {
            Ok(v) => Some(v),
            Err(_) => {
                self.warn(path, &format!("{v:#x} does not fit in 16 bits"));
                None
            }
        }
    }

    fn decimal(&mut self, path: &Path) -> Option<u64> {
        let text = self.optional(path)?;
        match text.parse() {
            Ok(v) => Some(v),
            Err(_) => {
                self.warn(path, &format!("not a decimal number: {:?}", shorten(&text)));
                None
            }
        }
    }
}

fn shorten(s: &str) -> String {
    s.chars().take(40).collect()
}

fn required(path: PathBuf) -> Result<String, HwError> {
    match read_text(&path) {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(HwError::Read {
            path,
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        }),
        Err(source) => Err(HwError::Read { path, source }),
    }
}

// ---------------------------------------------------------------------------------------
// Collecting
// ---------------------------------------------------------------------------------------

/// Reads the hardware description below `root` (`/` in production).
///
/// Errors name the file: `proc/cpuinfo` and `proc/meminfo` are required; see the module
/// documentation for what happens with the optional files.
pub fn collect(root: &Path) -> Result<Hardware, HwError> {
    let cpuinfo_path = root.join("proc/cpuinfo");
    let cpuinfo = required(cpuinfo_path)?;
    let meminfo_path = root.join("proc/meminfo");
    let meminfo = required(meminfo_path.clone())?;
    let mem_total_kib = parse_mem_total(&meminfo).ok_or_else(|| HwError::Parse {
        path: meminfo_path,
        reason: "no parsable `MemTotal: N kB` line".into(),
    })?;

    let mut r = Reader {
        root,
        warnings: Vec::new(),
    };
    let mut cpu = parse_cpuinfo(&cpuinfo);
    if cpu.arch.is_none() && root == Path::new("/") {
        cpu.arch = Some(std::env::consts::ARCH.to_string());
    }
    let pci = collect_pci(&mut r);
    let virtio_bus_devices = r.dir_entries(&r.path("sys/bus/virtio/devices")).len();
    let disks = collect_disks(&mut r);
    let dmi = collect_dmi(&mut r);
    let dt_model = {
        let p1 = r.path("proc/device-tree/model");
        let p2 = r.path("sys/firmware/devicetree/base/model");
        r.optional(&p1).or_else(|| r.optional(&p2))
    };
    let net = collect_net(&mut r);
    let default_route = collect_default_route(&mut r, &net);

    Ok(Hardware {
        cpu,
        mem_total_kib,
        pci,
        virtio_bus_devices,
        disks,
        dmi,
        dt_model,
        net,
        default_route,
        warnings: r.warnings,
    })
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemTotal:")?;
        let mut it = rest.split_whitespace();
        let n: u64 = it.next()?.parse().ok()?;
        match it.next() {
            None | Some("kB") => Some(n),
            Some(_) => None,
        }
    })
}

/// Parses `proc/cpuinfo` (x86, ARM, RISC-V layouts); never fails.
fn parse_cpuinfo(text: &str) -> Cpu {
    let mut cpu = Cpu::default();
    let mut first: BTreeMap<String, String> = BTreeMap::new();
    let mut cores: BTreeSet<(String, String)> = BTreeSet::new();
    let mut physical_id = String::new();
    let mut core_id_lines = 0usize;

    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let key = key.trim();
        let value = value.trim();
        match key {
            // On old ARM kernels `Processor : ARMv7 …` is a name, not an index.
            "processor" if value.parse::<u64>().is_ok() => {
                cpu.threads += 1;
                physical_id.clear();
            }
            "physical id" => physical_id = value.to_string(),
            "core id" => {
                core_id_lines += 1;
                cores.insert((physical_id.clone(), value.to_string()));
            }
            _ => {}
        }
        first
            .entry(key.to_string())
            .or_insert_with(|| value.to_string());
    }
    // Trust `core id` only when every logical CPU has one.
    cpu.cores = if core_id_lines == cpu.threads && !cores.is_empty() {
        cores.len()
    } else {
        cpu.threads
    };

    let get = |k: &str| first.get(k).filter(|v| !v.is_empty()).cloned();
    let flags = get("flags").or_else(|| get("Features")).unwrap_or_default();
    cpu.flags = flags.split_whitespace().map(str::to_string).collect();

    cpu.vendor = get("vendor_id").or_else(|| {
        get("CPU implementer").map(|imp| {
            let code = imp
                .strip_prefix("0x")
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match code {
                Some(0x41) => "ARM".to_string(),
                Some(0x42) => "Broadcom".to_string(),
                Some(0x43) => "Cavium".to_string(),
                Some(0x48) => "HiSilicon".to_string(),
                Some(0x4e) => "NVIDIA".to_string(),
                Some(0x51) => "Qualcomm".to_string(),
                Some(0x53) => "Samsung".to_string(),
                Some(0x61) => "Apple".to_string(),
                Some(0xc0) => "Ampere".to_string(),
                _ => imp,
            }
        })
    });
    cpu.family = get("cpu family").or_else(|| get("CPU part"));
    cpu.model_name = get("model name").or_else(|| get("uarch"));

    cpu.arch = if let Some(isa) = get("isa") {
        if isa.starts_with("rv64") {
            Some("riscv64".into())
        } else if isa.starts_with("rv32") {
            Some("riscv32".into())
        } else {
            None
        }
    } else if first.contains_key("vendor_id") {
        Some(
            if cpu.flags.contains("lm") {
                "x86_64"
            } else {
                "i686"
            }
            .into(),
        )
    } else if let Some(a) = get("CPU architecture") {
        match a.as_str() {
            "8" | "AArch64" => Some("aarch64".into()),
            "7" => Some("armv7l".into()),
            "6" | "5TEJ" | "5TE" => Some("armv6l".into()),
            _ => None,
        }
    } else {
        None
    };
    cpu
}

fn collect_pci(r: &mut Reader<'_>) -> Vec<PciDevice> {
    let base = r.path("sys/bus/pci/devices");
    let mut out = Vec::new();
    for (address, dir) in r.dir_entries(&base) {
        let class = r
            .hex(&dir.join("class"))
            .and_then(|c| if c > 0xff_ffff { None } else { Some(c as u32) });
        let revision = r
            .hex(&dir.join("revision"))
            .and_then(|v| u8::try_from(v).ok());
        let driver = std::fs::read_link(dir.join("driver"))
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()));
        out.push(PciDevice {
            vendor: r.hex_u16(&dir.join("vendor")),
            device: r.hex_u16(&dir.join("device")),
            class,
            subsystem_vendor: r.hex_u16(&dir.join("subsystem_vendor")),
            subsystem_device: r.hex_u16(&dir.join("subsystem_device")),
            revision,
            driver,
            address,
        });
    }
    out
}

fn collect_disks(r: &mut Reader<'_>) -> Vec<Disk> {
    let base = r.path("sys/block");
    let mut out = Vec::new();
    for (name, dir) in r.dir_entries(&base) {
        if ["loop", "ram", "zram"].iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let sectors = r.decimal(&dir.join("size")).unwrap_or(0);
        if sectors == 0 {
            continue;
        }
        let rotational = r.decimal(&dir.join("queue/rotational")) == Some(1);
        let removable = r.decimal(&dir.join("removable")) == Some(1);
        out.push(Disk {
            name,
            size_bytes: sectors.saturating_mul(512),
            rotational,
            removable,
        });
    }
    out
}

fn collect_dmi(r: &mut Reader<'_>) -> Option<Dmi> {
    let base = r.path("sys/class/dmi/id");
    let mut field = |name: &str| r.optional(&base.join(name));
    let dmi = Dmi {
        sys_vendor: field("sys_vendor"),
        product_name: field("product_name"),
        product_version: field("product_version"),
        board_vendor: field("board_vendor"),
        board_name: field("board_name"),
        bios_vendor: field("bios_vendor"),
        bios_version: field("bios_version"),
    };
    (dmi != Dmi::default()).then_some(dmi)
}

fn collect_net(r: &mut Reader<'_>) -> Vec<NetInterface> {
    let base = r.path("sys/class/net");
    let mut out = Vec::new();
    for (name, dir) in r.dir_entries(&base) {
        let mac = r
            .optional(&dir.join("address"))
            .map(|m| m.to_ascii_lowercase());
        let operstate = r.optional(&dir.join("operstate"));
        let physical = std::fs::symlink_metadata(dir.join("device")).is_ok();
        out.push(NetInterface {
            name,
            mac,
            operstate,
            physical,
        });
    }
    out
}

/// A little-endian hexadecimal IPv4 address as `proc/net/route` writes it.
fn route_addr(hex: &str) -> Option<Ipv4Addr> {
    let v = u32::from_str_radix(hex, 16).ok()?;
    Some(Ipv4Addr::from(v.swap_bytes()))
}

fn collect_default_route(r: &mut Reader<'_>, net: &[NetInterface]) -> Option<DefaultRoute> {
    let route_path = r.path("proc/net/route");
    let routes = r.optional(&route_path)?;
    // (iface, destination, gateway, mask, metric)
    let mut entries = Vec::new();
    for (n, line) in routes.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.is_empty() {
            continue;
        }
        let parsed = (|| {
            let iface = *f.first()?;
            let dest = route_addr(f.get(1)?)?;
            let gw = route_addr(f.get(2)?)?;
            let metric: u64 = f.get(6)?.parse().ok()?;
            let mask = route_addr(f.get(7)?)?;
            Some((iface.to_string(), dest, gw, mask, metric))
        })();
        match parsed {
            Some(e) => entries.push(e),
            None => r.warn(&route_path, &format!("line {}: unparsable", n + 1)),
        }
    }
    let (iface, _, gw, _, _) = entries
        .iter()
        .filter(|(_, d, _, m, _)| d.is_unspecified() && m.is_unspecified())
        .min_by_key(|e| e.4)?
        .clone();
    let subnets: Vec<(Ipv4Addr, Ipv4Addr)> = entries
        .iter()
        .filter(|(i, d, g, _, _)| *i == iface && g.is_unspecified() && !d.is_unspecified())
        .map(|(_, d, _, m, _)| (*d, *m))
        .collect();
    let fib_path = r.path("proc/net/fib_trie");
    let locals = r
        .optional(&fib_path)
        .map(|t| parse_fib_trie_locals(&t))
        .unwrap_or_default();
    let ipv4 = locals.into_iter().find(|ip| {
        subnets
            .iter()
            .any(|(d, m)| u32::from(*ip) & u32::from(*m) == u32::from(*d) & u32::from(*m))
    });
    let mac = net
        .iter()
        .find(|n| n.name == iface)
        .and_then(|n| n.mac.clone());
    Some(DefaultRoute {
        interface: iface,
        mac,
        gateway: (!gw.is_unspecified()).then_some(gw),
        ipv4,
    })
}

/// Local (`/32 host LOCAL`) non-loopback addresses of `proc/net/fib_trie`, in order.
fn parse_fib_trie_locals(text: &str) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let t = line.trim();
        if let Some(addr) = t.strip_prefix("|--") {
            last = addr.trim().parse().ok();
        } else if t.starts_with("/32")
            && t.contains("host")
            && t.ends_with("LOCAL")
            && let Some(ip) = last
            && !ip.is_loopback()
            && !out.contains(&ip)
        {
            out.push(ip);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Tags
// ---------------------------------------------------------------------------------------

/// Sanitises a value read from the machine (see the module documentation).
pub fn sanitize_value(raw: &str) -> String {
    let mut out = String::new();
    for c in raw.trim().chars() {
        let c = if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '+' | '-') {
            c
        } else {
            '_'
        };
        if c == '_' && (out.is_empty() || out.ends_with('_')) {
            continue;
        }
        out.push(c);
        if out.len() >= MAX_VALUE_LEN {
            break;
        }
    }
    while out.ends_with('_') {
        out.pop();
    }
    out
}

fn push_value(tags: &mut Vec<String>, prefix: &str, raw: Option<&str>) {
    if let Some(raw) = raw {
        let v = sanitize_value(raw);
        if !v.is_empty() {
            tags.push(format!("{prefix}:{v}"));
        }
    }
}

/// The registration tags of `hw` (grammar in the module documentation), sorted, unique.
pub fn tags(hw: &Hardware) -> Vec<String> {
    let mut t = Vec::new();
    let cpu = &hw.cpu;
    push_value(&mut t, "cpu:arch", cpu.arch.as_deref());
    push_value(&mut t, "cpu:vendor", cpu.vendor.as_deref());
    push_value(&mut t, "cpu:family", cpu.family.as_deref());
    push_value(&mut t, "cpu:model", cpu.model_name.as_deref());
    if cpu.threads > 0 {
        t.push(format!("cpu:cores:{}", cpu.cores));
        t.push(format!("cpu:threads:{}", cpu.threads));
    }
    for flag in CPU_FLAGS {
        if cpu.flags.contains(*flag) {
            t.push(format!("cpu:flag:{flag}"));
        }
    }

    if hw.mem_total_kib > 0 {
        let mib = (hw.mem_total_kib + 512) / 1024;
        if mib < 1024 {
            t.push(format!("mem:size:{}MiB", mib.max(1)));
        } else {
            t.push(format!("mem:size:{}GiB", (mib + 512) / 1024));
        }
    }

    t.push(format!("disk:count:{}", hw.disks.len()));
    if hw.disks.iter().any(|d| !d.rotational && !d.removable) {
        t.push("disk:ssd".into());
    }
    if hw.disks.iter().any(|d| d.rotational) {
        t.push("disk:hdd".into());
    }
    if hw.disks.iter().any(|d| d.name.starts_with("nvme")) {
        t.push("disk:nvme".into());
    }

    if let Some(dmi) = &hw.dmi {
        push_value(&mut t, "dmi:vendor", dmi.sys_vendor.as_deref());
        push_value(&mut t, "dmi:product", dmi.product_name.as_deref());
        push_value(&mut t, "dmi:board", dmi.board_name.as_deref());
    }
    push_value(&mut t, "dt:model", hw.dt_model.as_deref());

    for dev in &hw.pci {
        let (Some(vendor), Some(device)) = (dev.vendor, dev.device) else {
            continue;
        };
        let id = format!("{vendor:#x}:{device:#x}");
        if dev.is_display() || dev.is_network() {
            t.push(format!("pci:{id}"));
        }
        if !dev.is_display() {
            continue;
        }
        match vendor {
            PCI_VENDOR_AMD => {
                t.push(format!("amdgpu:pciid:{id}"));
                if let Some(info) = amd_gpu_info(device) {
                    t.push(format!("amdgpu:family:{}", info.family));
                    t.push(format!("amdgpu:codename:{}", info.codename));
                    t.push(format!("amdgpu:architecture:{}", info.architecture));
                    t.push(format!("amdgpu:gfxversion:{}", info.gfxversion));
                    if info.apu {
                        t.push("amdgpu:APU".into());
                    }
                }
            }
            PCI_VENDOR_INTEL => t.push(format!("intelgpu:pciid:{id}")),
            PCI_VENDOR_NVIDIA => t.push(format!("nvidia:pciid:{id}")),
            _ => {}
        }
    }
    if has_virtio(hw) {
        t.push("virtio:family:VIRTIO".into());
    }

    t.sort();
    t.dedup();
    t
}

fn has_virtio(hw: &Hardware) -> bool {
    hw.virtio_bus_devices > 0 || hw.pci.iter().any(|d| d.vendor == Some(PCI_VENDOR_VIRTIO))
}

/// The most significant characteristic of `hw` (see the module documentation).
pub fn base_name(hw: &Hardware) -> String {
    // Rank each display controller: discrete before integrated, then PCI address order.
    let gpu = hw
        .pci
        .iter()
        .filter(|d| d.is_display())
        .filter_map(|d| {
            let vendor = d.vendor?;
            let device = d.device?;
            let (name, integrated) = match vendor {
                PCI_VENDOR_AMD => match amd_gpu_info(device) {
                    Some(info) => (info.gfxversion.to_string(), info.apu),
                    None => ("amdgpu".to_string(), false),
                },
                PCI_VENDOR_NVIDIA => ("nvidia".to_string(), false),
                // Intel discrete GPUs exist, but most are integrated.
                PCI_VENDOR_INTEL => ("intelgpu".to_string(), true),
                _ => return None,
            };
            Some((integrated, name))
        })
        .min_by_key(|(integrated, _)| *integrated)
        .map(|(_, name)| name);
    let name = gpu
        .or_else(|| has_virtio(hw).then(|| "virtio".to_string()))
        .or_else(|| hw.cpu.arch.clone())
        .unwrap_or_default();
    let name = sanitize_value(&name).to_ascii_lowercase().replace('+', "-");
    if name.is_empty() {
        "unknown".to_string()
    } else {
        name
    }
}

/// The registration body for `hw`.
///
/// `id` is the MAC of the default-route interface (else of the first physical interface with
/// a non-zero MAC, else empty, which the gateway rejects); `ip_address` is
/// [`DefaultRoute::ipv4`]; `local_tty_device` is `tty` without a leading `/dev/`.
pub fn registration(hw: &Hardware, tty: Option<&str>) -> farmgate_wire::DutRegistration {
    let id = hw
        .default_route
        .as_ref()
        .and_then(|r| r.mac.clone())
        .or_else(|| {
            hw.net
                .iter()
                .filter(|n| n.physical)
                .filter_map(|n| n.mac.clone())
                .find(|m| m != "00:00:00:00:00:00")
        })
        .unwrap_or_default();
    farmgate_wire::DutRegistration {
        id,
        base_name: Some(base_name(hw)),
        ip_address: hw
            .default_route
            .as_ref()
            .and_then(|r| r.ipv4)
            .map(|ip| ip.to_string()),
        tags: tags(hw),
        local_tty_device: tty.map(|t| t.strip_prefix("/dev/").unwrap_or(t).to_string()),
    }
}
