//! Fuzz SALAD's association-line parser with arbitrary console bytes.
#![no_main]

use farmgate_console::{SaladLine, parse_line, valid_machine_id};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(SaladLine::MachineId(id)) = parse_line(data) {
        assert!(
            valid_machine_id(&id),
            "parse_line returned an invalid id {id:?}"
        );
        assert_eq!(id, id.to_ascii_lowercase());
    }
});
