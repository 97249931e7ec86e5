//! The `deployment` section: what the DUT boots, first (`start`) and after (`continue`).

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use farmgate_wire::YamlValue;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

/// What the DUT boots: `start` for the first boot, `continue` for every later one.
#[derive(Debug, Clone, PartialEq)]
pub struct Deployment {
    /// The first boot.
    pub start: DeploymentStep,
    /// Every boot after the first: `start` already merged with the overrides of the
    /// job's `continue` section (`None` when the job has none: `start` is used again).
    pub continue_: Option<DeploymentStep>,
}

impl Deployment {
    /// The step of boot number `index`, counted from 0 (0 is `start`).
    pub fn for_boot(&self, index: u32) -> DeploymentStep {
        match (&self.continue_, index) {
            (Some(cont), i) if i > 0 => cont.clone(),
            _ => self.start.clone(),
        }
    }

    pub(crate) fn from_raw(raw: RawDeployment) -> Deployment {
        let continue_ = raw
            .continue_
            .map(|over| raw.start.clone().merged(over).flatten());
        Deployment {
            start: raw.start.flatten(),
            continue_,
        }
    }
}

/// One boot of the DUT.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeploymentStep {
    /// The kernel (its `cmdline` is in [`DeploymentStep::cmdline`]).
    pub kernel: Option<Artifact>,
    /// The kernel command line; lists are joined with spaces, categories in name order.
    pub cmdline: String,
    /// Initramfs images, in order.
    pub initramfs: Vec<Artifact>,
    /// Device trees, in order.
    pub dtb: Vec<Artifact>,
    /// Files served to the DUT over HTTP and TFTP.
    pub storage: Storage,
    /// The `fastboot` section, kept as written.
    pub fastboot: Option<YamlValue>,
    /// The `dhcp` section, kept as written.
    pub dhcp: Option<YamlValue>,
}

/// A file given to the DUT: by `url`, inline `data` or from an `archive`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Artifact {
    /// Where to download it.
    pub url: Option<String>,
    /// Its content, inline.
    pub data: Option<String>,
    /// The `archive` it comes from, kept as written.
    pub archive: Option<YamlValue>,
    /// Its `format` (compression, ...), kept as written.
    pub format: Option<YamlValue>,
}

/// Files served to the DUT.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Storage {
    /// Served over HTTP.
    pub http: Vec<StorageFile>,
    /// Served over TFTP.
    pub tftp: Vec<StorageFile>,
    /// The `imagestore` section, kept as written.
    pub imagestore: Option<YamlValue>,
    /// The `nbd` section, kept as written.
    pub nbd: Option<YamlValue>,
}

/// One served file: `path` (may be a regex whose groups `\1`... appear in `url`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StorageFile {
    /// Path requested by the DUT.
    pub path: String,
    /// Its content.
    pub artifact: Artifact,
}

// ----- raw shapes ------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(crate) struct RawDeployment {
    start: RawStep,
    #[serde(rename = "continue", default)]
    continue_: Option<RawStep>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
struct RawStepFields {
    #[serde(default)]
    kernel: Option<RawKernel>,
    #[serde(default)]
    cmdline: Option<Cmdline>,
    #[serde(default)]
    initramfs: Option<Listing<Artifact>>,
    #[serde(default)]
    dtb: Option<Listing<Artifact>>,
    #[serde(default)]
    storage: Option<RawStorage>,
    #[serde(default)]
    fastboot: Option<YamlValue>,
    #[serde(default)]
    dhcp: Option<YamlValue>,
}

/// A step as written; a step-level `cmdline` is moved into `kernel`.
#[derive(Clone, Default)]
struct RawStep {
    kernel: Option<RawKernel>,
    initramfs: Option<Listing<Artifact>>,
    dtb: Option<Listing<Artifact>>,
    storage: Option<RawStorage>,
    fastboot: Option<YamlValue>,
    dhcp: Option<YamlValue>,
}

impl<'de> Deserialize<'de> for RawStep {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let f = RawStepFields::deserialize(d)?;
        let mut kernel = f.kernel;
        if let Some(cmdline) = f.cmdline {
            let k = kernel.get_or_insert_with(RawKernel::default);
            if k.cmdline.is_some() {
                return Err(de::Error::custom(
                    "cmdline and kernel.cmdline are both set; keep only kernel.cmdline",
                ));
            }
            k.cmdline = Some(cmdline);
        }
        Ok(RawStep {
            kernel,
            initramfs: f.initramfs,
            dtb: f.dtb,
            storage: f.storage,
            fastboot: f.fastboot,
            dhcp: f.dhcp,
        })
    }
}

