//! Property tests of what the coordinator does with whatever an agent sends: arbitrary bytes
//! never panic the decoder, and arbitrary message sequences on a real session (over a Unix
//! socket, through the real gRPC service) never crash the coordinator, never corrupt its
//! database and never store a hole in a log sequence.

use std::collections::HashMap;
use std::time::Duration;

use kiln_coordinator::store::{EventFields, GangSpec, NewRun};
use kiln_proto::v1::{self, agent_message::Kind};
use proptest::prelude::*;
use prost::Message as _;
use tokio_stream::StreamExt as _;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = v1::AgentMessage::decode(bytes.as_slice());
    }
}

fn text() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        "[a-z/_]{0,12}",
        Just(String::new()),
        Just("x".repeat(70_000)),
        Just("tab\tnew\nline\u{0}nul".to_string()),
        Just("é".repeat(40_000)),
    ]
}

fn value() -> impl Strategy<Value = f64> + Clone {
    prop_oneof![
        any::<f64>(),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(0.5),
    ]
}

/// Up to 5 items with sequence numbers: mostly consecutive (as agents send them, possibly
/// repeating what was stored), sometimes anything.
fn batch<T: std::fmt::Debug + Clone>(
    item: impl Strategy<Value = T> + Clone,
) -> impl Strategy<Value = Vec<(u64, T)>> {
    (0usize..6).prop_flat_map(move |n| {
        let seqs = prop_oneof![
            3 => (1u64..6).prop_map(move |start| (start..start + n as u64).collect::<Vec<_>>()),
            1 => proptest::collection::vec(0u64..8, n),
        ];
        (seqs, proptest::collection::vec(item.clone(), n))
            .prop_map(|(seqs, items)| seqs.into_iter().zip(items).collect())
    })
}

/// Messages about runs 1..=3 (run 1 exists and is placed on this agent), attempts 0..=2,
/// with sequence numbers that repeat, skip and go backwards.
fn message() -> impl Strategy<Value = Kind> {
    // Mostly the placed run's current attempt, so that messages reach the store.
    let run = prop_oneof![3 => Just(1i64), 1 => 0i64..4];
    let attempt = prop_oneof![3 => Just(1u32), 1 => 0u32..3];
    prop_oneof![
        Just(Kind::Heartbeat(v1::Heartbeat::default())),
        (run.clone(), attempt.clone(), batch(text())).prop_map(|(run_id, attempt, lines)| {
            Kind::Logs(v1::LogBatch {
                run_id,
                attempt,
                lines: lines
                    .into_iter()
                    .map(|(seq, text)| v1::LogLine {
                        seq,
                        text,
                        ..Default::default()
                    })
                    .collect(),
            })
        }),
        (run.clone(), attempt.clone(), batch((text(), value()))).prop_map(
            |(run_id, attempt, points)| Kind::Metrics(v1::MetricBatch {
                run_id,
                attempt,
                points: points
                    .into_iter()
                    .map(|(seq, (name, value))| v1::MetricPoint {
                        seq,
                        name,
                        value,
                        ..Default::default()
                    })
                    .collect(),
            })
        ),
        (run.clone(), attempt.clone(), 0i32..9, any::<bool>()).prop_map(
            |(run_id, attempt, status, fenced)| {
                Kind::RunEvent(v1::RunEvent {
                    run_id,
                    attempt,
                    kind: Some(v1::run_event::Kind::Finished(v1::Finished {
                        status,
                        fenced,
                        exit_code: Some(status),
                        ..Default::default()
                    })),
                })
            }
        ),
        (run.clone(), attempt.clone()).prop_map(|(run_id, attempt)| Kind::RunEvent(v1::RunEvent {
            run_id,
            attempt,
            kind: Some(v1::run_event::Kind::Started(v1::Started { pid: 1 })),
        })),
        (run, attempt, text()).prop_map(|(run_id, attempt, digest)| Kind::RunEvent(v1::RunEvent {
            run_id,
            attempt,
            kind: Some(v1::run_event::Kind::Checkpointed(v1::Checkpointed {
                digest
            })),
        })),
        Just(Kind::Hello(v1::Hello::default())),
    ]
}

async fn exercise(messages: Vec<Kind>) {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut config = kiln_coordinator::Config::new(dir.path().join("data"));
    config.heartbeat_ttl = Duration::from_secs(60);
    let coordinator = kiln_coordinator::Coordinator::start(config, shutdown.clone()).unwrap();
    coordinator.ensure_target("fuzz").await.unwrap();
    // Run 1, placed on the fuzzing agent, so its messages reach the store.
    coordinator
        .db()
        .call(|s| {
            let env = HashMap::new();
            let run = s.insert_run(&NewRun {
                name: "fuzz",
                target: "fuzz",
                snapshot_digest: "sha256:00",
                script: "a.py",
                args: &[],
                max_retries: 1,
                checkpoint_interval_s: 0,
                gang: GangSpec::default(),
                environment: None,
                resources: None,
                env: &env,
                secret_names: &[],
                sealed_secrets: None,
                timeout_s: 0,
                owner: "",
                now_ms: 0,
            })?;
            let placement = ["fuzzer".to_string()];
            s.transition(
                run.id,
                None,
                kiln_common::run::RunEvent::Assign,
                &EventFields {
                    placement: &placement,
                    now_ms: 1,
                    ..Default::default()
                },
            )?;
            anyhow::Ok(())
        })
        .await
        .unwrap();
    let socket = dir.path().join("c.sock");
    let listen = format!("unix://{}", socket.display());
    let listener = kiln_coordinator::Listener::bind(&listen).await.unwrap();
    let server = tokio::spawn(kiln_coordinator::serve(
        coordinator.clone(),
        listener,
        shutdown.clone(),
    ));
    let address = kiln_proto::Address::parse(&listen).unwrap();
    let channel = kiln_proto::connect(&address).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tx.send(v1::AgentMessage {
        kind: Some(Kind::Hello(v1::Hello {
            agent_id: "fuzzer".into(),
            target: "fuzz".into(),
            slots: 1,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut inbound = kiln_proto::clients::agent(channel.clone())
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let reader = tokio::spawn(async move { while let Some(Ok(_)) = inbound.next().await {} });
    for kind in messages {
        if tx
            .send(v1::AgentMessage { kind: Some(kind) })
            .await
            .is_err()
        {
            break; // The coordinator closed the session (a second hello): allowed.
        }
    }
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;
    // The coordinator still answers, and its database is consistent.
    let version = kiln_proto::clients::kiln(channel, kiln_proto::Bearer::none())
        .version(v1::VersionRequest {})
        .await
        .unwrap();
    assert!(!version.into_inner().version.is_empty());
    shutdown.cancel();
    server.await.unwrap().unwrap();
    coordinator.stopped().await;
    let db = rusqlite::Connection::open(dir.path().join("data/kiln.db")).unwrap();
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let holes: i64 = db
        .query_row(
            "SELECT count(*) FROM (SELECT count(*) AS n, max(seq) AS m FROM logs
             GROUP BY run_id, attempt, node) WHERE n != m",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(holes, 0, "a log sequence with a hole");
    let bad_metrics: i64 = db
        .query_row(
            "SELECT count(*) FROM metrics WHERE length(name) > 256 OR name = ''",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(bad_metrics, 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_agent_messages_never_break_the_coordinator(messages in proptest::collection::vec(message(), 0..40)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(exercise(messages));
    }
}
