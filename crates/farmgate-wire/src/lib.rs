//! Wire types shared by the farmgate daemon, its job runners and its clients.
//!
//! Everything that crosses a process boundary lives here: the records of the MaRS DB
//! file (seed 001 format), the REST bodies under `/api/v1`, the job events streamed to
//! `farmctl`, the DUT states and the job statuses with their exit codes. Keeping them in
//! one crate means the daemon and the client cannot drift apart.
//!
//! The gateway and the agent on the DUT also share the network protocols' codecs: [`ntp`]
//! (the SNTP packet and timestamps) and [`dhcp`] (DHCPv4 constants and the options walk).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

pub use serde_yaml_ng::Value as YamlValue;

pub mod dhcp;
pub mod ntp;

/// The final status of a job, as CI-tron reports it.
///
/// `farmctl` exits with [`JobStatus::exit_code`]; the values are CI-tron's (2022) so
/// scripts written for `executorctl` keep working.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    /// `job_success` matched, `job_warn` did not.
    Pass,
    /// `job_success` and `job_warn` both matched.
    Warn,
    /// The session ended and the job defines no `job_success` pattern.
    Complete,
    /// The session ended without `job_success` matching.
    Fail,
    /// The session did not end properly: timeout without retries left, cancel, DUT unfit, ...
    Incomplete,
    /// The status could not be determined.
    Unknown,
    /// The job never reached the DUT: bad job description, artifacts, PDU failure, ...
    SetupFail,
}

impl JobStatus {
    /// Every status, in exit-code order.
    pub const ALL: [JobStatus; 7] = [
        JobStatus::Pass,
        JobStatus::Warn,
        JobStatus::Complete,
        JobStatus::Fail,
        JobStatus::Incomplete,
        JobStatus::Unknown,
        JobStatus::SetupFail,
    ];

    /// The process exit code `farmctl` (and the job runner process) uses for this status.
    pub fn exit_code(self) -> i32 {
        match self {
            JobStatus::Pass => 0,
            JobStatus::Warn => 1,
            JobStatus::Complete => 2,
            JobStatus::Fail => 3,
            JobStatus::Incomplete => 4,
            JobStatus::Unknown => 5,
            JobStatus::SetupFail => 6,
        }
    }

    /// The status whose exit code is `code`, if any.
    pub fn from_exit_code(code: i32) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|s| s.exit_code() == code)
    }

    /// The upper-case name used on the wire and in logs (`PASS`, `SETUP_FAIL`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pass => "PASS",
            JobStatus::Warn => "WARN",
            JobStatus::Complete => "COMPLETE",
            JobStatus::Fail => "FAIL",
            JobStatus::Incomplete => "INCOMPLETE",
            JobStatus::Unknown => "UNKNOWN",
            JobStatus::SetupFail => "SETUP_FAIL",
        }
    }

    /// True for the statuses Sergeant Hartman counts as a successful boot-loop round.
    pub fn is_success(self) -> bool {
        matches!(
            self,
            JobStatus::Pass | JobStatus::Warn | JobStatus::Complete
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown job status {s:?}"))
    }
}

/// The DUT state machine of seed 001, exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DutState {
    /// Under maintenance, accepts no job.
    Retired,
    /// Checking that the machine still matches the database (one boot-loop round).
    QuickCheck,
    /// Being tested for boot reliability (Sergeant Hartman's boot loop).
    Training,
    /// Available, powered down, waiting for a job.
    Idle,
    /// Chosen for a job, the runner is being started.
    Queued,
    /// Running a job.
    Running,
}

impl DutState {
    /// The upper-case name used on the wire (`QUICK_CHECK`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DutState::Retired => "RETIRED",
            DutState::QuickCheck => "QUICK_CHECK",
            DutState::Training => "TRAINING",
            DutState::Idle => "IDLE",
            DutState::Queued => "QUEUED",
            DutState::Running => "RUNNING",
        }
    }
}