impl RawStep {
    fn merged(self, over: RawStep) -> RawStep {
        RawStep {
            kernel: match (self.kernel, over.kernel) {
                (Some(a), Some(b)) => Some(a.merged(b)),
                (a, b) => b.or(a),
            },
            initramfs: Listing::merge(self.initramfs, over.initramfs),
            dtb: Listing::merge(self.dtb, over.dtb),
            storage: match (self.storage, over.storage) {
                (Some(a), Some(b)) => Some(RawStorage {
                    http: Listing::merge(a.http, b.http),
                    tftp: Listing::merge(a.tftp, b.tftp),
                    imagestore: b.imagestore.or(a.imagestore),
                    nbd: b.nbd.or(a.nbd),
                }),
                (a, b) => b.or(a),
            },
            fastboot: over.fastboot.or(self.fastboot),
            dhcp: over.dhcp.or(self.dhcp),
        }
    }

    fn flatten(self) -> DeploymentStep {
        let (kernel, cmdline) = match self.kernel {
            Some(k) => {
                let cmdline = k.cmdline.map(Cmdline::flatten).unwrap_or_default();
                let art = Artifact {
                    url: k.url,
                    data: k.data,
                    archive: k.archive,
                    format: k.format,
                };
                (Some(art), cmdline)
            }
            None => (None, String::new()),
        };
        let storage = self.storage.unwrap_or_default();
        DeploymentStep {
            kernel,
            cmdline,
            initramfs: Listing::flatten(self.initramfs),
            dtb: Listing::flatten(self.dtb),
            storage: Storage {
                http: Listing::flatten(storage.http),
                tftp: Listing::flatten(storage.tftp),
                imagestore: storage.imagestore,
                nbd: storage.nbd,
            },
            fastboot: self.fastboot,
            dhcp: self.dhcp,
        }
    }
}

#[derive(Deserialize, Clone, Default)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
struct RawKernel {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    archive: Option<YamlValue>,
    #[serde(default)]
    format: Option<YamlValue>,
    #[serde(default)]
    cmdline: Option<Cmdline>,
}

impl RawKernel {
    fn has_source(&self) -> bool {
        self.url.is_some() || self.data.is_some() || self.archive.is_some()
    }

    fn merged(self, over: RawKernel) -> RawKernel {
        let (url, data, archive) = if over.has_source() {
            (over.url, over.data, over.archive)
        } else {
            (self.url, self.data, self.archive)
        };
        RawKernel {
            url,
            data,
            archive,
            format: over.format.or(self.format),
            cmdline: match (self.cmdline, over.cmdline) {
                (Some(Cmdline::Categories(mut a)), Some(Cmdline::Categories(b))) => {
                    a.extend(b);
                    Some(Cmdline::Categories(a))
                }
                (a, b) => b.or(a),
            },
        }
    }
}

#[derive(Deserialize, Clone, Default)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
struct RawStorage {
    #[serde(default)]
    http: Option<Listing<StorageFile>>,
    #[serde(default)]
    tftp: Option<Listing<StorageFile>>,
    #[serde(default)]
    imagestore: Option<YamlValue>,
    #[serde(default)]
    nbd: Option<YamlValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
struct RawArtifact {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    archive: Option<YamlValue>,
    #[serde(default)]
    format: Option<YamlValue>,
}

impl RawArtifact {
    fn check<E: de::Error>(self, what: &str) -> Result<Artifact, E> {
        let sources = [
            self.url.is_some(),
            self.data.is_some(),
            self.archive.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            return Err(E::custom(format!(
                "{what}: set exactly one of url, data or archive"
            )));
        }
        Ok(Artifact {
            url: self.url,
            data: self.data,
            archive: self.archive,
            format: self.format,
        })
    }
}

impl<'de> Deserialize<'de> for Artifact {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        RawArtifact::deserialize(d)?.check("artifact")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
struct RawStorageFile {
    path: String,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    archive: Option<YamlValue>,
    #[serde(default)]
    format: Option<YamlValue>,
}

impl<'de> Deserialize<'de> for StorageFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawStorageFile::deserialize(d)?;
        let what = format!("storage file {:?}", raw.path);
        let artifact = RawArtifact {
            url: raw.url,
            data: raw.data,
            archive: raw.archive,
            format: raw.format,
        }
        .check(&what)?;
        Ok(StorageFile {
            path: raw.path,
            artifact,
        })
    }
}

