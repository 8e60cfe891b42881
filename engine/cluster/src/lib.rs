//! Scale-out on NATS JetStream.
//!
//! Several engine processes share the live calls; each call is handled by one process at a
//! time, strictly in order, and a process that dies or stalls hands its calls to another
//! without losing or repeating an output.
//!
//! ```text
//!  ingest (Symbl, Twilio bridge, recordings)          engines (N processes)             sinks
//!  ── prompter.ev.<call> ──► PROMPTER_EVENTS ──► partition p pinned to one engine ──► PROMPTER_OUTPUTS ──► console,
//!     Nats-Msg-Id = call:event     │ prompter.p.<p>.<call>   (rendezvous over live members)  prompter.out.<call>    notifiers
//!                                  │                           snapshots: KV prompter_snapshots
//!                                  └─ server transform: partition(P, call)   members: KV prompter_members
//! ```
//!
//! - [`Cluster`] connects, refuses servers older than 2.11 and creates the streams, the
//!   per-partition pinned consumers and the KV buckets.
//! - [`ingest::Ingest`] is the [`Forward`](prompter_engine::engine::Forward) hook of an ingest
//!   process: every event its sources accept is published to the events stream with an
//!   idempotency id derived from the event.
//! - [`member::Member`] runs in an engine process: it heartbeats, owns the partitions that
//!   rendezvous hashing gives it among the live members, rebuilds a conversation it has not seen
//!   (snapshot, then the stream's events after it), drops deliveries older than what a
//!   conversation applied, acknowledges an event only once the outputs of everything up to it
//!   are stored, and snapshots settled conversations.
//! - [`outputs::Outputs`] is the engine's sink: every output version to the outputs stream,
//!   with `Nats-Msg-Id = <output id>@<version>`, so re-made outputs are dropped by the server.
//! - [`view::View`] feeds local sinks (console, notifiers, stdout) from the outputs stream,
//!   and the console's transcript from the events stream, whichever engine handled a call.

pub mod ingest;
pub mod member;
pub mod names;
pub mod outputs;
pub mod view;

mod confirm;
mod connect;

pub use connect::{Cluster, ClusterError, MEMBER_ENV};
