//! fieldlink: a field agent for unattended Raspberry Pis on flaky links.
//!
//! The agent reads buttons, drives relays and reports its own health over
//! MQTT. Everything it sends goes through a durable on-disk outbox first, so
//! a dead link, a restarted broker or a `kill -9` loses nothing. This crate
//! holds all the logic; `src/main.rs` only parses the command line.
//!
//! # Layout
//!
//! * [`config`]: the agent's TOML config, validated into typed structs; every
//!   problem is reported at once. It never starts anything.
//! * [`proto`]: topics and payloads, the one place that builds or parses them
//!   (sans-IO).
//! * [`gpio`]: the GPIO trait with a Raspberry Pi backend (rppal) and a
//!   simulated backend driven over a Unix socket.
//! * [`outbox`]: the durable queue on sled: record format, group commit,
//!   bound, replay reads.
//! * [`agent`]: the actors (Button, Relay, Heartbeat, Link), their
//!   supervision, the status dump and the process lifecycle.
//! * [`cli`]: the small client commands (`status`, `sim`, `check-config`).

pub mod agent;
pub mod broker;
pub mod cli;
pub mod config;
pub mod demo;
pub mod fsutil;
pub mod gpio;
pub mod hub;
pub mod outbox;
pub mod proto;
pub mod timefmt;

/// The version reported in heartbeats and the status dump.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