impl fmt::Display for DutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DutState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            DutState::Retired,
            DutState::QuickCheck,
            DutState::Training,
            DutState::Idle,
            DutState::Queued,
            DutState::Running,
        ]
        .into_iter()
        .find(|st| st.as_str().eq_ignore_ascii_case(s))
        .ok_or_else(|| format!("unknown DUT state {s:?}"))
    }
}

/// Power state of a PDU port, as read back from the PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortState {
    /// Powered.
    On,
    /// Not powered.
    Off,
    /// The PDU did not say (unreachable, or a driver without read-back).
    Unknown,
}

impl fmt::Display for PortState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PortState::On => "on",
            PortState::Off => "off",
            PortState::Unknown => "unknown",
        })
    }
}

/// Port ids are integers in most MaRS files and strings in some; both are kept as text.
pub fn deserialize_port_id<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum IntOrString {
        Int(i64),
        Str(String),
    }
    Ok(match IntOrString::deserialize(d)? {
        IntOrString::Int(i) => i.to_string(),
        IntOrString::Str(s) => s,
    })
}

fn deserialize_opt_port_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum IntOrString {
        Int(i64),
        Str(String),
    }
    Ok(Option::<IntOrString>::deserialize(d)?.map(|v| match v {
        IntOrString::Int(i) => i.to_string(),
        IntOrString::Str(s) => s,
    }))
}

fn deserialize_port_ids<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum IntOrString {
        Int(i64),
        Str(String),
    }
    Ok(Option::<Vec<IntOrString>>::deserialize(d)?
        .unwrap_or_default()
        .into_iter()
        .map(|v| match v {
            IntOrString::Int(i) => i.to_string(),
            IntOrString::Str(s) => s,
        })
        .collect())
}

/// The whole MaRS DB file (seed 001): PDUs, DUTs and the GitLab section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarsDb {
    /// Power delivery units, by name (MANUAL).
    #[serde(default)]
    pub pdus: BTreeMap<String, PduRecord>,
    /// Test machines, by machine id (their MAC address).
    #[serde(default)]
    pub duts: BTreeMap<String, DutRecord>,
    /// GitLab exposure settings; kept as written, not interpreted yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gitlab: Option<YamlValue>,
}

/// One PDU of the MaRS DB file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PduRecord {
    /// Driver name (`vpdu`, `dummy`, `apc_masterswitch`, ...).
    pub driver: String,
    /// Driver configuration, driver-dependent (`hostname`, ...).
    #[serde(default)]
    pub config: BTreeMap<String, YamlValue>,
    /// Ports nobody may switch or use for a new DUT.
    #[serde(
        default,
        deserialize_with = "deserialize_port_ids",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub reserved_port_ids: Vec<String>,
    /// Admins' labels of ports (farmgate's addition; a port without one is labelled by
    /// the machine on it).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_labels: BTreeMap<String, String>,
}

/// Default `pdu_off_delay` of seed 001: 30 s is enough for most power supplies.
pub const DEFAULT_PDU_OFF_DELAY: f64 = 30.0;

/// The longest `pdu_off_delay` accepted: one day.
pub const MAX_PDU_OFF_DELAY: f64 = 86_400.0;

fn default_pdu_off_delay() -> f64 {
    DEFAULT_PDU_OFF_DELAY
}

