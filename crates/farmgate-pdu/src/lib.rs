//! farmgate-pdu (being written).
