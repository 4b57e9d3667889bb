//! fieldlink: unattended Raspberry Pis on flaky links, and the cloud side
//! that collects from them.
//!
//! The agent reads buttons, drives relays and reports its own health over
//! MQTT. Everything it sends goes through a durable on-disk outbox first, so
//! a dead link, a restarted broker or a `kill -9` loses nothing. The hub
//! stores what arrives (each `(device, epoch, seq)` once), serves an API and a live
//! dashboard, and sends relay commands. This crate holds all the logic;
//! `src/main.rs` only parses the command line.
//!
//! # Layout
//!
//! * [`config`]: the agent's and the hub's TOML configs, validated into typed
//!   structs; every problem is reported at once. It never starts anything.
//! * [`proto`]: topics and payloads, the one place that builds or parses them
//!   (sans-IO).
//! * [`gpio`]: the GPIO trait with a Raspberry Pi backend (rppal) and a
//!   simulated backend driven over a Unix socket.
//! * [`outbox`]: the durable queue on sled: record format, group commit
//!   with fdatasync, ledger, bound, disk-fault recovery, replay reads.
//! * [`agent`]: the actors (Button, Relay, Heartbeat, Link), the sans-IO
//!   delivery state, inbox and command gate, their supervision, the status
//!   dump and socket, and the process lifecycle.
//! * [`hub`]: the cloud side: collector, store, commands, web API and
//!   dashboard, device provisioning for a hub-managed mosquitto.
//! * [`broker`]: the embedded MQTT broker (rmqtt) with its auth and ACL.
//! * [`passwd`]: MQTT credentials in mosquitto_passwd format.
//! * [`demo`]: `fieldlink demo`, the whole system on one machine.
//! * [`fleet_sim`]: `fieldlink fleet-sim`, simulated devices that load a hub
//!   to size it (sent, stored, lost, publish → commit latency).
//! * [`cli`]: the small client commands (`status`, `sim`, `check-config`).
//! * [`mqtt_options`]: the rumqttc options the agent and the hub share;
//!   [`connect_failure`]: why a connect failed, in words, and its log line.
//! * [`fsutil`], [`timefmt`]: atomic file writes; RFC 3339 timestamps.
//! * [`memtrim`]: giving freed heap memory back after a drained backlog.
//! * [`sd_notify`]: systemd's notification socket (`READY=1`, `WATCHDOG=1`).
//!
//! # Features
//!
//! `hub` (default) builds [`hub`], [`broker`], [`passwd`], [`demo`], [`fleet_sim`] and the
//! hub's config with their dependencies (rmqtt, sqlx, axum, hyper, tower).
//! Without it (`--no-default-features --features agent`) the crate is the
//! agent and its client commands only: the lean build for a Pi. Nothing the
//! agent uses may depend on `hub` code.

pub mod agent;
#[cfg(feature = "hub")]
pub mod broker;
pub mod cli;
pub mod config;
pub mod connect_failure;
#[cfg(feature = "hub")]
pub mod demo;
#[cfg(feature = "hub")]
pub mod fleet_sim;
pub mod fsutil;
pub mod gpio;
#[cfg(feature = "hub")]
pub mod hub;
pub mod memtrim;
pub mod mqtt_options;
pub mod outbox;
#[cfg(feature = "hub")]
pub mod passwd;
pub mod proto;
pub mod sd_notify;
pub mod timefmt;

/// The version reported in heartbeats and the status dump.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