/// One DUT of the MaRS DB file (seed 001 fields).
///
/// Keys this version does not know are kept in `extra` and written back unchanged, so a
/// file from a newer CI-tron loses nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DutRecord {
    /// Most significant characteristic of the machine; basis of its full name.
    #[serde(default)]
    pub base_name: Option<String>,
    /// IP address of the machine.
    #[serde(default)]
    pub ip_address: Option<String>,
    /// Tags generated from the hardware.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Tags that cannot be generated (MANUAL).
    #[serde(default)]
    pub manual_tags: Vec<String>,
    /// The machine's serial port towards the gateway (`ttyUSB0`), DUT side.
    #[serde(default)]
    pub local_tty_device: Option<String>,
    /// GitLab runners of this machine; kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gitlab: Option<YamlValue>,
    /// Name of the PDU powering this machine (MANUAL/REST).
    #[serde(default)]
    pub pdu: Option<String>,
    /// Port of that PDU (MANUAL/REST).
    #[serde(default, deserialize_with = "deserialize_opt_port_id")]
    pub pdu_port_id: Option<String>,
    /// Seconds the port stays off when power-cycling this machine (REST).
    #[serde(default = "default_pdu_off_delay")]
    pub pdu_off_delay: f64,
    /// Trained and usable by users (AUTO/REST).
    #[serde(default)]
    pub ready_for_service: bool,
    /// Retired by an admin: takes no job.
    #[serde(default)]
    pub is_retired: bool,
    /// When the machine was first seen (AUTO).
    #[serde(default)]
    pub first_seen: Option<String>,
    /// Note for farm admins (MANUAL/REST).
    #[serde(default)]
    pub comment: Option<String>,
    /// Keys this version does not know, written back as they were.
    #[serde(flatten)]
    pub extra: BTreeMap<String, YamlValue>,
}

impl Default for DutRecord {
    fn default() -> Self {
        DutRecord {
            base_name: None,
            ip_address: None,
            tags: Vec::new(),
            manual_tags: Vec::new(),
            local_tty_device: None,
            gitlab: None,
            pdu: None,
            pdu_port_id: None,
            pdu_off_delay: DEFAULT_PDU_OFF_DELAY,
            ready_for_service: false,
            is_retired: false,
            first_seen: None,
            comment: None,
            extra: BTreeMap::new(),
        }
    }
}

impl DutRecord {
    /// Generated and manual tags together: what a job's `target.tags` is matched against.
    pub fn all_tags(&self) -> impl Iterator<Item = &str> {
        self.tags
            .iter()
            .chain(self.manual_tags.iter())
            .map(String::as_str)
    }

    /// True when every tag in `wanted` is one of this DUT's tags.
    pub fn has_all_tags(&self, wanted: &[String]) -> bool {
        wanted.iter().all(|w| self.all_tags().any(|t| t == w))
    }
}

/// A DUT as the REST API shows it: its MaRS record plus its runtime state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DutView {
    /// Machine id (MAC address).
    pub id: String,
    /// `FARM_NAME-base_name-N`, or the id when no base name is known.
    pub full_name: String,
    /// Where the DUT is in the state machine.
    pub state: DutState,
    /// Job currently running or queued on it.
    pub current_job: Option<String>,
    /// Sergeant Hartman's progress while training: rounds done and passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingProgress>,
    /// When the DUT entered its state (RFC 3339), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_since: Option<String>,
    /// Why the DUT cannot be used right now although its state would allow it (its
    /// PDU does not answer); it gets no job until this clears.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
    /// The MaRS record.
    #[serde(flatten)]
    pub record: DutRecord,
}

/// Boot-loop progress of a DUT in TRAINING or QUICK_CHECK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainingProgress {
    /// Rounds finished.
    pub rounds_done: u32,
    /// Rounds that passed.
    pub rounds_passed: u32,
    /// Rounds asked for (`SERGENT_HARTMAN_BOOT_COUNT`).
    pub rounds_total: u32,
    /// Passes needed (`SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT`).
    pub rounds_needed: u32,
}

/// `GET /api/v1/duts`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DutList {
    /// DUTs by machine id.
    pub duts: BTreeMap<String, DutView>,
}

/// Body of `PATCH /api/v1/dut/<id>`: the editable fields of seed 001.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DutPatch {
    /// Note for farm admins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Retire (true) or activate (false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_retired: Option<bool>,
    /// Seconds needed for the machine to be fully off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pdu_off_delay: Option<f64>,
    /// Mark trained (true) or send back to training (false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_for_service: Option<bool>,
    /// Replace the manual tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manual_tags: Option<Vec<String>>,
    /// Move the DUT to another PDU (farmgate extension of seed 001's REST-editable fields).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pdu: Option<String>,
    /// Move the DUT to another PDU port.
    #[serde(
        default,
        deserialize_with = "deserialize_opt_port_id",
        skip_serializing_if = "Option::is_none"
    )]
    pub pdu_port_id: Option<String>,
}

