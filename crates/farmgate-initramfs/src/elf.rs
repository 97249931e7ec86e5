//! A small, total reader of the ELF facts the image builder needs: the machine a file
//! is for (`e_machine`), and, for ELF64 little-endian files, the program interpreter
//! (`PT_INTERP`) and the shared libraries named by `DT_NEEDED`.
//!
//! Every read is bounds-checked: garbage or truncated input gives an [`ElfError`],
//! never a panic. Used instead of `ldd` for programs of another architecture (a
//! sysroot), which the build host cannot run.

use std::fmt;

/// `e_machine` of x86-64.
pub const EM_X86_64: u16 = 62;
/// `e_machine` of AArch64 (arm64).
pub const EM_AARCH64: u16 = 183;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;

/// Why a file could not be read as ELF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfError(pub String);

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ElfError {}

fn err<T>(msg: impl Into<String>) -> Result<T, ElfError> {
    Err(ElfError(msg.into()))
}

/// Whether `data` starts with the ELF magic.
pub fn is_elf(data: &[u8]) -> bool {
    data.starts_with(b"\x7fELF")
}

/// The name of an `e_machine` value, for messages.
pub fn machine_name(machine: u16) -> String {
    match machine {
        EM_X86_64 => "x86_64".into(),
        EM_AARCH64 => "aarch64".into(),
        3 => "i386".into(),
        40 => "arm".into(),
        243 => "riscv".into(),
        other => format!("machine {other}"),
    }
}

/// The `e_machine` of an architecture name as Rust spells it
/// (`std::env::consts::ARCH`): `x86_64` or `aarch64`.
pub fn machine_of_arch(arch: &str) -> Option<u16> {
    match arch {
        "x86_64" => Some(EM_X86_64),
        "aarch64" => Some(EM_AARCH64),
        _ => None,
    }
}

/// The `e_machine` of any ELF file (32 or 64 bits, either byte order).
pub fn machine(data: &[u8]) -> Result<u16, ElfError> {
    if !is_elf(data) {
        return err("not an ELF file (no \\x7fELF magic)");
    }
    let Some(b) = data.get(0x12..0x14) else {
        return err("truncated ELF header");
    };
    match data.get(5) {
        Some(1) => Ok(u16::from_le_bytes([b[0], b[1]])),
        Some(2) => Ok(u16::from_be_bytes([b[0], b[1]])),
        _ => err("ELF header has an invalid byte order (EI_DATA)"),
    }
}

/// What the dynamic loader needs to know about a program or library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    /// `e_machine`.
    pub machine: u16,
    /// `e_type` (2: executable, 3: shared object or PIE).
    pub elf_type: u16,
    /// The program interpreter (`PT_INTERP`), e.g. `/lib/ld-linux-aarch64.so.1`.
    pub interp: Option<String>,
    /// `DT_NEEDED` entries in order, e.g. `libc.so.6`.
    pub needed: Vec<String>,
}

fn slice<'a>(data: &'a [u8], off: u64, len: u64, what: &str) -> Result<&'a [u8], ElfError> {
    let start = usize::try_from(off).ok();
    let end = off.checked_add(len).and_then(|e| usize::try_from(e).ok());
    match (start, end) {
        (Some(s), Some(e)) => match data.get(s..e) {
            Some(b) => Ok(b),
            None => err(format!(
                "{what} (offset {off:#x}, {len} bytes) lies beyond the end of the file ({} bytes)",
                data.len()
            )),
        },
        _ => err(format!("{what}: offset {off:#x} + {len} overflows")),
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    match b.get(o..o + 2) {
        Some(s) => u16::from_le_bytes([s[0], s[1]]),
        None => 0,
    }
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    match b.get(o..o + 4) {
        Some(s) => u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        None => 0,
    }
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    match b.get(o..o + 8) {
        Some(s) => {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_le_bytes(a)
        }
        None => 0,
    }
}

/// A NUL-terminated string at the start of `b` (the whole of `b` if no NUL).
fn c_str(b: &[u8], what: &str) -> Result<String, ElfError> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    match std::str::from_utf8(&b[..end]) {
        Ok(s) if !s.is_empty() => Ok(s.to_string()),
        Ok(_) => err(format!("{what} is empty")),
        Err(_) => err(format!("{what} is not UTF-8")),
    }
}

