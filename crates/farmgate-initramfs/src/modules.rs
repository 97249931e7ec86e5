//! Resolution of kernel modules and their dependencies from a modules directory
//! (`/lib/modules/<version>`), using `modules.dep` and `modules.builtin`.

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::Error;

/// Suffixes a module file may have, longest first.
const SUFFIXES: [&str; 4] = [".ko.xz", ".ko.zst", ".ko.gz", ".ko"];

/// Canonical module name: `-` and `_` are equivalent, we use `_`.
pub fn normalize_name(name: &str) -> String {
    name.replace('-', "_")
}

/// Module name of a module path such as `kernel/drivers/net/virtio_net.ko.xz`
/// (`virtio_net`), or `None` if the file name has no module suffix.
pub fn module_name_of(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    SUFFIXES
        .iter()
        .find_map(|s| file.strip_suffix(s))
        .filter(|n| !n.is_empty())
        .map(normalize_name)
}

/// One module to put into the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModule {
    /// Canonical name (with `_`).
    pub name: String,
    /// Path relative to the modules directory, as in `modules.dep`
    /// (possibly compressed, e.g. `kernel/drivers/net/virtio_net.ko`).
    pub rel_path: String,
}

impl ResolvedModule {
    /// Path relative to the modules directory once stored uncompressed (`….ko`).
    pub fn stored_rel_path(&self) -> String {
        for s in [".ko.xz", ".ko.zst", ".ko.gz"] {
            if let Some(stem) = self.rel_path.strip_suffix(s) {
                return format!("{stem}.ko");
            }
        }
        self.rel_path.clone()
    }
}

/// Result of resolving a set of requested modules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    /// Modules to load, dependencies first.
    pub modules: Vec<ResolvedModule>,
    /// Requested modules that are built into the kernel (skipped).
    pub builtin: Vec<String>,
}

/// Parsed `modules.dep` and `modules.builtin` of one modules directory.
#[derive(Debug, Clone)]
pub struct ModuleIndex {
    dir: PathBuf,
    /// name → (path, dependency paths as listed)
    deps: HashMap<String, (String, Vec<String>)>,
    builtin: BTreeSet<String>,
    /// `modules.alias`: (pattern, module name), in file order.
    aliases: Vec<(String, String)>,
}