/// Body of `POST /api/v1/dut/` (registration): the machine-generated fields.
///
/// Manual fields (`pdu`, `pdu_port_id`) are not accepted here, per seed 001; a discovery
/// in progress provides them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DutRegistration {
    /// Machine id (MAC address of the default-route NIC).
    pub id: String,
    /// Most significant characteristic of the machine.
    #[serde(default)]
    pub base_name: Option<String>,
    /// IP address of the machine.
    #[serde(default)]
    pub ip_address: Option<String>,
    /// Tags generated from the hardware.
    #[serde(default)]
    pub tags: Vec<String>,
    /// DUT-side serial port that talked to SALAD.
    #[serde(default)]
    pub local_tty_device: Option<String>,
}

/// Body of `POST /api/v1/dut/discover`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoverRequest {
    /// PDU of the new machine.
    pub pdu: String,
    /// Port of the new machine.
    #[serde(deserialize_with = "deserialize_port_id")]
    pub port_id: String,
    /// Seconds to wait for the machine to register (150 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
}

/// `GET /api/v1/dut/discover`: the discovery in progress, if any.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiscoverState {
    /// PDU being discovered.
    pub pdu: Option<String>,
    /// Port being discovered.
    pub port_id: Option<String>,
    /// When the discovery started (RFC 3339).
    pub start_date: Option<String>,
    /// When it gives up (RFC 3339).
    pub deadline: Option<String>,
}

/// One PDU port as the REST API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortView {
    /// Port id.
    pub port_id: String,
    /// Label: the full name of the DUT on that port, if any.
    pub label: Option<String>,
    /// State as last read back from the PDU.
    pub state: PortState,
    /// Reserved ports cannot be switched through the API.
    pub reserved: bool,
    /// Minimum off time in seconds (the DUT's `pdu_off_delay`).
    pub min_off_time: f64,
    /// When the port was last switched off (RFC 3339).
    pub last_shutdown: Option<String>,
    /// When the gateway last saw the port's state change (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_change: Option<String>,
    /// Power, energy, current and voltage, when the PDU measures them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measure: Option<PortMeasure>,
    /// CI-tron's name for the power in watts (the same as `measure.power_w`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instant_power: Option<f64>,
    /// CI-tron's name for the energy counter, in watt-hours (`measure.energy_wh`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy: Option<f64>,
    /// When the port's state was last read from the PDU (RFC 3339; CI-tron's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_polled: Option<String>,
}

/// What a PDU measured on one port. Each field is `None` when the device does not
/// report it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PortMeasure {
    /// Active power in watts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_w: Option<f64>,
    /// Energy used since the device's counter was reset, in watt-hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_wh: Option<f64>,
    /// Current in amperes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_a: Option<f64>,
    /// Voltage in volts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voltage_v: Option<f64>,
}

/// One configuration key of a PDU driver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PduConfigKey {
    /// The key, as written under the PDU's `config:`.
    pub key: String,
    /// What it means and its default.
    pub description: String,
}

/// A PDU driver of this build (`GET /api/v1/pdu-drivers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PduDriverInfo {
    /// The driver name, as written in the MaRS DB.
    pub name: String,
    /// What it drives.
    pub description: String,
    /// Its configuration keys.
    pub config: Vec<PduConfigKey>,
}

/// Body of `POST /api/v1/pdus`: a PDU to add to the MaRS DB.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PduRegistration {
    /// Its name.
    pub name: String,
    /// Driver name.
    pub driver: String,
    /// Driver configuration.
    #[serde(default)]
    pub config: BTreeMap<String, YamlValue>,
    /// Ports nobody may switch or use for a new DUT.
    #[serde(default, deserialize_with = "deserialize_port_ids")]
    pub reserved_port_ids: Vec<String>,
}

/// What happened on one PDU since the gateway started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PduCounters {
    /// Switch commands that were read back as done.
    pub switches_ok: u64,
    /// Switch commands that failed (after their retries).
    pub switches_failed: u64,
    /// Reads (ports, states, measures) that succeeded.
    pub reads_ok: u64,
    /// Reads that failed (after their retries).
    pub reads_failed: u64,
    /// Operations tried again after a failure.
    pub retries: u64,
    /// Times the driver was created anew after a failure.
    pub reinits: u64,
}

