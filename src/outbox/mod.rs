//! IMPLEMENTATION PENDING (helper): the durable outbox. See the helper brief.
