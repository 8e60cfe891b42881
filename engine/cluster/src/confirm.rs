//! Publishing until the server confirms: the one retry loop behind ingest and the outputs sink.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::publish::PublishAck;

use crate::Cluster;

/// How long one message is retried without the server before it is given up.
pub(crate) const GIVE_UP: Duration = Duration::from_secs(120);

/// Publishes `message()` to `subject` and waits for its PubAck; while the server is away,
/// retries with a doubling wait (50 ms to 2 s), counting each failed attempt in `retries` and
/// calling `warn` on the 1st, 2nd, 4th, 8th, ... of them. Gives up after [`GIVE_UP`] with the
/// last error.
pub(crate) async fn publish_confirmed(
    cluster: &Cluster,
    subject: &str,
    message: impl Fn() -> Publish,
    retries: &AtomicU64,
    warn: impl Fn(&str),
) -> Result<PublishAck, String> {
    let started = Instant::now();
    let mut wait = Duration::from_millis(50);
    loop {
        let sent = cluster.js.send_publish(subject.to_owned(), message()).await;
        let acked = match sent {
            Ok(ack) => ack.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match acked {
            Ok(ack) => return Ok(ack),
            Err(e) => {
                let n = retries.fetch_add(1, Ordering::Relaxed);
                if started.elapsed() > GIVE_UP {
                    return Err(e);
                }
                if n.is_power_of_two() {
                    warn(&e);
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
    }
}
