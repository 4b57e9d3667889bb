//! Simulated GPIO backend. IMPLEMENTATION PENDING (helper).