struct Phdr {
    ty: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

/// Reads an ELF64 little-endian file's machine, type, interpreter and `DT_NEEDED`.
/// A static program has neither interpreter nor `DT_NEEDED` entries.
pub fn parse(data: &[u8]) -> Result<ElfInfo, ElfError> {
    if !is_elf(data) {
        return err("not an ELF file (no \\x7fELF magic)");
    }
    if data.len() < 64 {
        return err(format!(
            "truncated ELF header ({} bytes, 64 needed)",
            data.len()
        ));
    }
    if data[4] != 2 {
        return err(format!(
            "not a 64-bit ELF file (EI_CLASS {}); only ELF64 is supported",
            data[4]
        ));
    }
    if data[5] != 1 {
        return err(format!(
            "not a little-endian ELF file (EI_DATA {}); only little-endian is supported",
            data[5]
        ));
    }
    let elf_type = u16_at(data, 0x10);
    let machine = u16_at(data, 0x12);
    let phoff = u64_at(data, 0x20);
    let phentsize = u64::from(u16_at(data, 0x36));
    let phnum = u64::from(u16_at(data, 0x38));
    if phnum > 0 && phentsize < 56 {
        return err(format!(
            "program header entries of {phentsize} bytes (56 needed)"
        ));
    }
    let table = slice(
        data,
        phoff,
        phentsize.saturating_mul(phnum),
        "program header table",
    )?;
    let mut phdrs = Vec::new();
    for i in 0..phnum {
        // Within `table`: i * phentsize + 56 <= table.len(), both below 2^32.
        let Ok(o) = usize::try_from(i * phentsize) else {
            return err("program header table too large");
        };
        phdrs.push(Phdr {
            ty: u32_at(table, o),
            offset: u64_at(table, o + 8),
            vaddr: u64_at(table, o + 16),
            filesz: u64_at(table, o + 32),
        });
    }

    let mut interp = None;
    if let Some(p) = phdrs.iter().find(|p| p.ty == PT_INTERP) {
        let b = slice(data, p.offset, p.filesz, "PT_INTERP")?;
        interp = Some(c_str(b, "the program interpreter (PT_INTERP)")?);
    }

    let mut needed = Vec::new();
    if let Some(dynamic) = phdrs.iter().find(|p| p.ty == PT_DYNAMIC) {
        let d = slice(data, dynamic.offset, dynamic.filesz, "PT_DYNAMIC")?;
        let (mut strtab, mut strsz) = (None, None);
        let mut needed_offsets = Vec::new();
        for e in d.chunks_exact(16) {
            let (tag, val) = (u64_at(e, 0), u64_at(e, 8));
            match tag {
                DT_NULL => break,
                DT_NEEDED => needed_offsets.push(val),
                DT_STRTAB => strtab = Some(val),
                DT_STRSZ => strsz = Some(val),
                _ => {}
            }
        }
        if !needed_offsets.is_empty() {
            let Some(addr) = strtab else {
                return err("DT_NEEDED entries without DT_STRTAB");
            };
            // DT_STRTAB is a virtual address: find the loaded segment holding it.
            let Some(seg) = phdrs
                .iter()
                .find(|p| p.ty == PT_LOAD && addr >= p.vaddr && addr - p.vaddr < p.filesz)
            else {
                return err(format!(
                    "DT_STRTAB address {addr:#x} is in no PT_LOAD segment"
                ));
            };
            let str_off = seg.offset.checked_add(addr - seg.vaddr);
            let Some(str_off) = str_off else {
                return err("DT_STRTAB offset overflows");
            };
            // Without DT_STRSZ, the string table ends with its segment.
            let seg_rest = seg.filesz - (addr - seg.vaddr);
            let size = strsz.map_or(seg_rest, |s| s.min(seg_rest));
            let table = slice(data, str_off, size, "the dynamic string table")?;
            for off in needed_offsets {
                let Some(rest) = usize::try_from(off).ok().and_then(|o| table.get(o..)) else {
                    return err(format!(
                        "DT_NEEDED string offset {off} beyond the string table ({} bytes)",
                        table.len()
                    ));
                };
                let name = c_str(rest, "a DT_NEEDED name")?;
                if !needed.contains(&name) {
                    needed.push(name);
                }
            }
        }
    }
    Ok(ElfInfo {
        machine,
        elf_type,
        interp,
        needed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 LE shared object: one PT_LOAD covering the file, PT_INTERP,
    /// PT_DYNAMIC with two DT_NEEDED.
    pub(crate) fn tiny_elf(machine: u16) -> Vec<u8> {
        let mut f = vec![0u8; 64];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[0x10..0x12].copy_from_slice(&3u16.to_le_bytes());
        f[0x12..0x14].copy_from_slice(&machine.to_le_bytes());
        f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        f[0x38..0x3a].copy_from_slice(&3u16.to_le_bytes());
        let ph_end = 64 + 3 * 56;
        let interp_off = ph_end as u64;
        let interp = b"/lib/ld-test.so.1\0";
        let str_off = interp_off + interp.len() as u64;
        let strs = b"\0libone.so.1\0libtwo.so.2\0";
        let dyn_off = str_off + strs.len() as u64;
        let dyns: [(u64, u64); 5] = [
            (DT_NEEDED, 1),
            (DT_STRTAB, 0x1000 + str_off),
            (DT_NEEDED, 13),
            (DT_STRSZ, strs.len() as u64),
            (DT_NULL, 0),
        ];
        let total = dyn_off + 16 * dyns.len() as u64;
        let mut ph = |ty: u32, off: u64, vaddr: u64, size: u64| {
            let mut p = vec![0u8; 56];
            p[0..4].copy_from_slice(&ty.to_le_bytes());
            p[8..16].copy_from_slice(&off.to_le_bytes());
            p[16..24].copy_from_slice(&vaddr.to_le_bytes());
            p[32..40].copy_from_slice(&size.to_le_bytes());
            p[40..48].copy_from_slice(&size.to_le_bytes());
            f.extend_from_slice(&p);
        };
        ph(PT_LOAD, 0, 0x1000, total);
        ph(
            PT_INTERP,
            interp_off,
            0x1000 + interp_off,
            interp.len() as u64,
        );
        ph(
            PT_DYNAMIC,
            dyn_off,
            0x1000 + dyn_off,
            16 * dyns.len() as u64,
        );
        f.extend_from_slice(interp);
        f.extend_from_slice(strs);
        for (t, v) in dyns {
            f.extend_from_slice(&t.to_le_bytes());
            f.extend_from_slice(&v.to_le_bytes());
        }
        f
    }

    #[test]
    fn reads_a_synthetic_shared_object() {
        let f = tiny_elf(EM_AARCH64);
        let info = parse(&f).unwrap();
        assert_eq!(info.machine, EM_AARCH64);
        assert_eq!(info.elf_type, 3);
        assert_eq!(info.interp.as_deref(), Some("/lib/ld-test.so.1"));
        assert_eq!(info.needed, vec!["libone.so.1", "libtwo.so.2"]);
        assert_eq!(machine(&f).unwrap(), EM_AARCH64);
    }

    #[test]
    fn every_truncation_is_an_error_or_a_subset_never_a_panic() {
        let f = tiny_elf(EM_X86_64);
        for len in 0..f.len() {
            // Truncated files are errors (everything in this file is referenced).
            assert!(parse(&f[..len]).is_err(), "length {len} parsed");
        }
    }

    #[test]
    fn garbage_and_corrupted_headers_do_not_panic() {
        let f = tiny_elf(EM_AARCH64);
        // Flip every byte to a few values: any result is fine, a panic is not.
        let mut errors = 0;
        for i in 0..f.len() {
            for v in [0u8, 0xff, 0x7f, 0x80] {
                let mut g = f.clone();
                g[i] = v;
                if parse(&g).is_err() {
                    errors += 1;
                }
                let _ = machine(&g);
            }
        }
        assert!(errors > 0);
        // Pseudo-random garbage behind a valid magic.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for n in 0..2000 {
            let mut g = b"\x7fELF\x02\x01\x01".to_vec();
            for _ in 0..(n % 300) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                g.push(x as u8);
            }
            let _ = parse(&g);
        }
        assert!(parse(b"#!/bin/sh\n").unwrap_err().0.contains("not an ELF"));
        assert!(machine(b"\x7fELF").is_err());
        let mut be = f.clone();
        be[5] = 2;
        assert!(parse(&be).unwrap_err().0.contains("little-endian"));
        assert_eq!(machine(&be).unwrap(), EM_AARCH64.swap_bytes());
        let mut c32 = f.clone();
        c32[4] = 1;
        assert!(parse(&c32).unwrap_err().0.contains("64-bit"));
    }

    #[test]
    fn huge_offsets_are_errors() {
        let mut f = tiny_elf(EM_AARCH64);
        f[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(&f).unwrap_err().0.contains("overflows"));
        let mut f = tiny_elf(EM_AARCH64);
        f[0x38..0x3a].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(parse(&f).unwrap_err().0.contains("beyond the end"));
    }

    #[test]
    fn arch_names() {
        assert_eq!(machine_of_arch("aarch64"), Some(EM_AARCH64));
        assert_eq!(machine_of_arch("x86_64"), Some(EM_X86_64));
        assert_eq!(machine_of_arch("mips"), None);
        assert_eq!(machine_name(EM_AARCH64), "aarch64");
    }
}