// ----- list or named categories --------------------------------------------------------

/// A plain list, or a dict of named categories (each one item or a list), flattened in
/// name order.
#[derive(Clone)]
enum Listing<T> {
    List(Vec<T>),
    Categories(BTreeMap<String, Vec<T>>),
}

impl<T> Listing<T> {
    fn merge(base: Option<Listing<T>>, over: Option<Listing<T>>) -> Option<Listing<T>> {
        match (base, over) {
            (Some(Listing::Categories(mut a)), Some(Listing::Categories(b))) => {
                a.extend(b);
                Some(Listing::Categories(a))
            }
            (a, b) => b.or(a),
        }
    }

    fn flatten(l: Option<Listing<T>>) -> Vec<T> {
        match l {
            None => Vec::new(),
            Some(Listing::List(v)) => v,
            Some(Listing::Categories(m)) => m.into_values().flatten().collect(),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Listing<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Listing<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list, or a dict of named categories")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Listing::List(Vec::new()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some(item) = seq.next_element()? {
                    v.push(item);
                }
                Ok(Listing::List(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut m = BTreeMap::new();
                while let Some((name, items)) = map.next_entry::<String, OneOrMany<T>>()? {
                    m.insert(name, items.0);
                }
                Ok(Listing::Categories(m))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// One category's value: one item (a dict) or a list of them.
struct OneOrMany<T>(Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an item or a list of items")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(OneOrMany(Vec::new()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some(item) = seq.next_element()? {
                    v.push(item);
                }
                Ok(OneOrMany(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|t| OneOrMany(vec![t]))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

// ----- kernel command line ---------------------------------------------------------------

/// A command line: a string, a list of words, or a dict of named categories.
#[derive(Clone)]
enum Cmdline {
    Text(String),
    Categories(BTreeMap<String, String>),
}

impl Cmdline {
    fn flatten(self) -> String {
        match self {
            Cmdline::Text(s) => s,
            Cmdline::Categories(m) => join(m.into_values()),
        }
    }
}

fn join(parts: impl IntoIterator<Item = String>) -> String {
    parts
        .into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A string, number or boolean written as the text of a command line word; also a
/// list of those (joined with spaces) or nothing.
struct Words(String);

struct WordsVisitor {
    allow_list: bool,
}

impl<'de> Visitor<'de> for WordsVisitor {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.allow_list {
            f.write_str("a string or a list of strings")
        } else {
            f.write_str("a string")
        }
    }
    fn visit_unit<E: de::Error>(self) -> Result<String, E> {
        Ok(String::new())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<String, A::Error> {
        if !self.allow_list {
            return Err(de::Error::invalid_type(de::Unexpected::Seq, &self));
        }
        let mut words = Vec::new();
        while let Some(Word(w)) = seq.next_element()? {
            words.push(w);
        }
        Ok(join(words))
    }
}

struct Word(String);

impl<'de> Deserialize<'de> for Word {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(WordsVisitor { allow_list: false })
            .map(Word)
    }
}

impl<'de> Deserialize<'de> for Words {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(WordsVisitor { allow_list: true })
            .map(Words)
    }
}

impl<'de> Deserialize<'de> for Cmdline {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Cmdline;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, a list of strings or a dict of named categories")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Cmdline, E> {
                Ok(Cmdline::Text(String::new()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Cmdline, E> {
                Ok(Cmdline::Text(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Cmdline, E> {
                Ok(Cmdline::Text(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Cmdline, E> {
                Ok(Cmdline::Text(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Cmdline, E> {
                Ok(Cmdline::Text(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Cmdline, E> {
                Ok(Cmdline::Text(v.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Cmdline, A::Error> {
                WordsVisitor { allow_list: true }
                    .visit_seq(seq)
                    .map(Cmdline::Text)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Cmdline, A::Error> {
                let mut m = BTreeMap::new();
                while let Some((name, Words(w))) = map.next_entry::<String, Words>()? {
                    m.insert(name, w);
                }
                Ok(Cmdline::Categories(m))
            }
        }
        d.deserialize_any(V)
    }
}
