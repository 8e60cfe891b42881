#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail loudly on broken invariants"
)]
//! A server older than 2.11 is refused at join, with its version and what is missing: 2.9
//! (Debian's) accepts stream transforms, consumer filters and priority groups and silently
//! ignores them, so the cluster would run unpartitioned and unpinned. The server here is a
//! local stand-in speaking the NATS client protocol's greeting (INFO, CONNECT, PING/PONG).

use prompter_cluster::{Cluster, ClusterError};
use prompter_engine::config::cluster::ClusterConfig;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

async fn fake_server(version: &'static str) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let info = format!(
                    "INFO {{\"server_id\":\"FAKE\",\"server_name\":\"fake\",\"version\":\"{version}\",\"proto\":1,\"host\":\"127.0.0.1\",\"port\":4222,\"headers\":true,\"max_payload\":1048576,\"jetstream\":true}}\r\n"
                );
                if write.write_all(info.as_bytes()).await.is_err() {
                    return;
                }
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.starts_with("PING") && write.write_all(b"PONG\r\n").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn a_server_older_than_2_11_is_refused_with_its_version() {
    let port = fake_server("2.9.10").await;
    let config = ClusterConfig::new(vec![format!("nats://127.0.0.1:{port}")]);
    let err = match Cluster::join(&config).await {
        Ok(_) => panic!("a 2.9.10 server was accepted"),
        Err(e) => e,
    };
    assert!(matches!(err, ClusterError::TooOld { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("version 2.9.10"), "{message}");
    assert!(message.contains("2.11 or later"), "{message}");
    assert!(message.contains("pinned consumers"), "{message}");
}

#[tokio::test]
async fn a_missing_credential_variable_is_named() {
    let mut config = ClusterConfig::new(vec!["nats://127.0.0.1:1".into()]);
    config.token_env = Some("PROMPTER_TEST_UNSET_NATS_TOKEN".into());
    let err = match Cluster::join(&config).await {
        Ok(_) => panic!("joined without its token"),
        Err(e) => e.to_string(),
    };
    assert_eq!(
        err,
        "`cluster.token_env` names the variable `PROMPTER_TEST_UNSET_NATS_TOKEN`, which is not set"
    );
}

#[tokio::test]
async fn no_server_is_a_clear_error() {
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let config = ClusterConfig::new(vec![format!("nats://127.0.0.1:{port}")]);
    let err = match Cluster::join(&config).await {
        Ok(_) => panic!("joined a server that is not there"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.starts_with(&format!(
            "cannot connect to the NATS server(s) nats://127.0.0.1:{port}"
        )),
        "{err}"
    );
}
