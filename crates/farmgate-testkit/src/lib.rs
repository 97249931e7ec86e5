//! farmgate-testkit (being written).
