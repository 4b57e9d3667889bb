//! Raspberry Pi GPIO backend (rppal). IMPLEMENTATION PENDING (helper).
