//! farmgate binary (being written).
fn main() {}
