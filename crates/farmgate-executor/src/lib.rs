//! farmgate-executor (being written).
