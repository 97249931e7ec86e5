//! Parsing what a simulated machine is given: the iPXE boot script from the gateway, and
//! the `farmsim.script` of the kernel command line that tells the simulated OS what to do.

use std::time::Duration;

/// What an iPXE script asks to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSpec {
    /// The kernel URL.
    pub kernel: String,
    /// The kernel command line (possibly empty).
    pub cmdline: String,
    /// The initrd URLs, in order.
    pub initrds: Vec<String>,
    /// Lines of `echo` commands, printed by the firmware.
    pub echoes: Vec<String>,
}

/// Parse an iPXE script as the gateway writes it: `#!ipxe`, `echo`, `kernel <url>
/// <cmdline...>`, `initrd <url>`, `boot`. Commands after `boot` are not run.
pub fn parse_ipxe(script: &str) -> Result<BootSpec, String> {
    let mut kernel: Option<(String, String)> = None;
    let mut initrds = Vec::new();
    let mut echoes = Vec::new();
    let mut booted = false;
    for (i, raw) in script.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (cmd, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim();
        match cmd {
            "echo" => echoes.push(rest.to_string()),
            "kernel" => {
                let (url, cmdline) = split_url(rest)
                    .ok_or_else(|| format!("line {}: `kernel` without a URL", i + 1))?;
                kernel = Some((url, cmdline));
            }
            "initrd" => {
                let (url, _) = split_url(rest)
                    .ok_or_else(|| format!("line {}: `initrd` without a URL", i + 1))?;
                initrds.push(url);
            }
            "boot" => {
                booted = true;
                break;
            }
            other => return Err(format!("line {}: unsupported command `{other}`", i + 1)),
        }
    }
    if !booted {
        return Err("the script has no `boot` command".into());
    }
    let (kernel, cmdline) = kernel.ok_or("`boot` without a `kernel` first")?;
    Ok(BootSpec {
        kernel,
        cmdline,
        initrds,
        echoes,
    })
}

/// `[--option...] <url> <rest>` → (url, rest), skipping iPXE `--name=x` style options.
fn split_url(args: &str) -> Option<(String, String)> {
    let mut rest = args.trim_start();
    loop {
        let (word, after) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        if word.is_empty() {
            return None;
        }
        if word.starts_with("--") {
            rest = after.trim_start();
            continue;
        }
        return Some((word.to_string(), after.trim().to_string()));
    }
}

/// One step of a `farmsim.script`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Print a console line.
    Print(String),
    /// Wait.
    Sleep(Duration),
    /// Print `reboot: Power Down` and halt.
    Poweroff,
    /// Print `reboot: Restarting system` and boot again.
    Reboot,
    /// Print a kernel panic and halt.
    Panic,
    /// Halt silently.
    Hang,
    /// Copy console input lines back to the console until power off.
    EchoInput,
    /// Register with the gateway as CI-tron's registration program does:
    /// `POST /api/v1/dut/` with the machine's MAC, base name `sim`, tags
    /// `farmsim:port:<port>` and `local_tty_device: ttyS0`, then print
    /// `MaRS: Registration complete` (or the gateway's refusal).
    Register,
}

/// The script run when the command line has no `farmsim.script`.
pub const DEFAULT_SCRIPT: &str = "print farmsim: booted; poweroff";

/// The `farmsim.script` value of a kernel command line, if any: `farmsim.script="a; b"`
/// (double quotes allow spaces) or `farmsim.script=word`.
pub fn script_from_cmdline(cmdline: &str) -> Option<&str> {
    const KEY: &str = "farmsim.script=";
    let mut from = 0;
    while let Some(found) = cmdline[from..].find(KEY) {
        let at = from + found;
        let at_word_start = cmdline[..at]
            .chars()
            .next_back()
            .is_none_or(char::is_whitespace);
        let value = &cmdline[at + KEY.len()..];
        if at_word_start {
            if let Some(quoted) = value.strip_prefix('"') {
                return Some(quoted.split_once('"').map_or(quoted, |(v, _)| v));
            }
            return Some(value.split(char::is_whitespace).next().unwrap_or(""));
        }
        from = at + KEY.len();
    }
    None
}

