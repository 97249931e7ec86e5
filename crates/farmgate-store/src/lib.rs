//! farmgate-store (being written).
