//! farmgate-job (being written).
