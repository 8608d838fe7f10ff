//! Shared configuration on several servers: a token made or revoked
//! through one server holds on the others within a second, with no
//! restart. MariaDB only: SQLite serves one server.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::harness::{Db, Env};

/// How long a token change may take to reach another server.
const CONFIG_BOUND: Duration = Duration::from_secs(1);

/// A token made through one server works on the other within 1 s, and
/// one revoked through the other is refused by the first within 1 s;
/// three times over, so no lucky timing passes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_made_or_revoked_through_one_server_hold_on_another() {
    let env = Env::new(Db::MySql).await;
    let a = env.serve_with(&["--server-id", "s-a"]);
    let b = env.serve_another(&["--server-id", "s-b"]);
    for round in 0..3 {
        let token = a
            .token_with(&format!("roaming-{round}"), &["read"], None)
            .await;
        let id = token.strip_prefix("troupe_").unwrap()[..16].to_owned();
        let made = Instant::now();
        loop {
            let (status, body) = b
                .request_as(Some(&token), Method::GET, "/v1/kinds", None)
                .await;
            if status == StatusCode::OK {
                break;
            }
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
            assert!(
                made.elapsed() < CONFIG_BOUND,
                "round {round}: B does not know the token {:?} after it was made: {body}",
                made.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (status, body) = b.post(&format!("/v1/tokens/{id}/revoke"), &json!({})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let revoked = Instant::now();
        loop {
            let (status, body) = a
                .request_as(Some(&token), Method::GET, "/v1/kinds", None)
                .await;
            if status == StatusCode::UNAUTHORIZED {
                assert_eq!(body["error"]["code"], "token_revoked", "{body}");
                break;
            }
            assert_eq!(status, StatusCode::OK, "{body}");
            assert!(
                revoked.elapsed() < CONFIG_BOUND,
                "round {round}: A still accepts the token {:?} after it was revoked",
                revoked.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
