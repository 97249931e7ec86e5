//! Running a driver's command (shell templates, `qemu-system-x86_64`, `qemu-img`, `ip`):
//! bounded by a timeout, killed if abandoned, failures named with the command and the
//! tail of its standard error.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::PowerError;

/// Runs `cmd` (shown in errors as `shown`) for PDU `pdu` doing `action`; returns its
/// standard output. Non-zero exit, failure to start and timeout are errors.
pub(crate) async fn run_bounded(
    pdu: &str,
    mut cmd: Command,
    shown: &str,
    action: &str,
    timeout: Duration,
) -> Result<String, PowerError> {
    let fail = |reason: String| PowerError::Command {
        pdu: pdu.to_string(),
        action: action.to_string(),
        command: shown.to_string(),
        reason,
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("could not be started: {e}")))?;
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| PowerError::Timeout {
            pdu: pdu.to_string(),
            addr: format!("command {shown:?}"),
            action: action.to_string(),
            timeout,
        })?
        .map_err(|e| fail(format!("could not be waited for: {e}")))?;
    tracing::debug!(pdu, command = shown, status = %output.status, "PDU command");
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr = tail(stderr.trim(), 500);
        return Err(fail(if stderr.is_empty() {
            format!("failed ({})", output.status)
        } else {
            format!("failed ({}): {stderr}", output.status)
        }));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The last `max` bytes of `s`, cut at a character boundary.
fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}