/// Parse a `farmsim.script`: commands separated by `;`.
pub fn parse_script(script: &str) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    for part in script.split(';') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let (cmd, arg) = part.split_once(char::is_whitespace).unwrap_or((part, ""));
        let arg = arg.trim();
        let no_arg = |step: Step| {
            if arg.is_empty() {
                Ok(step)
            } else {
                Err(format!("`{cmd}` takes no argument (got `{arg}`)"))
            }
        };
        steps.push(match cmd {
            "print" => Step::Print(arg.to_string()),
            "sleep" => {
                Step::Sleep(Duration::from_millis(arg.parse::<u64>().map_err(|_| {
                    format!("`sleep` wants a number of milliseconds, not `{arg}`")
                })?))
            }
            "poweroff" => no_arg(Step::Poweroff)?,
            "reboot" => no_arg(Step::Reboot)?,
            "panic" => no_arg(Step::Panic)?,
            "hang" => no_arg(Step::Hang)?,
            "echo_input" => no_arg(Step::EchoInput)?,
            "register" => no_arg(Step::Register)?,
            other => return Err(format!("unknown command `{other}` in `{part}`")),
        });
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_script_as_the_gateway_writes_it() {
        let s = "#!ipxe\necho farmgate: job j1, boot 1\nkernel http://gw/k console=ttyS0 farmsim.script=\"print a b; poweroff\"\ninitrd http://gw/i1\ninitrd http://gw/i2\nboot\n";
        let spec = parse_ipxe(s).expect("parses");
        assert_eq!(spec.kernel, "http://gw/k");
        assert_eq!(
            spec.cmdline,
            "console=ttyS0 farmsim.script=\"print a b; poweroff\""
        );
        assert_eq!(spec.initrds, vec!["http://gw/i1", "http://gw/i2"]);
        assert_eq!(spec.echoes, vec!["farmgate: job j1, boot 1"]);
    }

    #[test]
    fn kernel_without_cmdline_and_bad_scripts() {
        let spec = parse_ipxe("#!ipxe\nkernel http://gw/k\nboot\n").expect("parses");
        assert_eq!(spec.cmdline, "");
        assert!(parse_ipxe("#!ipxe\nkernel http://gw/k\n").is_err());
        assert!(parse_ipxe("#!ipxe\nboot\n").is_err());
        let err = parse_ipxe("#!ipxe\nchain http://x\nboot\n").expect_err("refused");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn script_from_the_cmdline() {
        assert_eq!(
            script_from_cmdline("console=ttyS0 farmsim.script=\"print hi there; poweroff\" quiet"),
            Some("print hi there; poweroff")
        );
        assert_eq!(
            script_from_cmdline("farmsim.script=hang quiet"),
            Some("hang")
        );
        assert_eq!(script_from_cmdline("xfarmsim.script=hang"), None);
        assert_eq!(script_from_cmdline("console=ttyS0"), None);
    }

    #[test]
    fn script_steps() {
        let steps = parse_script(
            "print a; sleep 20; print b c;reboot;echo_input; hang; panic; register; poweroff",
        )
        .expect("parses");
        assert_eq!(
            steps,
            vec![
                Step::Print("a".into()),
                Step::Sleep(Duration::from_millis(20)),
                Step::Print("b c".into()),
                Step::Reboot,
                Step::EchoInput,
                Step::Hang,
                Step::Panic,
                Step::Register,
                Step::Poweroff,
            ]
        );
        assert!(parse_script("sleep soon").is_err());
        assert!(parse_script("dance").is_err());
        assert!(parse_script("poweroff now").is_err());
    }
}