/// One PDU as the REST API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PduView {
    /// PDU name.
    pub name: String,
    /// Driver name.
    pub driver: String,
    /// Ports by id.
    pub ports: BTreeMap<String, PortView>,
    /// Why the ports could not be read, when the PDU did not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Set when the PDU does not answer (several polls in a row failed): why, since
    /// when. Its DUTs get no job until it answers again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down: Option<String>,
    /// Last time the PDU answered a poll (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ok: Option<String>,
    /// What happened on this PDU since the gateway started.
    #[serde(default)]
    pub counters: PduCounters,
}

/// `GET /api/v1/pdus`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PduList {
    /// PDUs by name.
    pub pdus: BTreeMap<String, PduView>,
}

/// Body of `PATCH /api/v1/pdu/<name>/port/<id>`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortPatch {
    /// Switch the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<PortState>,
    /// Reserve or release the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved: Option<bool>,
    /// Minimum off time in seconds for the DUT on this port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_off_time: Option<f64>,
    /// The port's label (empty: back to the name of the machine on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// `GET /api/v1/full-state`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FullState {
    /// All PDUs.
    pub pdus: BTreeMap<String, PduView>,
    /// All DUTs.
    pub duts: BTreeMap<String, DutView>,
    /// Discovery in progress.
    pub discover: DiscoverState,
}

/// The `metadata` part of a `POST /api/v1/jobs` submission (CI-tron's fields, plus `wait`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobMetadata {
    /// Metadata version (1).
    #[serde(default = "one")]
    pub version: u32,
    /// The caller's own job id, if it has one (`-j`).
    #[serde(default)]
    pub job_id: Option<String>,
    /// Target override from `-t`/`-i`; replaces the job's `target` when set.
    #[serde(default)]
    pub target: Option<JobTarget>,
    /// Queue the job when every matching DUT is busy (`-w`), instead of answering 409.
    #[serde(default)]
    pub wait: bool,
    /// Variables forwarded by the client, visible to the job template as `environ`.
    #[serde(default)]
    pub environ: BTreeMap<String, String>,
    /// CI-tron clients send a callback host/port; farmgate streams over HTTP instead and
    /// accepts and ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<serde_json::Value>,
    /// MinIO credentials and groups of CI-tron clients; accepted, unused until the object
    /// store lands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minio: Option<serde_json::Value>,
}

fn one() -> u32 {
    1
}

/// Which machine a job wants.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobTarget {
    /// One machine, by id.
    #[serde(default)]
    pub id: Option<String>,
    /// Tags the machine must all have; empty means any machine.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Answer to an accepted `POST /api/v1/jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobAccepted {
    /// The job's id, used by every other job endpoint.
    pub job_id: String,
    /// DUT chosen, when one was free at once.
    pub dut_id: Option<String>,
    /// Where the job is: `QUEUED` while waiting for a DUT, `RUNNING` once dispatched.
    pub state: JobState,
}

/// Life cycle of a job in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Waiting for a DUT.
    Queued,
    /// A DUT is assigned and its runner process is starting or running.
    Running,
    /// Over; see the status.
    Finished,
}

impl JobState {
    /// The upper-case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "QUEUED",
            JobState::Running => "RUNNING",
            JobState::Finished => "FINISHED",
        }
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [JobState::Queued, JobState::Running, JobState::Finished]
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown job state {s:?}"))
    }
}

/// What kind of job: a user's, or one of Sergeant Hartman's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Submitted by a user.
    User,
    /// Training boot-loop round.
    Training,
    /// Quick check after start-up or re-activation.
    QuickCheck,
}

impl JobKind {
    /// The name used on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::User => "user",
            JobKind::Training => "training",
            JobKind::QuickCheck => "quick_check",
        }
    }
}

impl FromStr for JobKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [JobKind::User, JobKind::Training, JobKind::QuickCheck]
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown job kind {s:?}"))
    }
}

