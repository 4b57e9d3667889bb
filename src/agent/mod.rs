//! The agent actors. IMPLEMENTATION PENDING.
