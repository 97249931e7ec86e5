//! farmgate-console (being written).