impl ModuleIndex {
    /// Reads `<dir>/modules.dep` (required) and `<dir>/modules.builtin` (optional).
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let dep_path = dir.join("modules.dep");
        let text = std::fs::read_to_string(&dep_path).map_err(|e| Error::Io {
            what: format!(
                "reading {} (is this a kernel modules directory?)",
                dep_path.display()
            ),
            source: e,
        })?;
        let mut deps = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((path, rest)) = line.split_once(':') else {
                return Err(Error::ModulesDep {
                    path: dep_path.clone(),
                    line: i + 1,
                    msg: "missing ':'".into(),
                });
            };
            let path = path.trim().to_string();
            let Some(name) = module_name_of(&path) else {
                return Err(Error::ModulesDep {
                    path: dep_path.clone(),
                    line: i + 1,
                    msg: format!("{path:?} is not a .ko file"),
                });
            };
            let list = rest.split_whitespace().map(str::to_string).collect();
            deps.insert(name, (path, list));
        }
        let mut builtin = BTreeSet::new();
        let builtin_path = dir.join("modules.builtin");
        match std::fs::read_to_string(&builtin_path) {
            Ok(t) => {
                builtin.extend(t.lines().filter_map(|l| module_name_of(l.trim())));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::Io {
                    what: format!("reading {}", builtin_path.display()),
                    source: e,
                });
            }
        }
        // `alias <pattern> <module>` lines; optional (a module directory without it only
        // loses the hardware matching at boot).
        let mut aliases = Vec::new();
        if let Ok(t) = std::fs::read_to_string(dir.join("modules.alias")) {
            for line in t.lines() {
                let mut w = line.split_whitespace();
                if let (Some("alias"), Some(pattern), Some(module)) = (w.next(), w.next(), w.next())
                {
                    aliases.push((pattern.to_string(), normalize_name(module)));
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            deps,
            builtin,
            aliases,
        })
    }

    /// The `modules.alias` patterns of the modules in `names`, as `(pattern, module)`.
    pub fn aliases_of(&self, names: &BTreeSet<String>) -> Vec<(String, String)> {
        self.aliases
            .iter()
            .filter(|(_, m)| names.contains(m))
            .cloned()
            .collect()
    }

    /// The direct dependencies of module `name` (names), as `modules.dep` lists them.
    pub fn direct_deps(&self, name: &str) -> Vec<String> {
        self.deps
            .get(&normalize_name(name))
            .map(|(_, d)| d.iter().filter_map(|p| module_name_of(p)).collect())
            .unwrap_or_default()
    }

    /// Whether `name` is built into the kernel.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize_name(name))
    }

    /// Resolves `names` with their dependencies, in load order (each module after all
    /// of its dependencies, each module once). Built-in modules are skipped.
    pub fn resolve<S: AsRef<str>>(&self, names: &[S]) -> Result<Resolution, Error> {
        let mut res = Resolution::default();
        let mut done = BTreeSet::new();
        for n in names {
            let name = normalize_name(n.as_ref());
            if !self.deps.contains_key(&name) && self.is_builtin(&name) {
                if !res.builtin.contains(&name) {
                    res.builtin.push(name);
                }
                continue;
            }
            let mut stack = Vec::new();
            self.visit(&name, &mut stack, &mut done, &mut res.modules)?;
        }
        Ok(res)
    }

    fn visit(
        &self,
        name: &str,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        out: &mut Vec<ResolvedModule>,
    ) -> Result<(), Error> {
        if done.contains(name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) {
            let mut cycle = stack.clone();
            cycle.push(name.to_string());
            return Err(Error::DependencyCycle(cycle.join(" -> ")));
        }
        let Some((path, deps)) = self.deps.get(name) else {
            if self.is_builtin(name) {
                return Ok(());
            }
            return Err(Error::ModuleNotFound {
                name: name.to_string(),
                dir: self.dir.clone(),
            });
        };
        stack.push(name.to_string());
        // modprobe loads the listed dependencies from last to first.
        for dep in deps.iter().rev() {
            let dep_name = module_name_of(dep).ok_or_else(|| Error::ModulesDep {
                path: self.dir.join("modules.dep"),
                line: 0,
                msg: format!("dependency {dep:?} of {name} is not a .ko file"),
            })?;
            self.visit(&dep_name, stack, done, out)?;
        }
        stack.pop();
        done.insert(name.to_string());
        out.push(ResolvedModule {
            name: name.to_string(),
            rel_path: path.clone(),
        });
        Ok(())
    }

    /// Reads a resolved module's file, decompressing `.ko.gz`. Fails with a clear
    /// error for `.ko.xz` / `.ko.zst`, which cannot be decompressed here.
    pub fn read_module(&self, m: &ResolvedModule) -> Result<Vec<u8>, Error> {
        let path = self.dir.join(&m.rel_path);
        for ext in [".ko.xz", ".ko.zst"] {
            if m.rel_path.ends_with(ext) {
                return Err(Error::UnsupportedCompression {
                    module: m.name.clone(),
                    path,
                    ext,
                });
            }
        }
        let raw = std::fs::read(&path).map_err(|e| Error::Io {
            what: format!("reading module {} ({})", m.name, path.display()),
            source: e,
        })?;
        if m.rel_path.ends_with(".ko.gz") {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&raw[..])
                .read_to_end(&mut out)
                .map_err(|e| Error::Io {
                    what: format!("decompressing module {} ({})", m.name, path.display()),
                    source: e,
                })?;
            Ok(out)
        } else {
            Ok(raw)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn synthetic() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let dep = "\
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/misc/dash-mod.ko.gz:
kernel/drivers/misc/xzmod.ko.xz:
kernel/a/cyc_a.ko: kernel/a/cyc_b.ko
kernel/a/cyc_b.ko: kernel/a/cyc_a.ko
";
        std::fs::write(d.join("modules.dep"), dep).unwrap();
        std::fs::write(
            d.join("modules.builtin"),
            "kernel/drivers/net/ethernet/intel/e1000/e1000.ko\nkernel/fs/some-fs.ko\n",
        )
        .unwrap();
        for line in dep.lines() {
            let p = line.split(':').next().unwrap();
            let full = d.join(p);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            if p.ends_with(".gz") {
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                enc.write_all(b"ELF-dash-mod").unwrap();
                std::fs::write(&full, enc.finish().unwrap()).unwrap();
            } else {
                std::fs::write(&full, format!("ELF-{p}")).unwrap();
            }
        }
        dir
    }

    fn names(r: &Resolution) -> Vec<&str> {
        r.modules.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn resolves_dependencies_first_each_once() {
        let dir = synthetic();
        let idx = ModuleIndex::load(dir.path()).unwrap();
        let r = idx
            .resolve(&["virtio-net", "virtio_pci", "virtio_net"])
            .unwrap();
        let n = names(&r);
        assert_eq!(
            n,
            [
                "virtio_ring",
                "virtio",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_pci"
            ]
        );
        // every module comes after all its dependencies
        for m in &r.modules {
            let pos = n.iter().position(|x| *x == m.name).unwrap();
            for d in &idx.deps[&m.name].1 {
                let dn = module_name_of(d).unwrap();
                assert!(n.iter().position(|x| *x == dn).unwrap() < pos);
            }
        }
        assert_eq!(r.modules[4].rel_path, "kernel/drivers/net/virtio_net.ko");
        assert!(r.builtin.is_empty());
    }

    #[test]
    fn builtin_skipped_dash_underscore_equivalent() {
        let dir = synthetic();
        let idx = ModuleIndex::load(dir.path()).unwrap();
        let r = idx.resolve(&["e1000", "some_fs", "dash_mod"]).unwrap();
        assert_eq!(names(&r), ["dash_mod"]);
        assert_eq!(r.builtin, ["e1000", "some_fs"]);
        assert!(idx.is_builtin("some-fs"));
        // .ko.gz is decompressed and stored as .ko
        assert_eq!(idx.read_module(&r.modules[0]).unwrap(), b"ELF-dash-mod");
        assert_eq!(
            r.modules[0].stored_rel_path(),
            "kernel/drivers/misc/dash-mod.ko"
        );
    }

    #[test]
    fn clear_errors() {
        let dir = synthetic();
        let idx = ModuleIndex::load(dir.path()).unwrap();
        let e = idx.resolve(&["nope"]).unwrap_err();
        assert!(matches!(&e, Error::ModuleNotFound { name, .. } if name == "nope"));
        assert!(e.to_string().contains("nope"));
        let e = idx.resolve(&["cyc-a"]).unwrap_err();
        assert!(matches!(e, Error::DependencyCycle(_)), "{e}");
        let r = idx.resolve(&["xzmod"]).unwrap();
        let e = idx.read_module(&r.modules[0]).unwrap_err();
        assert!(e.to_string().contains("xzmod"), "{e}");
        assert!(e.to_string().contains(".ko.xz"), "{e}");

        std::fs::write(dir.path().join("modules.dep"), "a.ko: \nbroken line\n").unwrap();
        let e = ModuleIndex::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        let e = ModuleIndex::load(empty.path()).unwrap_err();
        assert!(e.to_string().contains("modules.dep"), "{e}");
    }

    #[test]
    fn module_names() {
        assert_eq!(
            module_name_of("a/b/virtio-net.ko.zst").unwrap(),
            "virtio_net"
        );
        assert_eq!(module_name_of("x.ko").unwrap(), "x");
        assert_eq!(module_name_of("x.o"), None);
    }
}
