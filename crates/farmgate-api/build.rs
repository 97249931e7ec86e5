//! Embeds the dashboard's xterm.js (npm package @xterm/xterm, installed into
//! `ui/node_modules` by `scripts/setup.sh`: `npm ci` in `crates/farmgate-api/ui`) into the
//! binary, so the gateway serves a terminal emulator with nothing else installed. When
//! it is not there at build time, empty files are embedded and the gateway serves
//! `FARMGATE_UI_VENDOR_DIR` instead (the page falls back to plain text without it).

use std::path::Path;

fn main() {
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let pkg = Path::new("ui/node_modules/@xterm/xterm");
    for (src, dst) in [("lib/xterm.js", "xterm.js"), ("css/xterm.css", "xterm.css")] {
        let from = pkg.join(src);
        println!("cargo:rerun-if-changed={}", from.display());
        let data = std::fs::read(&from).unwrap_or_default();
        std::fs::write(Path::new(&out).join(dst), data).expect("write into OUT_DIR");
    }
    println!("cargo:rerun-if-changed=ui/package-lock.json");
}
