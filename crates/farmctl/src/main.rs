//! farmctl binary (being written).
fn main() {}
