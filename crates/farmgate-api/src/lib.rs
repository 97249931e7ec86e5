//! farmgate-api (being written).