/// `GET /api/v1/job/<id>`: a job's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    /// Job id.
    pub job_id: String,
    /// User job, training round or quick check.
    pub kind: JobKind,
    /// Queue state.
    pub state: JobState,
    /// Final status, once finished.
    pub status: Option<JobStatus>,
    /// Why the job ended as it did, in words.
    pub reason: Option<String>,
    /// DUT running it.
    pub dut_id: Option<String>,
    /// Wanted machine.
    pub target: JobTarget,
    /// Submission time (RFC 3339).
    pub submitted_at: String,
    /// Start of the runner (RFC 3339).
    pub started_at: Option<String>,
    /// End (RFC 3339).
    pub finished_at: Option<String>,
}

/// `msg_type` of a job event, CI-tron's three kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Executor messages: phases, timers, retries (`payload` is a line of text).
    Ctrl,
    /// Console bytes of the DUT, one line per event (`payload` is the line, lossy UTF-8).
    JobIo,
    /// The job is over; `payload` is a JSON object `{status, reason}`.
    SessionEnd,
}

impl EventKind {
    /// The name used on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Ctrl => "ctrl",
            EventKind::JobIo => "job_io",
            EventKind::SessionEnd => "session_end",
        }
    }
}

impl FromStr for EventKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [EventKind::Ctrl, EventKind::JobIo, EventKind::SessionEnd]
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown event kind {s:?}"))
    }
}

/// One event of a job, as streamed by `GET /api/v1/job/<id>/events` (one JSON per line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    /// Position in the job's event log, from 1; resume with `?after=<seq>`.
    pub seq: i64,
    /// When it happened (RFC 3339, UTC, with milliseconds).
    pub date: String,
    /// What it is.
    pub msg_type: EventKind,
    /// Its text (see [`EventKind`]).
    pub payload: String,
}

/// Payload of the `session_end` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionEnd {
    /// Final status.
    pub status: JobStatus,
    /// Why, in words.
    pub reason: String,
}

/// Error body of every non-2xx answer of the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// What went wrong, in words a user can act on.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_round_trip_and_match_ci_tron() {
        let codes: Vec<i32> = JobStatus::ALL.iter().map(|s| s.exit_code()).collect();
        assert_eq!(codes, vec![0, 1, 2, 3, 4, 5, 6]);
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::from_exit_code(s.exit_code()), Some(s));
            assert_eq!(s.as_str().parse::<JobStatus>(), Ok(s));
        }
        assert_eq!(JobStatus::from_exit_code(7), None);
    }

    #[test]
    fn seed_001_dut_record_parses_and_keeps_unknown_keys() {
        let yaml = r#"
pdus:
  VPDU:
    driver: vpdu
    config:
      hostname: localhost:9191
    reserved_port_ids: [3, "7"]
duts:
  de:ad:be:ef:ca:fe:
    base_name: gfx9
    ip_address: 192.168.0.42
    tags: [amdgpu:APU]
    manual_tags: [freesync_display]
    local_tty_device: ttyUSB0
    pdu: VPDU
    pdu_port_id: 1
    pdu_off_delay: 30
    ready_for_service: true
    is_retired: false
    first_seen: 2021-12-22 16:57:08.146275
    comment: null
    firmware_boot_time: 12.5
"#;
        let db: MarsDb = serde_yaml_ng::from_str(yaml).expect("parses");
        assert_eq!(db.pdus["VPDU"].reserved_port_ids, vec!["3", "7"]);
        let dut = &db.duts["de:ad:be:ef:ca:fe"];
        assert_eq!(dut.pdu_port_id.as_deref(), Some("1"));
        assert!(dut.has_all_tags(&["amdgpu:APU".into(), "freesync_display".into()]));
        assert!(!dut.has_all_tags(&["nvidia".into()]));
        assert!(dut.extra.contains_key("firmware_boot_time"));
        let back = serde_yaml_ng::to_string(&db).expect("serialises");
        assert!(back.contains("firmware_boot_time"));
    }
}
