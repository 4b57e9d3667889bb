//! Client commands. IMPLEMENTATION PENDING.
