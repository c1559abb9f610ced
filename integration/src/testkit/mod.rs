//! What tests and measurements stand up around the server: a throw-away `redis-server`
//! on a free loopback port. Behind the cargo feature `testkit`, which this crate's tests
//! (through a dev-dependency on itself) and the benches' scale-out eval turn on; the
//! `attncache-server` binary is built without it.
//!
//! May call: nothing of this crate.

pub mod redis_server;
