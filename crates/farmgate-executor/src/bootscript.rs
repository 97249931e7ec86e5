//! iPXE boot scripts served to DUTs (`/api/v1/dut/<mac>/boot.ipxe`).
//!
//! A DUT running a job boots the job's deployment for its current boot (`start` for the
//! first, `start` merged with `continue` after); an unknown machine, or any machine while
//! a discovery is in progress, boots the farm's default configuration (`BOOTS_DEFAULT_*`).
//! Values go on iPXE command lines, so anything that could end a line or start a
//! comment is refused rather than escaped.
//!
//! Every kernel command line served gets `SALAD.machine_id=<mac>` appended (unless it
//! already has a `SALAD.machine_id=`): the kernel prints its command line on the serial
//! console early in the boot, which binds a network console (a QEMU machine) to the
//! machine in SALAD before anything else is printed, as CI-tron's jobs do by hand.

use farmgate_job::DeploymentStep;

fn check(what: &str, value: &str) -> Result<(), String> {
    if value.chars().any(|c| c == '\n' || c == '\r' || c == '\0') {
        return Err(format!(
            "{what} contains a line break, which iPXE cannot take"
        ));
    }
    Ok(())
}

/// Whether iPXE can take `cmdline` as the arguments of its `kernel` command: iPXE
/// scripts have no quoting for line breaks and treat `&&` and `||` as command
/// operators, so a cmdline with those would run something else than the kernel.
pub fn check_cmdline(cmdline: &str) -> Result<(), String> {
    check("cmdline", cmdline)?;
    for op in ["&&", "||"] {
        if cmdline.contains(op) {
            return Err(format!(
                "cmdline contains {op:?}, which iPXE takes as a command operator: use ';' between shell commands, or pass them in a file (storage.http)"
            ));
        }
    }
    Ok(())
}

/// `cmdline` with `SALAD.machine_id=<mac>` appended when it has none.
pub fn with_machine_id(cmdline: &str, mac: &str) -> String {
    if cmdline.contains("SALAD.machine_id=") {
        cmdline.to_string()
    } else if cmdline.trim().is_empty() {
        format!("SALAD.machine_id={mac}")
    } else {
        format!("{} SALAD.machine_id={mac}", cmdline.trim_end())
    }
}

/// The script of one boot of a job on machine `mac`.
pub fn render(
    mac: &str,
    job_id: &str,
    boot_index: u32,
    step: &DeploymentStep,
) -> Result<String, String> {
    let kernel = step
        .kernel
        .as_ref()
        .and_then(|k| k.url.clone())
        .ok_or_else(|| {
            "the deployment has no kernel url (inline `data` kernels are not served yet)"
                .to_string()
        })?;
    check("kernel url", &kernel)?;
    check_cmdline(&step.cmdline)?;
    let cmdline = with_machine_id(&step.cmdline, mac);
    let mut out = String::from("#!ipxe\n");
    out.push_str(&format!("echo farmgate: job {job_id}, boot {boot_index}\n"));
    out.push_str(&format!("kernel {kernel} {cmdline}\n"));
    for initrd in &step.initramfs {
        let url = initrd.url.clone().ok_or_else(|| {
            "an initramfs has no url (inline `data` initramfs are not served yet)".to_string()
        })?;
        check("initramfs url", &url)?;
        out.push_str(&format!("initrd {url}\n"));
    }
    out.push_str("boot\n");
    Ok(out)
}

/// The script of the default boot configuration for machine `mac`.
pub fn render_default(mac: &str, kernel: &str, initrd: Option<&str>, cmdline: &str) -> String {
    let clean = |s: &str| s.replace(['\n', '\r', '\0'], " ");
    let mut out = String::from("#!ipxe\necho farmgate: default boot configuration\n");
    out.push_str(&format!(
        "kernel {} {}\n",
        clean(kernel),
        with_machine_id(&clean(cmdline), mac)
    ));
    if let Some(i) = initrd.filter(|i| !i.is_empty()) {
        out.push_str(&format!("initrd {}\n", clean(i)));
    }
    out.push_str("boot\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_script_snapshot() {
        insta::assert_snapshot!(render_default(
            "52:54:00:11:22:01",
            "http://gw/kernel",
            Some("http://gw/initrd"),
            "console=ttyS0 farmsim.script=\"print hi; poweroff\""
        ));
    }

    #[test]
    fn job_script_snapshot_and_line_breaks_refused() {
        let job = farmgate_job::parse(
            "version: 1\nconsole_patterns:\n  session_end:\n    regex: end\ndeployment:\n  start:\n    kernel:\n      url: http://gw/k\n      cmdline: console=ttyS0 quiet\n    initramfs:\n      - url: http://gw/i1\n      - url: http://gw/i2\n",
        )
        .expect("valid job");
        let step = job.deployment.for_boot(0);
        insta::assert_snapshot!(render("52:54:00:11:22:01", "job-1", 1, &step).expect("renders"));
        let mut bad = step.clone();
        bad.cmdline = "a\n#!ipxe shell".into();
        assert!(render("52:54:00:11:22:01", "job-1", 1, &bad).is_err());
        bad.cmdline = "farmgate.run=\"true && echo x\"".into();
        let e = render("52:54:00:11:22:01", "job-1", 1, &bad).expect_err("&& refused");
        assert!(e.contains("iPXE"), "{e}");
        assert_eq!(
            with_machine_id("a SALAD.machine_id=x", "m"),
            "a SALAD.machine_id=x",
            "an id written by the job is kept"
        );
    }
}
