//! `hangar-games`: the turn-based game system that runs on Hangar as an
//! example app (the seed's distributed game system, in Rust).
//!
//! It owns the games' rules ([`rules`]: each game a pure state machine of
//! state, legal moves, a move applied and the outcome; a game's state is
//! its kind and its moves, so any machine rebuilds it from them), the
//! record the machines keep and replicate and the changes made to it
//! ([`record`]), the 4-letter codes players share ([`code`]), and which
//! machine of the app owns a game ([`owner`]: rendezvous hashing over the
//! live peers), ratings from finished games ([`rating`]), and for games
//! as model evaluation: the built-in engines ([`engine`]), what a model
//! is asked and how its answer is read ([`ai`]), and calibration metrics
//! ([`calibration`]). The server and the arena (`src/bin/hangar-games`)
//! are built on it.
//!
//! It must not know how it is deployed, nor do I/O: peers come from
//! `.internal` DNS and moves from players or endpoints, all through the
//! binary built on it.

#![forbid(unsafe_code)]

pub mod ai;
pub mod calibration;
pub mod code;
pub mod engine;
pub mod owner;
pub mod rating;
pub mod record;
pub mod rules;
