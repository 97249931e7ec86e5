//! Arbitrary text as a rendered job description and as a job template: parsing and
//! rendering must return errors, never panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = farmgate_job::parse(text);
        let _ = farmgate_job::render(text, &farmgate_job::RenderContext::new());
    }
});
