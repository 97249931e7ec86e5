//! The error type of every PDU operation.

use std::time::Duration;

use thiserror::Error;

/// Why a PDU could not be set up or did not do what it was asked.
///
/// Every message names the PDU; messages about a port name the port, and configuration
/// errors name the driver and the configuration key.
#[derive(Debug, Error)]
pub enum PowerError {
    /// The MaRS DB names a driver this build does not have.
    #[error("PDU {pdu}: unknown driver {driver:?} (known drivers: {known})")]
    UnknownDriver {
        /// PDU name.
        pdu: String,
        /// The driver name as written.
        driver: String,
        /// The drivers this build knows, comma-separated.
        known: String,
    },
    /// A driver configuration key is missing, of the wrong type, or out of range.
    #[error("PDU {pdu} (driver {driver}): config key {key:?}: {reason}")]
    BadConfig {
        /// PDU name.
        pdu: String,
        /// Driver name.
        driver: String,
        /// The offending configuration key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A port id this PDU cannot have.
    #[error("PDU {pdu}: invalid port id {port:?}: {reason}")]
    BadPort {
        /// PDU name.
        pdu: String,
        /// The port id as given.
        port: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A port can only be switched on or off; `Unknown` is not a state one can set.
    #[error("PDU {pdu}: cannot switch port {port} to state {state}: only on and off can be set")]
    BadState {
        /// PDU name.
        pdu: String,
        /// Port id.
        port: String,
        /// The requested state.
        state: farmgate_wire::PortState,
    },
    /// A network operation with the PDU failed.
    #[error("PDU {pdu} at {addr}: cannot {action}: {stage} failed: {source}")]
    Io {
        /// PDU name.
        pdu: String,
        /// The address the PDU was reached at.
        addr: String,
        /// What was being done (e.g. "switch port 3 on").
        action: String,
        /// Which step failed (connect, send, receive).
        stage: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The PDU did not answer in time.
    #[error("PDU {pdu} at {addr}: cannot {action}: no answer within {timeout:?}")]
    Timeout {
        /// PDU name.
        pdu: String,
        /// Where the PDU was reached (address or command).
        addr: String,
        /// What was being done.
        action: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The PDU answered, but with an error or something we do not understand.
    #[error("PDU {pdu} at {addr}: cannot {action}: {reason}")]
    Refused {
        /// PDU name.
        pdu: String,
        /// The address the PDU was reached at.
        addr: String,
        /// What was being done.
        action: String,
        /// The PDU's answer, explained.
        reason: String,
    },
    /// A `shell` driver command could not be run or failed.
    #[error("PDU {pdu}: cannot {action}: command {command:?} {reason}")]
    Command {
        /// PDU name.
        pdu: String,
        /// What was being done.
        action: String,
        /// The command line, after substitution.
        command: String,
        /// How it failed.
        reason: String,
    },
}
