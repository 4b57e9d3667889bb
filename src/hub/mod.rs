//! The cloud side (`fieldlink hub`). IMPLEMENTATION PENDING.

pub mod commands;
pub mod model;
pub mod store;
